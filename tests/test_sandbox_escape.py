"""The sandbox's escape suite: real attempts to get out, each of which must fail with a
clear result and leave the host as it was (sandbox.jail, sandbox.seccomp).

Runs wherever bubblewrap is installed (`make test` installs it); a host where it is
installed but cannot create namespaces fails here rather than skipping.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import textwrap
import time
from pathlib import Path

import pytest
from django.conf import settings

from sandbox import seccomp
from sandbox.jail import (
    PYTHON,
    Limits,
    SandboxUnavailable,
    archive_files,
    archive_of,
    sandbox_problem,
    sandbox_run,
)

ROOT = Path(__file__).resolve().parents[1]
QUICK = Limits(wall_s=10, cpu_s=5, memory_bytes=1 << 30, processes=32, workspace_bytes=32 << 20)

pytestmark = pytest.mark.skipif(
    shutil.which("bwrap") is None, reason="bubblewrap is not installed (make test installs it)"
)


@pytest.fixture(scope="module", autouse=True)
def sandbox_works():
    assert sandbox_problem() == "", sandbox_problem()


def python(code: str, *, limits: Limits = QUICK, workspace: bytes | None = None):
    return sandbox_run(
        argv=[PYTHON, "/.parley/main.py"],
        programs={"main.py": textwrap.dedent(code).encode()},
        limits=limits,
        workspace=workspace,
    )


def shell(script: str, *, limits: Limits = QUICK):
    return sandbox_run(argv=["/bin/sh", "-c", script], limits=limits)


def sandbox_processes() -> list[int]:
    """Host processes still running as one of the sandbox's users."""
    users = range(settings.PARLEY_SANDBOX_UID_BASE, settings.PARLEY_SANDBOX_UID_BASE + 1000)
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid in users:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def host_unchanged():
    """Nothing the sandbox started is left running on the host."""
    deadline = time.monotonic() + 3
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_processes() == []


# --- it works at all ----------------------------------------------------------------------


def test_python_runs_with_numpy_and_reports_usage():
    result = python(
        "import numpy as np\nblock = np.ones(50_000_000, dtype=np.uint8)\n"
        "print(int(np.arange(10).sum()))\nsum(range(3_000_000))"
    )
    assert result.ok, result.stderr
    assert result.stdout == "45\n"
    assert result.cpu_s > 0.02 and result.wall_s >= result.cpu_s * 0.5
    assert 50 << 20 < result.max_rss_bytes < 1 << 30


def test_workspace_goes_in_and_comes_out_with_the_changes():
    before = archive_of({"data.csv": b"a,b\n1,2\n", "keep.txt": b"same"})
    result = python(
        "import pandas as pd\n"
        "frame = pd.read_csv('data.csv')\n"
        "frame['c'] = frame.a + frame.b\n"
        "frame.to_csv('data.csv', index=False)\n"
        "open('new.txt', 'w').write('hello')\n",
        workspace=before,
    )
    assert result.ok, result.stderr
    files = archive_files(result.workspace)
    assert files["data.csv"] == b"a,b,c\n1,2,3\n"
    assert files["keep.txt"] == b"same"
    changed = {change.path: change.new for change in result.changed}
    assert changed == {"data.csv": False, "new.txt": True}


def test_concurrent_calls_never_share_a_workspace():
    from concurrent.futures import ThreadPoolExecutor

    def one(n: int):
        return python(
            f"import os, time\nopen('mine-{n}', 'w').write('x')\ntime.sleep(0.3)\n"
            "print(sorted(os.listdir('.')))"
        )

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    for n, result in enumerate(results):
        assert result.ok, result.stderr
        assert result.stdout.strip() == f"['mine-{n}']"


# --- the network ------------------------------------------------------------------------


def test_no_tcp_to_postgresql_redis_or_outside():
    result = python(
        """
        import socket, json
        out = {}
        for name, address in [("postgres", ("127.0.0.1", 5432)), ("redis", ("127.0.0.1", 6379)),
                              ("outside", ("1.1.1.1", 80)), ("v6", ("::1", 5432))]:
            family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
            try:
                s = socket.socket(family, socket.SOCK_STREAM)
                s.settimeout(2)
                s.connect(address)
                out[name] = "connected"
            except OSError as exc:
                out[name] = exc.errno
        print(json.dumps(out))
        """
    )
    assert result.exit_code == 0, result.stderr
    assert set(json.loads(result.stdout).values()) == {97}  # EAFNOSUPPORT, for every one


