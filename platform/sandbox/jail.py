"""Running untrusted code: bubblewrap namespaces, a seccomp filter, resource limits.

`sandbox_run(argv=..., workspace=..., limits=...)` runs one command and returns its
`Result`. Deny by default:

- Every namespace is new (user, pid, network, ipc, uts, cgroup): no network at all,
  no other process visible, the host's ids unmapped. `--die-with-parent` and
  `--new-session` (no terminal to push keystrokes into); the environment is cleared
  and only a fixed, harmless set of variables is given.
- The filesystem is built from nothing: `/usr` (and the `/bin`, `/lib` links or
  directories) read-only, a handful of files of `/etc` (never `shadow`, never the
  host's users), the sandbox's Python environment read-only, its own `/proc` and
  `/dev`, a private `/tmp`, and `/workspace`, a tmpfs of a fixed size: a disk fill ends
  at its size. Nothing of the project, its settings, other calls' workspaces or the
  worker's environment (database and Redis URLs, plugin secrets) exists in there.
- A seccomp filter (sandbox.seccomp) denies tracing, mounting, new namespaces, keys,
  bpf, userfaultfd, io_uring and every socket but AF_UNIX.
- Resource limits (`prlimit`): CPU seconds, address space, processes, open files, file
  size, no core dumps; output is capped by the reader here, wall time by the clock
  here. At a limit the sandbox's first process is killed, and with it the pid
  namespace: every process the code started, a double-forked `setsid` child included.
  A cgroup v2 directory, where the host delegates one (PARLEY_SANDBOX_CGROUP), adds
  memory, process and CPU limits for the whole tree and `cgroup.kill`.
- The processes run as an unprivileged user of the host. A worker running as root
  gives each concurrent call a user of its own (PARLEY_SANDBOX_UID_BASE + a slot), so
  the process limit counts that call's processes alone; otherwise the calls run as the
  worker's user, whose processes already running are added to the limit.

A workspace is a tar archive: unpacked into `/workspace` inside the sandbox before the
command, packed again after it, and returned (`Result.workspace`), so that the caller
keeps it between calls (sandbox.services) and no two calls ever share a directory.

Where namespaces cannot be created, `sandbox_run` raises `SandboxUnavailable` with the
reason, and `manage.py check` warns (sandbox.checks): code never runs unsandboxed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings

from sandbox import seccomp

WORKSPACE = "/workspace"
PROGRAMS = "/.parley"  # the caller's read-only files: the code to run, helpers
PYTHON = "/opt/python/bin/python"
ARCHIVE_IN = f"{PROGRAMS}/workspace-in.tar"
SANDBOX_UID = 65534  # the ids the code sees inside
HOSTNAME = "sandbox"
STARTUP_PROCESSES = 4  # prlimit/bwrap, bwrap's init in the namespace, the shell, tar

ENVIRONMENT = {
    "PATH": "/opt/python/bin:/usr/local/bin:/usr/bin:/bin",
    "HOME": WORKSPACE,
    "TMPDIR": "/tmp",  # noqa: S108 - the sandbox's own /tmp
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
    "MPLBACKEND": "Agg",
    "MPLCONFIGDIR": "/tmp/matplotlib",  # noqa: S108
    # Caches (fontconfig's, pip's...) in the private /tmp, never in the workspace.
    "XDG_CACHE_HOME": "/tmp/cache",  # noqa: S108
    # One thread per numerical library: the CPU limit is the sandbox's, and many
    # threads reserve address space that the memory limit counts.
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}

# Unpack the workspace, run the command, pack the workspace. The command's CPU times
# (the shell's `times`) and the packed workspace go out through the wrapper's standard
# input, one end of a socket pair, which the command never gets (its input is
# /dev/null). Exit status: the command's.
TIMES_END = "--parley-times--"
WRAPPER = f"""
cd {WORKSPACE} || exit 125
if [ -s {ARCHIVE_IN} ]; then
  tar -xf {ARCHIVE_IN} -C {WORKSPACE} --no-same-owner --no-same-permissions 2>/dev/null || {{
    echo "sandbox: the workspace could not be restored" >&2; exit 125; }}
