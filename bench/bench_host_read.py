"""Zero-copy reads of cold embedding rows from page-locked host memory, by how that memory is backed.

At `embedding_weights_on_gpu_part = 0.3` the fused gather kernel reads ~0.5-1% of a batch's lookups (tens of
thousands of 128-byte rows) from pinned host memory over PCIe. The engine alone (1.2 GB of tables) ran at 89% of
the all-on-device rate, but end to end on the full-size tables (17 GB of cold rows) only 72%: the same number of
rows costs more when they are spread over more memory. This probe asks whether address translation is the reason
(the GPU maps page-locked memory in the host's page size: 4 KiB pages put every random row on a page of its own)
by reading the same number of random rows from regions of several sizes, each allocated three ways:

- `cudaHostAlloc`: torch's `pin_memory=True` (what a private copy of the cold rows uses today);
- `register-4k`: an anonymous mapping page-locked with cudaHostRegister, no huge pages asked for;
- `register-thp`: the same with `madvise(MADV_HUGEPAGE)` first (2 MiB pages where the kernel grants them).

Measured on an H100 (BENCHMARKS.md "Round 8"): huge pages read no faster than cudaHostAlloc at 1 or 16 GB,
though a 16 GB region reads at ~40% of a 1 GB one either way.

The baseline, in the same run: the same kernel reading the same rows from device memory.

Run on the device machine: `python3 bench/bench_host_read.py --gb 1,4,16 --rows 40000 --out $OUT/host_read.json`.
"""
from __future__ import annotations

import argparse
import json
import mmap
import sys
import time
from pathlib import Path

import numpy as np
import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gather import bench_ms  # noqa: E402
from engines.gpu_staging import HostRegistry  # noqa: E402

D = 128
HUGE_PAGE = 2 << 20  # x86-64 transparent huge page


def huge_page_rows(rows: int) -> tuple[np.ndarray, mmap.mmap]:
    """[rows, D] int8 in anonymous memory aligned to 2 MiB with transparent huge pages asked for (granted at
    first touch where /sys/kernel/mm/transparent_hugepage allows), and the mapping that owns it."""
    nbytes = rows * D
    keep = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = np.frombuffer(keep, dtype=np.int8)
    skip = (-int(whole.ctypes.data)) % HUGE_PAGE
    keep.madvise(mmap.MADV_HUGEPAGE, skip, nbytes)
    return whole[skip:skip + nbytes].reshape(rows, D), keep


def anon_huge_bytes() -> int:
    """This process's anonymous memory in transparent huge pages (/proc/self/smaps_rollup), -1 if unknown."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    return -1


@triton.jit
def _read_rows_kernel(src_ptr, pos_ptr, dst_ptr, n, D: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = r < n
    p = tl.load(pos_ptr + r, mask=live, other=0).to(tl.int64)
    c = tl.arange(0, D)
    rows = tl.load(src_ptr + (p * D)[:, None] + c[None, :], mask=live[:, None], other=0)
    tl.store(dst_ptr + (r.to(tl.int64) * D)[:, None] + c[None, :], rows, mask=live[:, None])


def read_rows(src: torch.Tensor, pos: torch.Tensor, dst: torch.Tensor) -> None:
    n = pos.numel()
    _read_rows_kernel[(triton.cdiv(n, 32),)](src, pos, dst, n, D=D, BLOCK=32)


def host_rows(mode: str, nbytes: int, registry: HostRegistry) -> tuple[torch.Tensor, object]:
    """[nbytes / D, D] int8 rows in page-locked host memory backed as `mode` says; the second item keeps the
    backing alive."""
    if mode == "cudaHostAlloc":
        t = torch.empty((nbytes // D, D), dtype=torch.int8, pin_memory=True)
        t.fill_(1)
        return t, None
    if mode == "register-thp":  # huge pages asked for, touched, page-locked
        arr, keep = huge_page_rows(nbytes // D)
        arr.fill(1)
        if not registry.register(arr):
            raise RuntimeError(f"cudaHostRegister of {nbytes} bytes refused")
        return torch.from_numpy(arr), keep
    keep = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    arr = np.frombuffer(keep, dtype=np.int8)
    arr.fill(1)  # touch: the pages exist before they are locked
    if not registry.register(arr):
        raise RuntimeError(f"cudaHostRegister of {nbytes} bytes refused")
    return torch.from_numpy(arr).view(nbytes // D, D), keep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", default="1,4,16", help="host region sizes, GB")
    ap.add_argument("--rows", type=int, default=40000, help="random rows read per launch (a batch's cold lookups)")
    ap.add_argument("--modes", default="cudaHostAlloc,register-4k,register-thp")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda:0")
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    report: dict = {"card": torch.cuda.get_device_name(0), "rows": args.rows,
                    "thp": thp.read_text().strip() if thp.exists() else None, "runs": []}
    print(f"{report['card']}; transparent_hugepage: {report['thp']}; {args.rows} random 128-byte rows a launch")
    registry = HostRegistry(dev)
    rng = np.random.default_rng(0)
    dst = torch.empty((args.rows, D), dtype=torch.int8, device=dev)
    device_rows = torch.ones((int(4e9) // D, D), dtype=torch.int8, device=dev)
    pos_dev = torch.from_numpy(rng.integers(0, device_rows.shape[0], args.rows, dtype=np.int64)).to(dev)
    dev_ms = bench_ms(lambda: read_rows(device_rows, pos_dev, dst))
    del device_rows
    print(f"{'memory':14s} {'GB':>5s} {'ms':>8s} {'M rows/s':>9s} {'GB/s':>6s} {'huge MB':>8s} {'alloc_s':>7s}")
    print(f"{'device (base)':14s} {4:5.0f} {dev_ms:8.3f} {args.rows / dev_ms / 1e3:9.2f} "
          f"{args.rows * D / dev_ms / 1e6:6.2f}")
    report["device_ms"] = dev_ms
    for gb in (float(g) for g in args.gb.split(",")):
        nbytes = int(gb * 1e9) // HUGE_PAGE * HUGE_PAGE
        pos = torch.from_numpy(rng.integers(0, nbytes // D, args.rows, dtype=np.int64)).to(dev)
        for mode in args.modes.split(","):
            huge0 = anon_huge_bytes()
            t0 = time.perf_counter()
            try:
                rows, keep = host_rows(mode, nbytes, registry)
            except RuntimeError as exc:
                print(f"{mode:14s} {gb:5.0f} {exc}")
                continue
            alloc_s = time.perf_counter() - t0
            huge_mb = (anon_huge_bytes() - huge0) / 2**20
            ms = bench_ms(lambda: read_rows(rows, pos, dst))
            ok = bool((dst == 1).all())
            print(f"{mode:14s} {gb:5.0f} {ms:8.3f} {args.rows / ms / 1e3:9.2f} {args.rows * D / ms / 1e6:6.2f} "
                  f"{huge_mb:8.0f} {alloc_s:7.1f}{'' if ok else '  WRONG ROWS'}")
            report["runs"].append({"mode": mode, "gb": gb, "ms": ms, "huge_mb": huge_mb, "alloc_s": alloc_s,
                                   "rows_ok": ok})
            registry.unregister_all()
            del rows, keep
            torch.cuda.synchronize()
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