def test_no_dns_raw_or_netlink_sockets():
    result = python(
        """
        import socket, json
        out = {}
        try:
            socket.getaddrinfo("example.com", 80)
            out["dns"] = "resolved"
        except OSError as exc:
            out["dns"] = type(exc).__name__
        for name, args in [("raw", (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)),
                           ("netlink", (socket.AF_NETLINK, socket.SOCK_RAW, 0)),
                           ("packet", (socket.AF_PACKET, socket.SOCK_RAW, 0))]:
            try:
                socket.socket(*args)
                out[name] = "opened"
            except OSError as exc:
                out[name] = exc.errno
        a, b = socket.socketpair()  # AF_UNIX stays usable: multiprocessing needs it
        a.send(b"x"); out["unix"] = b.recv(1).decode()
        print(json.dumps(out))
        """
    )
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["dns"] == "gaierror"
    assert (out["raw"], out["netlink"], out["packet"], out["unix"]) == (97, 97, 97, "x")


def test_host_unix_sockets_are_not_there():
    result = shell(
        "ls /var/run/postgresql /run/postgresql 2>&1; echo in-tmp: $(ls -A /tmp | wc -l)"
    )
    assert result.stdout.count("No such file") == 2
    assert result.stdout.strip().endswith("in-tmp: 0")  # a private, empty /tmp


# --- files ------------------------------------------------------------------------------


def test_project_settings_and_host_secrets_are_not_visible():
    targets = [
        str(ROOT / "manage.py"),
        str(ROOT / "platform" / "config" / "settings" / "base.py"),
        str(Path(settings.VAR_DIR) / "secret_key"),
        "/etc/shadow",
        "/etc/gshadow",
        "/root/.bash_history",
        str(Path(settings.VAR_DIR) / "sandbox" / "slots"),
    ]
    result = python(
        f"""
        import json, os
        out = {{}}
        for path in {targets!r}:
            try:
                with open(path) as f:
                    out[path] = "read " + f.read(20)
            except OSError as exc:
                out[path] = exc.errno
        out["sys"] = os.listdir("/sys") if os.path.exists("/sys") else "absent"
        out["etc"] = sorted(os.listdir("/etc"))
        print(json.dumps(out))
        """
    )
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    for path in targets:
        assert out[path] in (2, 21), (path, out[path])  # ENOENT (or EISDIR for no dir)
    assert out["sys"] == "absent"
    assert "shadow" not in out["etc"] and "passwd" in out["etc"]


def test_the_workers_environment_and_host_processes_are_not_visible(monkeypatch):
    monkeypatch.setenv("PARLEY_ESCAPE_SECRET", "s3cr3t-value")
    result = shell(
        "env; echo ---; for f in /proc/[0-9]*/environ; do tr '\\0' '\\n' < $f; done; "
        "echo ---; ls /proc | grep -c '^[0-9]'"
    )
    assert result.exit_code == 0, result.stderr
    environ, proc_environ, count = result.stdout.split("---\n")
    for secret in ("s3cr3t-value", "DATABASE_URL", "REDIS_URL", "DJANGO_SECRET_KEY", "PARLEY_"):
        assert secret not in environ and secret not in proc_environ
    assert int(count) <= 6  # bubblewrap's init, the wrapper, the shell, its pipeline


def test_writing_outside_the_workspace_fails_and_tmp_is_private():
    marker = f"parley-escape-{os.getpid()}-{time.monotonic_ns()}"
    result = python(
        f"""
        import json
        out = {{}}
        for path in ["/usr/{marker}", "/etc/{marker}", "/opt/python/{marker}",
                     "/.parley/{marker}", "/{marker}", "/proc/{marker}", "/dev/{marker}"]:
            try:
                open(path, "w").write("x")
                out[path] = "written"
            except OSError as exc:
                out[path] = exc.errno
        open("/tmp/{marker}", "w").write("private")
        print(json.dumps(out))
        """
    )
    assert result.exit_code == 0, result.stderr
    assert "written" not in json.loads(result.stdout).values()
    assert not Path("/tmp", marker).exists()  # noqa: S108 - the host's /tmp


