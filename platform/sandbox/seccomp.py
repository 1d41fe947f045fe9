"""The sandbox's seccomp filter: a classic BPF program that bubblewrap loads (`--seccomp
FD`) just before it runs the command, so it binds the command and every process it
starts, and cannot be lifted from inside.

Denied with EPERM: tracing other processes (ptrace, process_vm_*), mounting and
changing root, new namespaces (unshare, setns, clone with a CLONE_NEW* flag), kernel
keys, bpf, userfaultfd, perf events, io_uring (its operations would bypass this
filter), kernel modules, kexec, reboot, swap, accounting, handles to files by inode,
setting clocks. `socket` is allowed for AF_UNIX only (EAFNOSUPPORT otherwise), so
nothing reaches a network even where a namespace would let it. `clone3` answers ENOSYS,
as Docker's and Flatpak's filters do: its flags sit in memory that BPF cannot read, and
the C library falls back to `clone`, which is checked. System calls of another ABI
(32-bit or x32 on x86_64) are refused, so no second table sidesteps the list.

Written by hand rather than through libseccomp so that no C library or binding is a
requirement; the numbers are those of the kernel's tables (a test compares them with
the installed kernel headers where they exist).
"""

from __future__ import annotations

import errno
import os
import platform
import struct
from dataclasses import dataclass

# BPF opcodes (linux/bpf_common.h, linux/filter.h).
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06

# seccomp return actions (linux/seccomp.h).
_ALLOW = 0x7FFF0000
_KILL_PROCESS = 0x80000000
_ERRNO = 0x00050000

# Offsets into struct seccomp_data: nr, arch, instruction pointer, args[6] (64-bit
# each; the low word comes first on little-endian machines).
_NR = 0
_ARCH = 4
_ARG0_LOW = 16

AF_UNIX = 1
# CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET. (CLONE_NEWTIME,
# 0x80, only exists for unshare and clone3; in clone's flags those bits are the exit
# signal.)
CLONE_NEW_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000
CLONE_NEW_FLAGS |= 0x20000000 | 0x40000000
X32_SYSCALL_BIT = 0x40000000

DENIED = (
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "pidfd_getfd",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "open_tree",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "unshare",
    "setns",
    "keyctl",
    "add_key",
    "request_key",
    "bpf",
    "userfaultfd",
    "perf_event_open",
    "fanotify_init",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "open_by_handle_at",
    "name_to_handle_at",
    "syslog",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "vhangup",
)


@dataclass(frozen=True)
class Arch:
    name: str
    audit: int  # AUDIT_ARCH_* (linux/audit.h)
    numbers: dict[str, int]
    x32: bool = False  # x86_64 also accepts x32 calls, marked by X32_SYSCALL_BIT


_X86_64 = Arch(
    name="x86_64",
    audit=0xC000003E,
    x32=True,
    numbers={
        "socket": 41,
        "clone": 56,
        "clone3": 435,
        "ptrace": 101,
        "process_vm_readv": 310,
        "process_vm_writev": 311,
        "pidfd_getfd": 438,
        "mount": 165,
        "umount2": 166,
        "pivot_root": 155,
        "chroot": 161,
        "open_tree": 428,
        "move_mount": 429,
        "fsopen": 430,
        "fsconfig": 431,
        "fsmount": 432,
        "fspick": 433,
        "mount_setattr": 442,
        "unshare": 272,
        "setns": 308,
        "keyctl": 250,
        "add_key": 248,
        "request_key": 249,
        "bpf": 321,
        "userfaultfd": 323,
        "perf_event_open": 298,
        "fanotify_init": 300,
        "io_uring_setup": 425,
        "io_uring_enter": 426,
        "io_uring_register": 427,
        "init_module": 175,
        "finit_module": 313,
        "delete_module": 176,
        "kexec_load": 246,
        "kexec_file_load": 320,
        "reboot": 169,
        "swapon": 167,
        "swapoff": 168,
        "acct": 163,
        "quotactl": 179,
        "open_by_handle_at": 304,
        "name_to_handle_at": 303,
        "syslog": 103,
        "settimeofday": 164,
        "clock_settime": 227,
        "clock_adjtime": 305,
        "adjtimex": 159,
        "vhangup": 153,
    },
)

