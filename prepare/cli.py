"""`dlrm-prepare SUBCOMMAND ...`: each subcommand lives in its own module, imported only when used,
so one broken or missing module never breaks the others."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """A subcommand's description as written, and every option's default."""


SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "model": ("prepare.convert", "convert a DLRM checkpoint into the int8 served artifact"),
    "verify": ("prepare.verify", "check an artifact's full checksums"),
    "rewrite-checkpoint": ("prepare.rewrite_checkpoint", "rewrite a legacy (pre-1.6) checkpoint in the zip format"),
    "criteo": ("prepare.criteo", "preprocess Criteo day files into a dataset"),
    "synthetic": ("prepare.synthetic", "generate a synthetic model and dataset"),
    "eval": ("prepare.evaluate", "offline evaluation and AUC of a model on a dataset"),
    "calibrate": ("prepare.calibrate", "int8 top-MLP activation scales from a calibration dataset"),
}


def usage() -> str:
    lines = ["usage: dlrm-prepare SUBCOMMAND [options]  (dlrm-prepare SUBCOMMAND --help)", "", "subcommands:"]
    lines += [f"  {name:<18} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"dlrm-prepare: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name = SUBCOMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        print(f"dlrm-prepare {name}: not available: module {module_name} cannot be imported ({exc})",
              file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=f"dlrm-prepare {name}", formatter_class=HelpFormatter)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args))
    except (ValueError, OSError) as exc:
        # Every project error type (CheckpointError, ArtifactError, DatasetError, ...) is a ValueError.
        print(f"dlrm-prepare {name}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"dlrm-prepare {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