fi
"$@" </dev/null
status=$?
empty=yes  # (with the shell's own globbing: no tar to start for an empty workspace)
for entry in {WORKSPACE}/* {WORKSPACE}/.[!.]* {WORKSPACE}/..?*; do
  if [ -e "$entry" ] || [ -L "$entry" ]; then empty=; break; fi
done
{{ times; echo "{TIMES_END}"; [ -n "$empty" ] || tar -cf - -C {WORKSPACE} . 2>/dev/null; }} >&0
exit $status
"""

ETC_FILES = {
    "passwd": f"root:x:0:0:root:/root:/bin/sh\nsandbox:x:{SANDBOX_UID}:{SANDBOX_UID}:"
    f"sandbox:{WORKSPACE}:/bin/sh\n",
    "group": f"root:x:0:\nsandbox:x:{SANDBOX_UID}:\n",
    "hosts": f"127.0.0.1 localhost {HOSTNAME}\n::1 localhost\n",
    "hostname": f"{HOSTNAME}\n",
    "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n",
}
# Read from the host's /etc where present: the dynamic linker's cache and what some
# programs look for. Nothing that names the host's users, secrets or services.
ETC_HOST = (
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "alternatives",
    "localtime",
    "mime.types",
    "fonts",  # fontconfig, for figures
)


class SandboxUnavailable(RuntimeError):
    """Code cannot be run sandboxed here; the message says why and what to do."""


@dataclass(frozen=True)
class Limits:
    wall_s: float = 30.0
    cpu_s: int = 20
    memory_bytes: int = 1 << 30  # address space of each process
    processes: int = 64
    open_files: int = 256
    file_bytes: int = 64 << 20
    output_bytes: int = 1 << 20  # stdout and stderr, each
    workspace_bytes: int = 256 << 20

    @classmethod
    def from_settings(cls) -> Limits:
        return cls(
            wall_s=wall_limit_s(),
            cpu_s=settings.PARLEY_SANDBOX_CPU_S,
            memory_bytes=settings.PARLEY_SANDBOX_MEMORY_MB << 20,
            processes=settings.PARLEY_SANDBOX_PROCESSES,
            open_files=settings.PARLEY_SANDBOX_OPEN_FILES,
            file_bytes=settings.PARLEY_SANDBOX_FILE_MB << 20,
            output_bytes=settings.PARLEY_SANDBOX_OUTPUT_KB << 10,
            workspace_bytes=settings.PARLEY_SANDBOX_WORKSPACE_MB << 20,
        )


def wall_limit_s() -> float:
    """The sandbox's wall limit, kept below the time an agent waits for a tool
    (PARLEY_TOOL_TIMEOUT_S), so that the model hears why the code stopped rather than
    that the tool never answered."""
    margin = min(10.0, settings.PARLEY_TOOL_TIMEOUT_S / 4)
    return max(1.0, min(settings.PARLEY_SANDBOX_WALL_S, settings.PARLEY_TOOL_TIMEOUT_S - margin))


@dataclass(frozen=True)
class FileChange:
    path: str  # relative to the workspace
    size: int
    sha256: str
    new: bool  # False: it was there before the call, with other content


@dataclass
class Result:
    exit_code: int | None  # None: stopped here at a limit before it ended
    stdout: str
    stderr: str
    # What ended it early: "time", "cpu", "output", "workspace" (a limit), "cancelled".
    stopped: str = ""
    wall_s: float = 0.0
    cpu_s: float = 0.0
    max_rss_bytes: int = 0
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    # The workspace after the call (a tar archive), or None when the call was stopped
    # before it could be packed: the caller keeps the one it had.
    workspace: bytes | None = None
    changed: list[FileChange] = field(default_factory=list)

    def file(self, path: str) -> bytes | None:
        """A file of the workspace after the call."""
        if self.workspace is None:
            return None
        return archive_files(self.workspace).get(path)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.stopped


# --- archives --------------------------------------------------------------------------


def archive_files(archive: bytes | None) -> dict[str, bytes]:
    """The regular files of a workspace archive, by relative path. Links, devices and
    paths that leave the archive are ignored: the archive came out of a sandbox."""
    files: dict[str, bytes] = {}
    if not archive:
        return files
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            path = os.path.normpath(member.name)
            if path.startswith(("/", "..")) or path == ".":
                continue
            extracted = tar.extractfile(member)
            if extracted is not None:
                files[path] = extracted.read()
    return files


def archive_of(files: dict[str, bytes]) -> bytes:
    """A workspace archive holding `files` (relative paths), for a first call."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:") as tar:
        for path, data in sorted(files.items()):
            name = os.path.normpath(path)
            if name.startswith(("/", "..")) or name == ".":
                raise ValueError(f"not a relative path: {path!r}")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _digests(archive: bytes | None) -> dict[str, str]:
    return {path: hashlib.sha256(data).hexdigest() for path, data in archive_files(archive).items()}


def archive_changes(before: bytes | None, after: bytes) -> list[FileChange]:
    """The files that are new or different after a call."""
    old = _digests(before)
    changes = []
    for path, data in sorted(archive_files(after).items()):
        digest = hashlib.sha256(data).hexdigest()
        if old.get(path) != digest:
            changes.append(FileChange(path, len(data), digest, new=path not in old))
    return changes


# --- the host side ---------------------------------------------------------------------


def _bwrap() -> str:
    found = shutil.which(settings.PARLEY_SANDBOX_BWRAP)
    if not found:
        raise SandboxUnavailable(
            "bubblewrap is not installed, so code cannot run sandboxed "
            "(Debian/Ubuntu: apt-get install bubblewrap; `make run` installs it)."
        )
    return found


def _python_binds() -> list[str]:
    """Binds for the sandbox's Python environment (a virtual environment made from a
    Python every user may read: see the Makefile's `sandbox-python`), mounted at
    /opt/python, plus its base installation where that is not under /usr."""
    env = Path(settings.PARLEY_SANDBOX_PYTHON)
    config = env / "pyvenv.cfg"
    if not (env / "bin" / "python").exists():
        raise SandboxUnavailable(
            f"the sandbox's Python environment is missing ({env.name}): "
            "`make run` or `make sandbox` creates it."
        )
    binds = ["--ro-bind", str(env), "/opt/python"]
    if config.exists():
        for line in config.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "home":
                base = Path(os.path.realpath(value.strip())).parent
                if not str(base).startswith("/usr"):
                    binds += ["--ro-bind", str(base), str(base)]
    return binds


def _slots_dir() -> Path:
    """Where a root worker's calls take their host users (lock files; the sandbox
    itself reads nothing here)."""
    slots = Path(settings.VAR_DIR) / "sandbox" / "slots"
    slots.mkdir(parents=True, exist_ok=True)
    slots.chmod(0o700)
    return slots


class _Files:
    """Files the sandbox gets copied in by bubblewrap (`--ro-bind-data`) from memory
    descriptors: nothing on the host's disk that the sandbox's user would need to
    reach (the worker's folders may well be closed to it)."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        self.args: list[str] = []

    def add(self, data: bytes, destination: str) -> None:
        fd = os.memfd_create("parley-sandbox", 0)  # close-on-exec off: bwrap reads it
        self.fds.append(fd)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
        self.args += ["--ro-bind-data", str(fd), destination]

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _root_binds(files: _Files) -> list[str]:
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = Path("/") / name
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), f"/{name}"]
        elif path.is_dir():
            args += ["--ro-bind", str(path), f"/{name}"]
    args += ["--dir", "/etc"]
    for name, text in ETC_FILES.items():
        files.add(text.encode(), f"/etc/{name}")
    for name in ETC_HOST:
        args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    return args


def bwrap_args(*, seccomp_fd: int, files: _Files, limits: Limits) -> list[str]:
    """bubblewrap's arguments up to the command (`files` gets what is copied in)."""
    return [
        _bwrap(),
        "--unshare-user",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup",
        "--uid",
        str(SANDBOX_UID),
        "--gid",
        str(SANDBOX_UID),
        "--hostname",
        HOSTNAME,
        "--die-with-parent",
        "--new-session",
        "--clearenv",
        "--cap-drop",
        "ALL",
        *[arg for name, value in ENVIRONMENT.items() for arg in ("--setenv", name, value)],
        *_root_binds(files),
        *_python_binds(),
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        # Every writable place has a size: /dev only keeps its device nodes, shared
        # memory and /tmp are small tmpfs mounts, /workspace is the workspace's size.
        "--size",
        str(16 << 20),
        "--tmpfs",
        "/dev/shm",  # noqa: S108
        "--remount-ro",
        "/dev",
        "--size",
        str(64 << 20),
        "--tmpfs",
        "/tmp",  # noqa: S108
        "--size",
        str(limits.workspace_bytes),
        "--tmpfs",
        WORKSPACE,
        "--dir",
        PROGRAMS,
        *files.args,
        "--remount-ro",
        "/",
        "--chdir",
        WORKSPACE,
        "--seccomp",
        str(seccomp_fd),
    ]


@contextlib.contextmanager
def _host_user(slots_dir: Path) -> Iterator[tuple[int | None, int]]:
    """(uid to switch to or None, processes of that user already running)."""
    if os.geteuid() != 0:
        yield None, _processes_of(os.getuid())
        return
    slots = settings.PARLEY_SANDBOX_SLOTS
    deadline = time.monotonic() + wall_limit_s()
    while True:
        for slot in range(slots):
            handle = open(slots_dir / f"{slot}.lock", "a")  # noqa: SIM115
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:
                uid = settings.PARLEY_SANDBOX_UID_BASE + slot
                # The last call's processes may still be on their way out.
                yield uid, _processes_of(uid)
            finally:
                handle.close()
            return
        if time.monotonic() > deadline:
            raise SandboxUnavailable("every sandbox slot is busy; try again shortly.")
        time.sleep(0.05)


def _processes_of(uid: int) -> int:
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if entry.stat().st_uid == uid:
                    count += 1
    return count


def _launcher(*, uid: int | None, running: int, limits: Limits) -> list[str]:
    """What starts bubblewrap: the user switch and the resource limits, by exec (no
    code runs between fork and exec in this process)."""
    cpu = limits.cpu_s
    args = []
    if uid is not None:
        args += [
            shutil.which("setpriv") or "setpriv",
            f"--reuid={uid}",
            f"--regid={uid}",
            "--clear-groups",
            "--inh-caps=-all",
        ]
    args += [
        shutil.which("prlimit") or "prlimit",
        f"--cpu={cpu}:{cpu + 1}",
        f"--as={limits.memory_bytes}",
        f"--nproc={running + limits.processes + STARTUP_PROCESSES}",
        f"--nofile={limits.open_files}",
        f"--fsize={limits.file_bytes}",
        "--core=0",
        "--",
    ]
    return args


class _Cgroup:
    """A cgroup v2 directory for one call, where PARLEY_SANDBOX_CGROUP names a
    delegated one; nothing otherwise."""

    def __init__(self, limits: Limits) -> None:
        self.path: Path | None = None
        parent = settings.PARLEY_SANDBOX_CGROUP
        if not parent:
            return
        path = Path(parent) / f"call-{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}"
        try:
            path.mkdir()
        except OSError:
            return
        self.path = path
        total = limits.processes + STARTUP_PROCESSES
        for name, value in (
            ("memory.max", str(limits.memory_bytes)),
            ("memory.swap.max", "0"),
            ("pids.max", str(total)),
            ("cpu.max", "100000 100000"),  # one core
        ):
            with contextlib.suppress(OSError):
                (path / name).write_text(value)

    def enter(self, argv: list[str]) -> list[str]:
        """`argv` started inside the cgroup: a shell moves itself in, then execs it."""
        if self.path is None:
            return argv
        procs = str(self.path / "cgroup.procs")
        return ["/bin/sh", "-c", 'echo 0 > "$0" && exec "$@"', procs, *argv]

    def kill(self) -> None:
        if self.path is not None:
            with contextlib.suppress(OSError):
                (self.path / "cgroup.kill").write_text("1")

    def remove(self) -> None:
        if self.path is None:
            return
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                self.kill()
                time.sleep(0.01)


class _Reader(threading.Thread):
    """Drains one pipe, keeping at most `cap` bytes; calls `over` once past the cap."""

    def __init__(self, fd: int, cap: int, over: threading.Event) -> None:
        super().__init__(daemon=True)
        self.fd = fd
        self.cap = cap
        self.over = over
        self.data = bytearray()
        self.truncated = False

    def run(self) -> None:
        try:
            while chunk := os.read(self.fd, 65536):
                room = self.cap - len(self.data)
                if len(chunk) > room:
                    self.data += chunk[: max(0, room)]
                    self.truncated = True
                    self.over.set()
                    # Keep draining, so the writer is never stuck on a full pipe.
                    continue
                self.data += chunk
        except OSError:
            pass
        finally:
            os.close(self.fd)


def _kill(pid: int, cgroup: _Cgroup) -> None:
    cgroup.kill()
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def sandbox_run(
    *,
    argv: list[str],
    workspace: bytes | None = None,
    programs: dict[str, bytes] | None = None,
    limits: Limits | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> Result:
    """Run `argv` in a new sandbox, in /workspace (unpacked from `workspace`), with
    `programs` (name -> bytes) readable under /.parley. `cancelled()` true stops it
    (the run was cancelled): `Result.stopped` "cancelled"."""
    limits = limits or Limits.from_settings()
    files = _Files()
    seccomp_fd = seccomp.filter_fd()
    cgroup = _Cgroup(limits)
    try:
        for name, data in (programs or {}).items():
            if "/" in name or name.startswith("."):
                raise ValueError(f"not a program name: {name!r}")
            files.add(data, f"{PROGRAMS}/{name}")
        if workspace:
            files.add(workspace, ARCHIVE_IN)
        sandbox = bwrap_args(seccomp_fd=seccomp_fd, files=files, limits=limits)
        with _host_user(_slots_dir()) as (uid, running):
            command = [
                *_launcher(uid=uid, running=running, limits=limits),
                *sandbox,
                "/bin/sh",
                "-c",
                WRAPPER,
                "sandbox",
                *argv,
            ]
            return _supervise(
                cgroup.enter(command),
                (seccomp_fd, *files.fds),
                limits,
                workspace,
                cgroup,
                cancelled,
            )
    finally:
        os.close(seccomp_fd)
        files.close()
        cgroup.remove()


def _supervise(
    command: list[str],
    pass_fds: tuple[int, ...],
    limits: Limits,
    before: bytes | None,
    cgroup: _Cgroup,
    cancelled: Callable[[], bool] | None,
) -> Result:
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    over_output = threading.Event()
    over_workspace = threading.Event()
    readers = [
        _Reader(out_r, limits.output_bytes, over_output),
        _Reader(err_r, limits.output_bytes, over_output),
        # The packed workspace: the tmpfs's size plus tar's headers and padding.
        _Reader(os.dup(here.fileno()), limits.workspace_bytes + (8 << 20), over_workspace),
    ]
    here.close()
    started = time.monotonic()
    try:
        process = subprocess.Popen(  # noqa: S603 - our own launcher and bubblewrap
            command,
            stdin=there.fileno(),
            stdout=out_w,
            stderr=err_w,
            pass_fds=pass_fds,
            env={"PATH": "/usr/bin:/bin"},
            close_fds=True,
            start_new_session=True,
        )
    except OSError as exc:
        for reader in readers:
            os.close(reader.fd)
        raise SandboxUnavailable(f"the sandbox could not start: {exc}") from exc
    finally:
        there.close()
        os.close(out_w)
        os.close(err_w)
    for reader in readers:
        reader.start()

    waited: dict[str, object] = {}
    ended = threading.Event()

    def wait() -> None:
        _, status, usage = os.wait4(process.pid, 0)
        waited.update(status=status, usage=usage)
        process.returncode = os.waitstatus_to_exitcode(status)
        ended.set()

    threading.Thread(target=wait, daemon=True).start()
    stopped = ""
    deadline = started + limits.wall_s
    peak_rss = 0
    pause = 0.005  # the first samples of memory come early: most calls are short
    while not ended.wait(timeout=max(0.0, min(pause, deadline - time.monotonic()))):
        pause = min(pause * 2, 0.05)
        peak_rss = max(peak_rss, _tree_rss(process.pid))
        if over_output.is_set():
            stopped = "output"
        elif over_workspace.is_set():
            stopped = "workspace"
        elif time.monotonic() >= deadline:
            stopped = "time"
        elif cancelled is not None and cancelled():
            stopped = "cancelled"
        if stopped:
            _kill(process.pid, cgroup)
            ended.wait()
            break
    wall = time.monotonic() - started
    for reader in readers:
        reader.join(timeout=5)
    exit_code: int | None = process.returncode
    stderr = bytes(readers[1].data).decode("utf-8", "replace")
    sent = bytes(readers[2].data)
    wrapped = f"{TIMES_END}\n".encode() in sent or exit_code == 125
    if not stopped and not wrapped and re.match(r"(bwrap|setpriv|prlimit): ", stderr):
        # The command never started: the sandbox could not be set up.
        raise SandboxUnavailable(f"the sandbox could not start: {stderr.strip()[-500:]}")
    cpu, after = _times_and_archive(sent)
    if not stopped and exit_code == 128 + signal.SIGXCPU:
        stopped = "cpu"
    if stopped in ("time", "output", "workspace", "cancelled"):
        exit_code = None
    if exit_code is None or readers[2].truncated:
        after = None  # killed here before it was packed: the caller keeps its workspace
    return Result(
        exit_code=exit_code,
        stdout=bytes(readers[0].data).decode("utf-8", "replace"),
        stderr=stderr,
        stopped=stopped,
        wall_s=wall,
        cpu_s=cpu,
        max_rss_bytes=peak_rss,
        stdout_truncated=readers[0].truncated,
        stderr_truncated=readers[1].truncated,
        workspace=after,
        changed=archive_changes(before, after) if after is not None else [],
    )


def _tree_rss(pid: int) -> int:
    """The resident memory of a process and its descendants now, in bytes (the
    largest of their peaks when that is more): sampled, as no single count of the
    kernel covers a tree that lives in another pid namespace."""
    total = peak = 0
    pending = [pid]
    seen = 0
    while pending and seen < 4096:
        current = pending.pop()
        seen += 1
        try:
            status = Path(f"/proc/{current}/status").read_text()
            for task in os.scandir(f"/proc/{current}/task"):
                children = Path(task.path, "children").read_text().split()
                pending.extend(int(child) for child in children)
        except (OSError, ValueError):
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        total += _kilobytes(fields.get("VmRSS", "0 kB")) * 1024
        peak = max(peak, _kilobytes(fields.get("VmHWM", "0 kB")) * 1024)
    return max(total, peak)


def _kilobytes(value: str) -> int:
    try:
        return int(value.split()[0])
    except (IndexError, ValueError):
        return 0


def _times_and_archive(data: bytes) -> tuple[float, bytes | None]:
    """What the wrapper sent back: the command's CPU seconds (user + system of the
    shell's children, from `times`) and the packed workspace (b"" for an empty one),
    or None when it is not a readable archive (the call was stopped before it was
    packed, or the code wrote over it: the caller keeps the workspace it had)."""
    head, marker, archive = data.partition(f"{TIMES_END}\n".encode())
    if not marker:
        return 0.0, None
    lines = head.decode("ascii", "replace").split("\n")
    cpu = 0.0
    if len(lines) >= 2:
        for value in re.findall(r"(\d+)m([\d.]+)s", lines[1]):
            cpu += int(value[0]) * 60 + float(value[1])
    return cpu, archive if not archive or _is_archive(archive) else None


def _is_archive(data: bytes) -> bool:
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            tar.getmembers()
    except (tarfile.TarError, EOFError):
        return False
    return True


# --- can this host sandbox at all? ---------------------------------------------------------

_probe_lock = threading.Lock()
# The last answer for each configuration: (when, the problem or "").
_probes: dict[tuple[str, str], tuple[float, str]] = {}
PROBE_RETRY_S = 60.0


def sandbox_problem() -> str:
    """Why code cannot run sandboxed here, or "" when it can. Runs a trivial command
    through the whole sandbox once (and again a minute after a failure)."""
    key = (settings.PARLEY_SANDBOX_BWRAP, settings.PARLEY_SANDBOX_PYTHON)
    with _probe_lock:
        now = time.monotonic()
        known = _probes.get(key)
        if known is not None and (not known[1] or now - known[0] < PROBE_RETRY_S):
            return known[1]
        try:
            result = sandbox_run(argv=["/bin/true"], limits=Limits(wall_s=10))
            problem = (
                "" if result.exit_code == 0 else f"a trivial command failed: {result.stderr[-300:]}"
            )
        except (SandboxUnavailable, seccomp.UnsupportedArch, OSError) as exc:
            problem = str(exc)
        _probes[key] = (now, problem)
        return problem


def sandbox_check() -> None:
    """Raise SandboxUnavailable unless code can run sandboxed here."""
    problem = sandbox_problem()
    if problem:
        raise SandboxUnavailable(problem)
