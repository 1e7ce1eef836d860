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

Where a private copy lives was measured too: 2 MiB transparent huge pages page-locked with cudaHostRegister
read random rows at the rate of cudaHostAlloc's 4 KiB pages and gave the same end-to-end rate on an H100
(BENCHMARKS.md "Round 8"), so a private copy stays in cudaHostAlloc; the probe is bench/bench_host_read.py.
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

