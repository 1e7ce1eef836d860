"""Complete LoadGen samples without a Python object per sample: LoadGen's own C entry point.

The Python binding's `QuerySamplesComplete` wants one `QuerySampleResponse` object per sample, built
while holding the GIL (the REFERENCE's suspect for Server latency). LoadGen also contains its C API,
`mlperf::c::QuerySamplesComplete(QuerySampleResponse*, size_t)`, compiled into the same extension module
but not exported. We find it in the module's ELF symbol table, check that the bytes at the computed
address are that function's code, and call it through ctypes, which releases the GIL for the call. The
responses are a numpy structured array filled with array operations.

If anything does not match (stripped module, other layout), `load()` returns None and the driver uses
the Python binding.
"""
from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path
from typing import Callable

import mlperf_loadgen as lg
import numpy as np

log = logging.getLogger("loadgen_driver")

C_COMPLETE = b"_ZN6mlperf1c20QuerySamplesCompleteEPNS_19QuerySampleResponseEm"
C_CONSTRUCT_SUT = b"_ZN6mlperf1c12ConstructSUTEmPKcmPFvmPKNS_11QuerySampleEmEPFvvE"
C_DESTROY_SUT = b"_ZN6mlperf1c10DestroySUTEPv"
C_REGISTER_ISSUE_THREAD = b"_ZN6mlperf1c24RegisterIssueQueryThreadEv"  # void(): returns at the test's end
ANCHOR = b"PyInit_mlperf_loadgen"

# void IssueQueryCallback(ClientData, const QuerySample*, size_t); void FlushQueriesCallback(void)
ISSUE_CB = ctypes.CFUNCTYPE(None, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t)
FLUSH_CB = ctypes.CFUNCTYPE(None)

# loadgen/query_sample.h: {ResponseId id; uintptr_t data; size_t size; int64_t n_tokens} (6.x);
# 5.x and older had no n_tokens.
RESPONSE_DTYPE = np.dtype([("id", "<u8"), ("data", "<u8"), ("size", "<u8"), ("n_tokens", "<i8")])
RESPONSE_DTYPE_OLD = np.dtype([("id", "<u8"), ("data", "<u8"), ("size", "<u8")])

_SYM = np.dtype([("name", "<u4"), ("info", "u1"), ("other", "u1"), ("shndx", "<u2"),
                 ("value", "<u8"), ("size", "<u8")])
_SHDR = np.dtype([("name", "<u4"), ("type", "<u4"), ("flags", "<u8"), ("addr", "<u8"),
                  ("offset", "<u8"), ("size", "<u8"), ("link", "<u4"), ("info", "<u4"),
                  ("addralign", "<u8"), ("entsize", "<u8")])


def _symbols(blob: bytes, names: list[bytes]) -> dict[bytes, tuple[int, int]]:
    """{name: (st_value, file offset of the code)} for the names found in .symtab (ELF64 LE)."""
    if blob[:4] != b"\x7fELF" or blob[4] != 2 or blob[5] != 1:
        return {}
    shoff = int.from_bytes(blob[0x28:0x30], "little")
    shnum = int.from_bytes(blob[0x3C:0x3E], "little")
    sh = np.frombuffer(blob, _SHDR, count=shnum, offset=shoff)
    out: dict[bytes, tuple[int, int]] = {}
    for symtab in sh[sh["type"] == 2]:  # SHT_SYMTAB
        strtab = sh[symtab["link"]]
        strings = blob[int(strtab["offset"]):int(strtab["offset"] + strtab["size"])]
        syms = np.frombuffer(blob, _SYM, count=int(symtab["size"]) // _SYM.itemsize,
                             offset=int(symtab["offset"]))
        for name in names:
            pos = strings.find(b"\0" + name + b"\0")
            if pos < 0:
                continue
            hit = syms[syms["name"] == pos + 1]
            if len(hit) and int(hit[0]["shndx"]) < shnum:
                sec = sh[int(hit[0]["shndx"])]
                value = int(hit[0]["value"])
                out[name] = (value, value - int(sec["addr"]) + int(sec["offset"]))
    return out


