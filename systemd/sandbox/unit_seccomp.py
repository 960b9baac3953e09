"""Exec a command under the seccomp filters systemd 252 would build from cxr-node.service (a test aid).

Reads the unit (and drop-ins) given with --unit, expands the system call groups with ``systemd-analyze
syscall-filter``, and loads, like systemd: the SystemCallFilter= allow-list (EPERM with
SystemCallErrorNumber=EPERM, else kill), MemoryDenyWriteExecute= (systemd 252 uses seccomp for it),
RestrictAddressFamilies= and RestrictNamespaces=yes. Needs python3-seccomp (Debian) and /usr/bin/python3.

    python3 unit_seccomp.py --unit cxr-node.service [--unit gpu.conf] [--kill] -- COMMAND...
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import subprocess
import sys
from functools import cache
from pathlib import Path

import seccomp

PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)


@cache
def expand(group: str) -> frozenset[str]:
    """Return the system calls of a systemd group (@name), recursively."""
    out = subprocess.run(["systemd-analyze", "syscall-filter", group], capture_output=True, text=True, check=True)
    names: set[str] = set()
    for line in out.stdout.splitlines()[1:]:
        item = line.strip()
        if item and not item.startswith("#"):
            names |= expand(item) if item.startswith("@") else {item}
    return frozenset(names)


def read_units(paths: list[str]) -> dict[str, list[str]]:
    """Return the unit's directives, values in file order, drop-ins after the unit."""
    found: dict[str, list[str]] = {}
    for path in paths:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
                key, _, value = line.partition("=")
                found.setdefault(key.strip(), []).append(value.strip())
    return found


def allowed_syscalls(filters: list[str]) -> set[str]:
    """Apply SystemCallFilter= lines as systemd does: an allow-list, then ~ lines remove, plain lines add."""
    allowed: set[str] = set()
    for line in filters:
        deny = line.startswith("~")
        for item in line.lstrip("~").split():
            names = expand(item) if item.startswith("@") else {item}
            allowed = allowed - names if deny else allowed | names
    return allowed


def load_allow_list(allowed: set[str], kill: bool) -> None:
    action = seccomp.KILL_PROCESS if kill else seccomp.ERRNO(errno.EPERM)
    allow = seccomp.SyscallFilter(defaction=action)
    for name in sorted(allowed):
        with contextlib.suppress(RuntimeError, ValueError, OSError):  # a name this architecture lacks
            allow.add_rule(seccomp.ALLOW, name)
    allow.load()


def load_restrictions(directives: dict[str, list[str]]) -> None:
    rules = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    if directives.get("MemoryDenyWriteExecute", ["no"])[-1] == "yes":
        both = PROT_WRITE | PROT_EXEC
        rules.add_rule(seccomp.ERRNO(errno.EPERM), "mmap", seccomp.Arg(2, seccomp.MASKED_EQ, both, both))
        for name in ("mprotect", "pkey_mprotect"):
            rules.add_rule(seccomp.ERRNO(errno.EPERM), name, seccomp.Arg(2, seccomp.MASKED_EQ, PROT_EXEC, PROT_EXEC))
        rules.add_rule(seccomp.ERRNO(errno.EPERM), "shmat", seccomp.Arg(2, seccomp.MASKED_EQ, SHM_EXEC, SHM_EXEC))
    families = " ".join(directives.get("RestrictAddressFamilies", [])).split()
    if families:
        keep = {int(getattr(socket, name)) for name in families}
        for family in set(range(46)) - keep:
            rules.add_rule(seccomp.ERRNO(errno.EAFNOSUPPORT), "socket", seccomp.Arg(0, seccomp.EQ, family))
    if directives.get("RestrictNamespaces", ["no"])[-1] == "yes":
        rules.add_rule(seccomp.ERRNO(errno.EPERM), "unshare")
        rules.add_rule(seccomp.ERRNO(errno.EPERM), "setns")
        for flag in NAMESPACE_FLAGS:
            rules.add_rule(seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    rules.load()


def main(argv: list[str]) -> None:
    units, kill = [], False
    while argv and argv[0] != "--":
        flag = argv.pop(0)
        if flag == "--unit":
            units.append(argv.pop(0))
        elif flag == "--kill":
            kill = True
        else:
            sys.exit(f"unknown option {flag}")
    command = argv[1:]
    directives = read_units(units)
    allowed = allowed_syscalls(directives.get("SystemCallFilter", []))
    kill = kill or "SystemCallErrorNumber" not in directives
    load_restrictions(directives)
    load_allow_list(allowed, kill)  # last: it forbids seccomp() itself
    print(f"unit_seccomp: {len(allowed)} system calls allowed, others {'kill' if kill else 'EPERM'}", file=sys.stderr)
    os.execvp(command[0], command)  # noqa: S606  - replacing this process is the point


if __name__ == "__main__":
    main(sys.argv[1:])
