"""Progress bars for long prepare steps: tqdm on a terminal, silent when stderr is a file or pipe."""
from __future__ import annotations

import sys

from tqdm import tqdm


def progress(total: int | None, desc: str, unit: str = "it", unit_scale: bool = True) -> tqdm:
    """A tqdm bar on stderr; disabled (all calls no-ops) unless stderr is a terminal."""
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, file=sys.stderr,
                disable=not sys.stderr.isatty(), dynamic_ncols=True)