def test_another_calls_workspace_is_not_reachable():
    from concurrent.futures import ThreadPoolExecutor

    secret = f"other-workspace-{time.monotonic_ns()}"
    with ThreadPoolExecutor(2) as pool:
        holder = pool.submit(
            python,
            "import time\ntime.sleep(1.5)",
            workspace=archive_of({"secret.txt": secret.encode()}),
        )
        time.sleep(0.5)
        # The seeker's own program must not hold the secret: it is put together there.
        # It looks for the other call's file by name everywhere, and for its content in
        # every place that can be written to.
        head, tail = secret[:6], secret[6:]
        seeker = python(
            f"""
            import subprocess
            secret = {head!r} + {tail!r}
            found = subprocess.run(
                ["find", "/", "-name", "secret.txt", "-not", "-path", "/proc/*"],
                capture_output=True, text=True).stdout
            found += subprocess.run(
                ["grep", "-rl", secret, "/tmp", "/workspace", "/dev/shm", "/.parley", "/etc"],
                capture_output=True, text=True).stdout
            print(found)
            """
        )
        assert holder.result().ok
    assert seeker.exit_code == 0, seeker.stderr
    assert seeker.stdout.strip() == ""


# --- limits ------------------------------------------------------------------------------


def test_fork_bomb_is_contained():
    started = time.monotonic()
    result = python(
        """
        import os
        children = 0
        try:
            while True:
                if os.fork() == 0:
                    while True:
                        try:
                            os.fork()
                        except OSError:
                            pass
                children += 1
        except OSError as exc:
            print("fork failed after", children, exc.errno, flush=True)
            os._exit(3)
        """,
        limits=Limits(wall_s=4, cpu_s=5, processes=16),
    )
    assert time.monotonic() - started < 8
    assert "fork failed" in result.stdout or result.stopped == "time"
    host_unchanged()


def test_memory_bomb_gets_memory_error():
    result = python(
        "try:\n    block = bytearray(4 << 30)\nexcept MemoryError:\n    print('MemoryError')\n",
        limits=Limits(wall_s=10, memory_bytes=512 << 20),
    )
    assert result.stdout == "MemoryError\n"


def test_infinite_loop_is_stopped_by_the_cpu_limit():
    result = python("while True:\n    pass\n", limits=Limits(wall_s=10, cpu_s=1))
    assert result.stopped == "cpu"
    assert result.exit_code == 128 + 24  # SIGXCPU
    assert 0.5 <= result.cpu_s < 4  # (the shell's `times` counts in ticks)
    assert result.workspace is not None  # the wrapper still packed it


def test_sleeping_forever_is_stopped_by_the_wall_limit():
    started = time.monotonic()
    result = shell("sleep 1000", limits=Limits(wall_s=1))
    assert result.stopped == "time" and result.exit_code is None
    assert result.workspace is None
    assert time.monotonic() - started < 4
    host_unchanged()


def test_disk_fill_ends_at_the_workspace_size():
    result = python(
        """
        import errno
        written = 0
        try:
            with open("fill", "wb") as f:
                while True:
                    f.write(b"x" * (1 << 20)); f.flush(); written += 1
        except OSError as exc:
            print(errno.errorcode[exc.errno], written)
        """,
        limits=Limits(wall_s=10, workspace_bytes=8 << 20, file_bytes=64 << 20),
    )
    code, written = result.stdout.split()
    assert code == "ENOSPC" and int(written) <= 8


def test_a_file_larger_than_the_file_limit_fails():
    result = python(
        "open('big', 'wb').write(b'x' * (4 << 20))",
        limits=Limits(wall_s=10, file_bytes=1 << 20),
    )
    assert result.exit_code != 0  # SIGXFSZ or EFBIG
    assert len(archive_files(result.workspace).get("big", b"")) <= 1 << 20


def test_output_flood_is_cut_and_stopped():
    result = python(
        "import sys\nwhile True:\n    sys.stdout.write('y' * 65536)\n",
        limits=Limits(wall_s=10, output_bytes=100_000),
    )
    assert result.stopped == "output"
    assert result.stdout_truncated and len(result.stdout) == 100_000
    host_unchanged()


def test_descriptor_exhaustion_fails_cleanly():
    result = python(
        """
        import os
        fds = []
        try:
            while True:
                fds.append(os.open("/dev/null", os.O_RDONLY))
        except OSError as exc:
            print("EMFILE" if exc.errno == 24 else exc.errno, len(fds) < 100)
        """,
        limits=Limits(wall_s=10, open_files=64),
    )
    assert result.stdout.strip() == "EMFILE True"