class CComplete:
    """`complete(ids, ptrs, sizes)`: one C call for a whole batch, GIL released."""

    def __init__(self, fn: ctypes._CFuncPtr, dtype: np.dtype) -> None:  # type: ignore[name-defined]
        self._fn = fn
        self.dtype = dtype
        self._local = threading.local()  # a response buffer per calling thread, reused (no allocation)

    def complete(self, ids: np.ndarray, ptrs: np.ndarray | int, sizes: np.ndarray | int) -> None:
        n = len(ids)
        if n == 0:
            return
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < n:
            buf = self._local.buf = np.zeros(max(n, 1 << 14), dtype=self.dtype)  # n_tokens stays 0
        buf = buf[:n]
        buf["id"] = ids
        buf["data"] = ptrs
        buf["size"] = sizes
        self._fn(buf.ctypes.data, n)


def _addresses(names: list[bytes]) -> dict[bytes, int] | None:
    """In-memory addresses of the named functions of the loaded module, each checked against the
    function's code bytes in the file; None if any is missing or does not match."""
    so = Path(lg.__file__)
    blob = so.read_bytes()
    found = _symbols(blob, [*names, ANCHOR])
    if any(n not in found for n in (*names, ANCHOR)):
        log.info("LoadGen C API symbols not found in %s; using the Python binding", so)
        return None
    lib = ctypes.CDLL(str(so))  # the module is loaded already: same mapping
    anchor_addr = ctypes.cast(getattr(lib, ANCHOR.decode()), ctypes.c_void_p).value
    if anchor_addr is None:
        return None
    base = int(anchor_addr) - found[ANCHOR][0]
    out = {}
    for name in names:
        value, file_off = found[name]
        if ctypes.string_at(base + value, 32) != blob[file_off:file_off + 32]:
            log.warning("LoadGen C API address check failed; using the Python binding")
            return None
        out[name] = base + value
    return out


class CSut:
    """A SUT made by LoadGen's C `ConstructSUT`: IssueQuery gets a pointer to the QuerySample array,
    handed on as numpy views (the callee copies what it keeps) with no Python object per sample. `handle` goes to
    `lg.StartTestWithLogSettings` like a Python-binding SUT handle (both are SystemUnderTest objects)."""

    def __init__(self, issue: "Callable[[np.ndarray, np.ndarray], None]", flush: "Callable[[], None]",
                 addrs: dict[bytes, int]) -> None:
        def on_issue(_client: int, samples: int, n: int) -> None:
            pairs = np.ctypeslib.as_array((ctypes.c_uint64 * (2 * n)).from_address(samples)).reshape(n, 2)
            # Views of LoadGen's array, valid during this call: `issue` copies what it keeps, a chunk at a
            # time (whole-array copies of Offline's 26 M samples held back its first requests ~0.5 s).
            issue(pairs[:, 0], pairs[:, 1].view(np.int64))

        self._issue_cb = ISSUE_CB(on_issue)  # referenced for the SUT's lifetime
        self._flush_cb = FLUSH_CB(flush)
        construct = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_uint64, ctypes.c_char_p, ctypes.c_size_t,
                                     ISSUE_CB, FLUSH_CB)(addrs[C_CONSTRUCT_SUT])
        self._destroy = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(addrs[C_DESTROY_SUT])
        name = b"dlrm-daemon-loadgen-driver"
        self.handle = int(construct(0, name, len(name), self._issue_cb, self._flush_cb))

    def destroy(self) -> None:
        self._destroy(self.handle)


def construct_sut(issue: "Callable[[np.ndarray, np.ndarray], None]",
                  flush: "Callable[[], None]") -> CSut | None:
    """A C-API SUT whose issue callback receives (response ids uint64, sample indices int64)."""
    try:
        addrs = _addresses([C_CONSTRUCT_SUT, C_DESTROY_SUT])
    except (OSError, AttributeError, ValueError) as exc:
        log.info("LoadGen C API unavailable (%s)", exc)
        return None
    return None if addrs is None else CSut(issue, flush, addrs)


def load() -> CComplete | None:
    """The C completion entry point of the loaded mlperf_loadgen module, or None (reason logged)."""
    try:
        addrs = _addresses([C_COMPLETE])
        if addrs is None:
            return None
        fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_size_t)(addrs[C_COMPLETE])
    except (OSError, AttributeError, ValueError) as exc:
        log.info("LoadGen C API unavailable (%s); using the Python binding", exc)
        return None
    try:
        lg.QuerySampleResponse(0, 0, 0, 0)  # the 4-field layout has the n_tokens constructor
        dtype = RESPONSE_DTYPE
    except TypeError:
        dtype = RESPONSE_DTYPE_OLD
    return CComplete(fn, dtype)
