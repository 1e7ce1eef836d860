"""CPU time of every thread of some processes over an interval, busiest first (from /proc, no tracer attached).

py-spy sees Python threads only; LoadGen's own C++ threads (issue, logging) and the C threads of the issue ring
are invisible to it, and a Python thread inside a C call looks idle or busy by its OS state alone. /proc's
per-thread utime + stime tells which thread of which process has run out of core, whoever made it:

    python3 bench/thread_cpu.py --match "loadgen_driver.cli" --match "daemon.cli" --seconds 4
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import time
from pathlib import Path


def thread_ticks(pid: int) -> dict[int, tuple[str, int]]:
    """{tid: (thread name, utime + stime in clock ticks)} of one process; empty if it is gone."""
    out: dict[int, tuple[str, int]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # the name may hold spaces or parentheses: split after it
        out[int(tid)] = (name, int(fields[11]) + int(fields[12]))
    return out


def busiest(pids: dict[int, str], seconds: float) -> list[tuple[float, int, int, str]]:
    """(share of one core, pid, tid, thread name) for every thread that ran, busiest first."""
    before = {pid: thread_ticks(pid) for pid in pids}
    time.sleep(seconds)
    hz = os.sysconf("SC_CLK_TCK")
    rows = []
    for pid in pids:
        for tid, (name, ticks) in thread_ticks(pid).items():
            used = (ticks - before[pid].get(tid, (name, 0))[1]) / hz / seconds
            if used > 0:
                rows.append((used, pid, tid, name))
    return sorted(rows, reverse=True)


def python_thread_names(pid: int, py_spy: str | None) -> dict[int, str]:
    """{tid: Python thread name} from `py-spy dump` where py-spy is found. A thread it does not list runs no
    Python (LoadGen's C++ threads, the ring's C threads, CUDA's), or the dump missed it (it can fail while
    the process runs): such threads print as "unnamed"."""
    if py_spy is None:
        return {}
    dump = subprocess.run([py_spy, "dump", "--nonblocking", "-p", str(pid)], capture_output=True, text=True).stdout
    return {int(m[1]): m[2] for m in re.finditer(r'^Thread (?:0x)?(\d+) \(\w+\): "([^"]*)"', dump, re.M)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--match", action="append", default=[], help="pgrep -f pattern (repeatable)")
    ap.add_argument("--pid", type=int, action="append", default=[])
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--top", type=int, default=24)
    ap.add_argument("--repeat", type=int, default=1, help="windows one after the other (processes found anew)")
    ap.add_argument("--py-spy", default=shutil.which("py-spy"), help="names Python threads (default: on PATH)")
    args = ap.parse_args()
    for window in range(args.repeat):
        pids = {pid: f"pid {pid}" for pid in args.pid}
        for pattern in args.match:
            found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
            for pid in map(int, found):
                if pid != os.getpid():
                    pids.setdefault(pid, pattern)
        rows = busiest(pids, args.seconds)
        names: dict[int, str] = {}
        for pid in {row[1] for row in rows}:
            names.update(python_thread_names(pid, args.py_spy))
        total = sum(r[0] for r in rows)
        print(f"== window {window}: {len(pids)} processes, {len(rows)} threads ran, {total:.2f} cores in all "
              f"over {args.seconds:g} s", flush=True)
        for used, pid, tid, name in rows[:args.top]:
            print(f"{used:6.1%}  {pids[pid][:28]:28s} tid {tid:<8d} {names.get(tid, name + ' (unnamed)')}",
                  flush=True)


if __name__ == "__main__":
    main()