def test_setsid_and_double_fork_do_not_outlive_the_call():
    marker = f"parley-outlive-{time.monotonic_ns()}"
    result = shell(
        f"(setsid sh -c 'exec -a {marker} sleep 60' &) ; "
        f"( (nohup sh -c 'exec -a {marker} sleep 60' >/dev/null 2>&1 &) & ) ; echo started",
    )
    assert result.stdout.strip() == "started"
    host_unchanged()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                assert marker not in Path(entry.path, "cmdline").read_text()
            except OSError:
                continue


def test_setsid_child_is_killed_at_the_wall_limit():
    shell("setsid sh -c 'sleep 60' & sleep 60", limits=Limits(wall_s=1))
    host_unchanged()


# --- kernel interfaces -------------------------------------------------------------------


def test_seccomp_denies_ptrace_mount_unshare_keys_bpf_userfaultfd():
    numbers = seccomp.host_arch().numbers
    calls = {name: numbers[name] for name in seccomp.DENIED}
    result = python(
        f"""
        import ctypes, json, os
        libc = ctypes.CDLL(None, use_errno=True)
        out = {{}}
        for name, number in {calls!r}.items():
            if name in ("reboot", "vhangup"):
                continue  # harmless either way here, but never worth trying
            ctypes.set_errno(0)
            rc = libc.syscall(number, 0, 0, 0, 0, 0, 0)
            out[name] = (rc, ctypes.get_errno())
        status = open("/proc/self/status").read().splitlines()
        out["seccomp"] = [line for line in status if line.startswith("Seccomp:")][0]
        out["no_new_privs"] = [line for line in status if line.startswith("NoNewPrivs")][0]
        print(json.dumps(out))
        """
    )
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out.pop("seccomp").split() == ["Seccomp:", "2"]
    assert out.pop("no_new_privs").split() == ["NoNewPrivs:", "1"]
    assert {name: tuple(value) for name, value in out.items() if tuple(value) != (-1, 1)} == {}


def test_new_namespaces_and_nested_sandboxes_are_refused():
    result = shell(
        "unshare -r id 2>&1; echo rc=$?; unshare -n true 2>&1; echo rc=$?; "
        "bwrap --ro-bind / / true 2>&1; echo rc=$?"
    )
    lines = result.stdout.splitlines()
    assert [line for line in lines if line.startswith("rc=")] == ["rc=1", "rc=1", "rc=1"], lines
    assert "Operation not permitted" in result.stdout


