"""`dlrm-prepare verify ARTIFACT`: full SHA-256 of every artifact file against meta.json."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from formats.artifact import Artifact
from prepare.progress import progress


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Check an artifact's format, sizes and full SHA-256 checksums."
    parser.add_argument("artifact", type=Path, help="artifact directory")


def run(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    art = Artifact.open(args.artifact)  # format, version, sizes, sampled checksums
    bar = progress(total=art.data_bytes(), desc="sha256", unit="B")
    try:
        art.verify_full(on_bytes=bar.update)  # ArtifactError naming the file on a mismatch
    finally:
        bar.close()
    print(f"{args.artifact}: OK ({art.data_bytes()} bytes, {art.total_rows} rows, "
          f"{time.monotonic() - t0:.1f} s)")
    return 0
