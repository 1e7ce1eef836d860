"""Cold embedding rows in host memory: one copy per host, shared by every GPU engine (issue 15).

Each GPU engine used to copy its cold rows (those past the placement's hot ones) into page-locked memory of
its own: with `embedding_weights_on_gpu_part` below 1 on an 8-GPU host, 8 copies of up to ~17 GB. The
artifact's `embeddings.int8` already holds the cold rows contiguously (rows are stored in frequency order,
hot first), and every engine maps that file read-only (np.memmap): the kernel's page cache holds one copy
for all of them. `host_rows = "shared"` page-locks those file pages in place (cudaHostRegister with the
read-only flag, which a read-only mapping needs, and which leaves the pages shared: a read-only pin takes
no private copy), so the gather kernel reads them over PCIe as it reads a private pinned copy.

`shared_cold_region` is the pure part (which bytes to register, the view the kernel gets);
`shared_cold_rows` registers them for a GPU engine, or returns None (with a warning) where that cannot be
done, and the engine then copies its cold rows as before.

`private_cold_rows` backs `host_rows = "huge_pages"`: a private copy (as `"private"`, which is
`cudaHostAlloc`) in `HugeRows`, anonymous memory that asks for transparent huge pages
(`madvise(MADV_HUGEPAGE)`, 2 MiB aligned), page-locked with cudaHostRegister. The GPU reads cold rows
zero-copy at random, and page-locked memory is mapped for the device in the host's pages: with 4 KiB pages
nearly every cold row of a 17 GB table may be a translation miss of its own. bench/bench_host_read.py
measures the reads against cudaHostAlloc; BENCHMARKS.md has the end-to-end comparison.
"""
from __future__ import annotations

import logging
import mmap
import warnings
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch and CUDA only where a GPU engine runs
    import torch

    from engines.gpu_staging import HostRegistry

log = logging.getLogger("dlrm.engine.gpu")

CUDA_HOST_REGISTER_READ_ONLY = 0x08  # cudaHostRegisterReadOnly (CUDA 11.1+); default flags map and port it


HUGE_PAGE = 2 << 20  # x86-64 transparent huge page


class HostRowsError(ValueError):
    """The rows cannot be shared (not a file mapping of the whole table, or not contiguous)."""


def shared_cold_region(embeddings: np.ndarray, n_hot: int, n_cold: int,
                       page: int = mmap.PAGESIZE) -> tuple[np.ndarray, np.ndarray]:
    """(region, cold): `region` the whole pages of the mapping that hold rows [n_hot, n_hot + n_cold) (what
    to page-lock: cudaHostRegister works on whole pages), `cold` the [n_cold, dim] view of those rows in the
    same memory (what the kernel reads). Both are views of `embeddings`, which must be a C-contiguous
    mapping that starts on a page (np.memmap of the file from offset 0, as Artifact.open maps it)."""
    if not isinstance(embeddings, np.memmap) or embeddings.ndim != 2 or not embeddings.flags.c_contiguous:
        raise HostRowsError("the cold rows are shared only from a contiguous np.memmap of embeddings.int8")
    total, dim = embeddings.shape
    if not 0 <= n_hot <= total or not 0 < n_cold <= total - n_hot:
        raise HostRowsError(f"rows [{n_hot}, {n_hot + n_cold}) outside the table's {total}")
    flat = embeddings.reshape(-1).view(np.uint8)
    if int(flat.ctypes.data) % page:
        raise HostRowsError("the mapping does not start on a page")
    lo = n_hot * dim * embeddings.itemsize
    hi = (n_hot + n_cold) * dim * embeddings.itemsize
    region = flat[lo - lo % page: min(flat.size, -(-hi // page) * page)]
    return region, embeddings[n_hot:n_hot + n_cold]


def shared_cold_rows(host: "HostRegistry", device: str, embeddings: np.ndarray, n_hot: int,
                     n_cold: int) -> "torch.Tensor | None":
    """The cold rows in the model file's own pages, page-locked read-only through `host` (one copy per host
    for every engine); None, with a warning, where they cannot be (the engine then copies them)."""
    import torch

    try:
        region, cold = shared_cold_region(embeddings, n_hot, n_cold)
    except HostRowsError as exc:
        log.warning("%s: host_rows shared: %s; copying the cold rows instead", device, exc)
        return None
    if not host.register(region, CUDA_HOST_REGISTER_READ_ONLY):
        log.warning("%s: host_rows shared: cudaHostRegister (read-only) of %d bytes refused; copying the cold "
                    "rows instead", device, region.nbytes)
        return None
    log.info("%s: %d cold rows (%d bytes) read from the model file's pages, page-locked in place", device,
             n_cold, cold.nbytes)
    with warnings.catch_warnings():  # a read-only mapping: the kernel only reads it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(cold)


class HugeRows:
    """[rows, dim] int8 in anonymous memory aligned to 2 MiB with transparent huge pages asked for (the
    kernel grants them at first touch where /sys/kernel/mm/transparent_hugepage allows). Pure host memory:
    page-locking is the caller's. Keeps its mapping alive as long as it lives."""

    def __init__(self, rows: int, dim: int) -> None:
        if rows <= 0 or dim <= 0:
            raise HostRowsError(f"rows and dim must be positive, got {rows} x {dim}")
        nbytes = rows * dim
        self._map = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        whole = np.frombuffer(self._map, dtype=np.int8)
        skip = (-int(whole.ctypes.data)) % HUGE_PAGE
        self.huge_asked = False
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                self._map.madvise(mmap.MADV_HUGEPAGE, skip, nbytes)
                self.huge_asked = True
            except OSError as exc:  # a kernel without THP: 4 KiB pages, as cudaHostAlloc gives
                log.info("madvise(MADV_HUGEPAGE) refused (%s): cold rows in 4 KiB pages", exc)
        self.array = whole[skip:skip + nbytes].reshape(rows, dim)


def anon_huge_bytes() -> int:
    """This process's anonymous memory in transparent huge pages (/proc/self/smaps_rollup), -1 if unknown."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1


def private_cold_rows(host: "HostRegistry", device: str, embeddings: np.ndarray, n_hot: int, n_cold: int,
                      chunk_rows: int) -> "tuple[torch.Tensor, HugeRows] | None":
    """A private copy of rows [n_hot, n_hot + n_cold) in huge-page-backed memory page-locked through `host`
    (the tensor, and the HugeRows that owns its memory: keep both); None, with a warning, where the memory
    cannot be page-locked (the caller then uses cudaHostAlloc). bench/bench_host_read.py measures it."""
    import torch

    dim = embeddings.shape[1]
    before = anon_huge_bytes()
    rows = HugeRows(n_cold, dim)
    for a in range(0, n_cold, chunk_rows):  # the copy is the first touch: huge pages are granted here
        b = min(n_cold, a + chunk_rows)
        rows.array[a:b] = embeddings[n_hot + a:n_hot + b]
    huge = anon_huge_bytes() - before if before >= 0 else -1
    if not host.register(rows.array):
        log.warning("%s: cudaHostRegister of the %d-byte private cold copy refused; using cudaHostAlloc",
                    device, rows.array.nbytes)
        return None
    log.info("%s: %d cold rows (%d bytes) in a private page-locked copy, %d MB of it in huge pages", device,
             n_cold, rows.array.nbytes, huge >> 20)
    return torch.from_numpy(rows.array), rows