def test_setuid_binaries_do_not_raise_privileges():
    setuid = [
        path
        for path in ("/usr/bin/su", "/usr/bin/passwd", "/usr/bin/mount", "/usr/bin/chsh")
        if Path(path).exists() and os.stat(path).st_mode & 0o4000
    ]
    assert setuid, "no setuid binary on this host to try"
    result = python(
        f"""
        import os, subprocess
        print(os.geteuid())
        for path in {setuid!r}:
            try:
                subprocess.run([path, "--version"], capture_output=True, text=True)
            except OSError:
                pass  # not even started: the owner of the file is no one in here
        try:
            os.setuid(0)
            print("setuid worked")
        except OSError:  # EINVAL: no one is root in here
            print("setuid refused")
        print(subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip())
        """
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout.split() == ["65534", "setuid", "refused", "65534"]


def test_hostile_workspace_archives_stay_inside():
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:") as tar:
        for name, kind, target in [
            ("../escape.txt", tarfile.REGTYPE, ""),
            ("/abs.txt", tarfile.REGTYPE, ""),
            ("link", tarfile.SYMTYPE, "/etc/passwd"),
            ("hard", tarfile.LNKTYPE, "/etc/hostname"),
        ]:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = target
            tar.addfile(info, io.BytesIO(b""))
    hostile = sandbox_run(
        argv=["/bin/sh", "-c", "echo ran"], workspace=buffer.getvalue(), limits=QUICK
    )
    # Refused with a reason before the command runs; nothing written anywhere else.
    assert hostile.exit_code == 125 and hostile.stdout == ""
    assert "the workspace could not be restored" in hostile.stderr
    assert not Path(settings.VAR_DIR, "sandbox", "escape.txt").exists()
    assert not Path(settings.VAR_DIR, "escape.txt").exists()
    # Links a sandbox packed itself come back in its archive, and are never read out.
    made = shell("ln -s /etc/passwd link && ln -s ../../x up && echo x > plain")
    assert set(archive_files(made.workspace)) == {"plain"}


# --- failing closed ------------------------------------------------------------------------


def test_without_bubblewrap_it_refuses_and_never_runs_unsandboxed(settings, tmp_path):
    settings.PARLEY_SANDBOX_BWRAP = str(tmp_path / "no-bwrap")
    marker = tmp_path / "ran"
    with pytest.raises(SandboxUnavailable, match="bubblewrap is not installed"):
        sandbox_run(argv=["/bin/sh", "-c", f"touch {marker}"])
    assert not marker.exists()


def test_the_wall_limit_stays_below_the_tool_timeout(settings):
    from sandbox.jail import wall_limit_s

    settings.PARLEY_SANDBOX_WALL_S = 300
    settings.PARLEY_TOOL_TIMEOUT_S = 60
    assert wall_limit_s() < 60


def test_seccomp_numbers_match_the_kernel_headers():
    headers = {
        "x86_64": Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
        "aarch64": Path("/usr/include/asm-generic/unistd.h"),
    }
    checked = 0
    for arch_name, header in headers.items():
        if not header.exists():
            continue
        text = header.read_text()
        arch = seccomp.ARCHES[arch_name]
        for name, number in arch.numbers.items():
            found = re.search(rf"#define __NR(?:3264)?_{name}\s+(\d+)", text)
            if found:
                assert int(found.group(1)) == number, (arch_name, name)
                checked += 1
    if not checked:
        pytest.skip("no kernel headers to compare with")
    assert checked > 40


def test_manage_py_check_warns_where_code_cannot_run_sandboxed(settings, tmp_path):
    from django.core.management import call_command
    from django.core.management.base import SystemCheckError

    call_command("check", "--fail-level", "WARNING")  # here it can: no warning
    settings.PARLEY_SANDBOX_BWRAP = str(tmp_path / "no-bwrap")
    with pytest.raises(SystemCheckError, match=r"sandbox\.W001.*bubblewrap is not installed"):
        call_command("check", "--fail-level", "WARNING")


def _cgroup2_mount() -> Path | None:
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup2":
            return Path(fields[1])
    return None


def test_a_delegated_cgroup_holds_each_call_and_goes_with_it(settings):
    import threading

    mount = _cgroup2_mount()
    parent = mount / f"parley-test-{os.getpid()}" if mount else None
    try:
        assert parent is not None
        parent.mkdir()
    except (AssertionError, OSError):
        pytest.skip("this host delegates no cgroup v2 directory to the tests")
    try:
        settings.PARLEY_SANDBOX_CGROUP = str(parent)
        seen: list[int] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                for child in parent.iterdir():
                    if child.is_dir():
                        procs = (child / "cgroup.procs").read_text().split()
                        seen.append(len(procs))
                time.sleep(0.02)

        watcher = threading.Thread(target=watch)
        watcher.start()
        result = shell("setsid sleep 60 & sleep 60", limits=Limits(wall_s=1))
        stop.set()
        watcher.join()
        assert result.stopped == "time"
        assert seen and max(seen) >= 3  # bubblewrap, its init, the shell, the sleeps
        assert [child for child in parent.iterdir() if child.is_dir()] == []
        host_unchanged()
    finally:
        for child in parent.iterdir():
            if child.is_dir():
                child.rmdir()
        parent.rmdir()


def test_a_sandbox_that_cannot_be_set_up_is_refused_with_bubblewraps_reason(settings):
    import tempfile

    # A fake bubblewrap that fails as bubblewrap does where user namespaces are off
    # (in a folder the sandbox's unprivileged user can read).
    folder = Path(tempfile.mkdtemp())
    folder.chmod(0o755)
    fake = folder / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: setting up uid map: Permission denied' >&2\nexit 1\n")
    fake.chmod(0o755)
    settings.PARLEY_SANDBOX_BWRAP = str(fake)
    try:
        with pytest.raises(SandboxUnavailable, match="setting up uid map: Permission denied"):
            sandbox_run(argv=["/bin/true"], limits=QUICK)
    finally:
        shutil.rmtree(folder)


def test_a_crashing_program_is_a_result_and_the_next_call_runs():
    crashed = python("import ctypes\nctypes.string_at(0)")
    assert crashed.exit_code == 128 + 11  # SIGSEGV, reported by the wrapper's shell
    assert crashed.workspace is not None  # the workspace still came back
    assert python("print('next')").stdout == "next\n"


def test_a_figure_leaves_only_itself_in_the_workspace_and_nothing_on_stderr():
    result = python(
        "import matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.title('text needs fonts')\n"
        "plt.savefig('plot.png')"
    )
    assert result.ok and result.stderr == ""
    assert list(archive_files(result.workspace)) == ["plot.png"]  # no caches
