"""Which system calls a command makes outside a systemd SystemCallFilter= allow list, and whether it runs
under that filter (issue 14, item 9: derive the daemon's filter on the GPU machine, which runs no systemd).

    python3 bench/syscall_audit.py audit   [--allow FILE] [--extra NAME,..] -- CMD ARG..
    python3 bench/syscall_audit.py enforce [--allow FILE] [--extra NAME,..] -- CMD ARG..
    python3 bench/syscall_audit.py dump-group @system-service > systemd/syscalls-system-service.txt

`audit` runs CMD (and everything it starts: a seccomp filter is inherited) under a filter that allows the
listed calls and hands every other call to this process (seccomp user notification), which records it and
lets it proceed; at the end it prints each unlisted call with its count, and `--json` writes them. CMD runs
as it would without the filter. `enforce` runs CMD under the filter as systemd applies it: an unlisted call
kills the process (SIGSYS), so CMD completing shows the list is enough. The allow list is
systemd's @system-service and @default expanded (`dump-group`, made with systemd-analyze 252; the file is
read where no systemd-analyze exists) plus `--extra`. Needs libseccomp (libseccomp.so.2, 2.5 or later) and
Linux 5.5 or later.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import select
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ALLOW = ROOT / "systemd" / "syscalls-system-service.txt"

SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_NOTIFY = 0x7FC00000
SCMP_ACT_ALLOW = 0x7FFF0000
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1


class SeccompData(ctypes.Structure):
    _fields_ = [("nr", ctypes.c_int), ("arch", ctypes.c_uint32), ("instruction_pointer", ctypes.c_uint64),
                ("args", ctypes.c_uint64 * 6)]


class SeccompNotif(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("pid", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("data", SeccompData)]


class SeccompNotifResp(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("val", ctypes.c_int64), ("error", ctypes.c_int32),
                ("flags", ctypes.c_uint32)]


def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    lib = ctypes.CDLL(name, use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_notify_fd.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_syscall_resolve_num_arch.restype = ctypes.c_void_p  # a malloc'd char * (leaked: few calls)
    lib.seccomp_syscall_resolve_num_arch.argtypes = [ctypes.c_uint32, ctypes.c_int]
    lib.seccomp_notify_alloc.argtypes = [ctypes.POINTER(ctypes.POINTER(SeccompNotif)),
                                         ctypes.POINTER(ctypes.POINTER(SeccompNotifResp))]
    lib.seccomp_notify_receive.argtypes = [ctypes.c_int, ctypes.POINTER(SeccompNotif)]
    lib.seccomp_notify_respond.argtypes = [ctypes.c_int, ctypes.POINTER(SeccompNotifResp)]
    return lib


def expand_group(group: str) -> list[str]:
    """The system calls of a systemd group (groups inside it expanded) from `systemd-analyze syscall-filter`."""
    text = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True, text=True, check=True).stdout
    groups: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        if not line.startswith(" "):
            current = item
            groups[current] = []
        else:
            groups[current].append(item)

    def walk(name: str, seen: set[str]) -> set[str]:
        out: set[str] = set()
        for item in groups.get(name, []):
            if item.startswith("@"):
                if item not in seen:
                    out |= walk(item, seen | {item})
            else:
                out.add(item)
        return out
    return sorted(walk(group, {group}))


def allow_list(path: Path, extra: list[str]) -> list[str]:
    names = [n.strip() for n in path.read_text().splitlines() if n.strip() and not n.startswith("#")]
    return sorted(set(names) | set(extra))


def _run(mode: str, allowed: list[str], cmd: list[str], pid_file: Path | None) -> tuple[int, Counter[str]]:
    lib = _lib()
    parent_sock, child_sock = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the child: load the filter, hand its notification fd over (audit), exec CMD
        try:
            parent_sock.close()
            ctx = lib.seccomp_init(SCMP_ACT_NOTIFY if mode == "audit" else SCMP_ACT_KILL_PROCESS)
            for name in allowed:
                nr = lib.seccomp_syscall_resolve_name(name.encode())
                if nr >= 0:  # names of other architectures (e.g. *_time64 on x86-64) do not resolve
                    if lib.seccomp_rule_add(ctx, SCMP_ACT_ALLOW, nr, 0) < 0:
                        os._exit(96)
            if lib.seccomp_load(ctx) < 0:
                os._exit(97)
            fd = lib.seccomp_notify_fd(ctx) if mode == "audit" else -1
            socket.send_fds(child_sock, [b"x"], [fd] if fd >= 0 else [])
            child_sock.close()
            os.execvp(cmd[0], cmd)
        except BaseException as exc:  # noqa: BLE001  (the child must never return into the parent's code)
            os.write(2, f"syscall_audit: {type(exc).__name__}: {exc}\n".encode())
        finally:
            os._exit(98)
    child_sock.close()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # a service manager signals us: pass it on
        signal.signal(sig, lambda signum, _frame: os.kill(pid, signum))
    if pid_file is not None:
        pid_file.write_text(f"{pid}\n")
    _, fds, _, _ = socket.recv_fds(parent_sock, 1, 1)
    parent_sock.close()
    seen: Counter[str] = Counter()
    if mode == "audit" and fds:
        fd = fds[0]
        req = ctypes.POINTER(SeccompNotif)()
        resp = ctypes.POINTER(SeccompNotifResp)()
        if lib.seccomp_notify_alloc(ctypes.byref(req), ctypes.byref(resp)) < 0:
            raise OSError("seccomp_notify_alloc failed")
        names: dict[int, str] = {}
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP)
        while True:
            events = poller.poll(500)
            if any(ev & select.POLLHUP for _, ev in events):
                break  # every process under the filter has exited
            if not events:
                continue
            ctypes.memset(req, 0, ctypes.sizeof(SeccompNotif))
            if lib.seccomp_notify_receive(fd, req) < 0:
                continue  # the caller died meanwhile
            nr = req.contents.data.nr
            if nr not in names:
                p = lib.seccomp_syscall_resolve_num_arch(req.contents.data.arch, nr)
                names[nr] = ctypes.string_at(p).decode() if p else f"nr{nr}"
            seen[names[nr]] += 1
            resp.contents.id = req.contents.id
            resp.contents.val = 0
            resp.contents.error = 0
            resp.contents.flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE  # run it as if allowed
            lib.seccomp_notify_respond(fd, resp)
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), seen


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cmd = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["audit", "enforce", "dump-group"])
    ap.add_argument("group", nargs="?", default="@system-service")
    ap.add_argument("--allow", type=Path, default=DEFAULT_ALLOW)
    ap.add_argument("--extra", default="", help="comma list of calls allowed besides the file's")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--pid-file", type=Path, default=None, help="write CMD's pid here (to signal it)")
    args = ap.parse_args(argv)
    if args.mode == "dump-group":
        names = sorted(set(expand_group(args.group)) | set(expand_group("@default")))
        print(f"# systemd {args.group} with @default (always allowed), expanded by systemd-analyze "
              f"syscall-filter (bench/syscall_audit.py dump-group)")
        print("\n".join(names))
        return 0
    if not cmd:
        ap.error("give the command after --")
    allowed = allow_list(args.allow, [e for e in args.extra.split(",") if e])
    code, seen = _run(args.mode, allowed, cmd, args.pid_file)
    if args.mode == "audit":
        print(f"\n== {len(seen)} system calls outside the allow list ({args.allow.name} + {args.extra or 'no extra'}):")
        for name, count in seen.most_common():
            print(f"  {name} {count}")
        if args.json:
            args.json.write_text(json.dumps({"exit_code": code, "outside": dict(seen)}, indent=1))
    print(f"command exit code {code} under the {args.mode} filter", file=sys.stderr)
    return code if code >= 0 else 128 - code  # killed by a signal: 128 + its number, as a shell says


if __name__ == "__main__":
    raise SystemExit(main())
