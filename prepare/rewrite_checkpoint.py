"""`dlrm-prepare rewrite-checkpoint OLD NEW`: a legacy (pre-1.6, non-zip) torch checkpoint in the zip format.

`dlrm-prepare model` memory-maps the checkpoint (the real one is 90 GB), and torch can only map its zip
format. This reads a legacy file whole (it needs RAM for the file), with the same weights-only rules as
every other load (tensors, containers, numbers and numpy scalars; no pickled code), and writes it again.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from engines.model import load_checkpoint_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.add_argument("old", type=Path, help="the legacy checkpoint")
    parser.add_argument("new", type=Path, help="where to write the zip-format copy")


def run(args: argparse.Namespace) -> int:
    if args.new.resolve() == args.old.resolve():
        raise ValueError("NEW must differ from OLD (the old file is read while the new one is written)")
    t0 = time.monotonic()
    obj = load_checkpoint_file(args.old, mmap=False)
    tmp = args.new.with_name(args.new.name + ".partial")
    torch.save(obj, tmp)
    tmp.replace(args.new)
    print(f"wrote {args.new} (zip format) in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return 0