_AARCH64 = Arch(
    name="aarch64",
    audit=0xC00000B7,
    numbers={
        "socket": 198,
        "clone": 220,
        "clone3": 435,
        "ptrace": 117,
        "process_vm_readv": 270,
        "process_vm_writev": 271,
        "pidfd_getfd": 438,
        "mount": 40,
        "umount2": 39,
        "pivot_root": 41,
        "chroot": 51,
        "open_tree": 428,
        "move_mount": 429,
        "fsopen": 430,
        "fsconfig": 431,
        "fsmount": 432,
        "fspick": 433,
        "mount_setattr": 442,
        "unshare": 97,
        "setns": 268,
        "keyctl": 219,
        "add_key": 217,
        "request_key": 218,
        "bpf": 280,
        "userfaultfd": 282,
        "perf_event_open": 241,
        "fanotify_init": 262,
        "io_uring_setup": 425,
        "io_uring_enter": 426,
        "io_uring_register": 427,
        "init_module": 105,
        "finit_module": 273,
        "delete_module": 106,
        "kexec_load": 104,
        "kexec_file_load": 294,
        "reboot": 142,
        "swapon": 224,
        "swapoff": 225,
        "acct": 89,
        "quotactl": 60,
        "open_by_handle_at": 265,
        "name_to_handle_at": 264,
        "syslog": 116,
        "settimeofday": 170,
        "clock_settime": 112,
        "clock_adjtime": 266,
        "adjtimex": 171,
        "vhangup": 58,
    },
)

ARCHES = {"x86_64": _X86_64, "amd64": _X86_64, "aarch64": _AARCH64, "arm64": _AARCH64}


class UnsupportedArch(RuntimeError):
    pass


def host_arch() -> Arch:
    machine = platform.machine().lower()
    if machine not in ARCHES:
        raise UnsupportedArch(f"no seccomp filter for the {machine} architecture")
    return ARCHES[machine]


def _errno(code: int) -> int:
    return _ERRNO | (code & 0xFFFF)


def filter_program(arch: Arch | None = None) -> bytes:
    """The filter as bubblewrap reads it: struct sock_filter entries, native order."""
    arch = arch or host_arch()
    # Instructions with symbolic jump targets, resolved once the layout is known.
    code: list[tuple[int, str | int, str | int, int]] = []
    labels: dict[str, int] = {}

    def emit(op: int, k: int, jt: str | int = 0, jf: str | int = 0) -> None:
        code.append((op, jt, jf, k))

    def label(name: str) -> None:
        labels[name] = len(code)

    emit(_LD_W_ABS, _ARCH)
    emit(_JEQ_K, arch.audit, 0, "kill")
    emit(_LD_W_ABS, _NR)
    if arch.x32:
        emit(_JGE_K, X32_SYSCALL_BIT, "enosys", 0)
    for name in DENIED:
        emit(_JEQ_K, arch.numbers[name], "eperm", 0)
    emit(_JEQ_K, arch.numbers["clone3"], "enosys", 0)
    emit(_JEQ_K, arch.numbers["clone"], "clone", 0)
    emit(_JEQ_K, arch.numbers["socket"], "socket", 0)
    emit(_RET_K, _ALLOW)
    # (BPF only jumps forwards: each branch ends in its own return.)
    label("clone")
    emit(_LD_W_ABS, _ARG0_LOW)
    emit(_JSET_K, CLONE_NEW_FLAGS, "eperm", 0)
    emit(_RET_K, _ALLOW)
    label("socket")
    emit(_LD_W_ABS, _ARG0_LOW)
    emit(_JEQ_K, AF_UNIX, 0, 1)
    emit(_RET_K, _ALLOW)
    emit(_RET_K, _errno(errno.EAFNOSUPPORT))
    label("eperm")
    emit(_RET_K, _errno(errno.EPERM))
    label("enosys")
    emit(_RET_K, _errno(errno.ENOSYS))
    label("kill")
    emit(_RET_K, _KILL_PROCESS)

    out = bytearray()
    for index, (op, jt, jf, k) in enumerate(code):
        offsets = []
        for target in (jt, jf):
            # A jump counts the instructions it skips after the next one.
            skip = labels[target] - index - 1 if isinstance(target, str) else target
            if not 0 <= skip <= 255:
                raise ValueError(f"BPF jump out of range at {index}")
            offsets.append(skip)
        out += struct.pack("=HBBI", op, offsets[0], offsets[1], k)
    return bytes(out)


def filter_fd(arch: Arch | None = None) -> int:
    """A readable descriptor holding the program (a pipe; the program is well under a
    pipe's buffer), for bubblewrap's `--seccomp`. The caller closes it."""
    program = filter_program(arch)
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, program)
    finally:
        os.close(write_end)
    return read_end
