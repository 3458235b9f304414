"""The code sandbox contains hostile completions, records them as failures and keeps running.

Each layer is tested on its own: the audit-hook guard, and with the guard OFF the OS boundary
(bubblewrap as an unprivileged uid: process limit, read-only file system, no network). The hostile
programs of tests/test_sandbox_hostile.py attack the sandbox itself, as root and as a normal user.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from decodebench.tasks.sandbox import CHILD_MARKER, SandboxLimits, run_program
from decodebench.tasks.sandbox_child import make_guard

# generous wall clock for programs that end by themselves (a loaded CI machine starts Python slowly);
# a short one where the timeout itself is under test
FAST = SandboxLimits(timeout_s=15, cpu_time_s=10, memory_mb=384)
SHORT = SandboxLimits(timeout_s=1.5, cpu_time_s=2, memory_mb=384)


@pytest.fixture(scope="module", autouse=True)
def workdir_root():
    """This module's sandbox work dirs are made in a folder of its own (``tempfile.tempdir``), so that
    sandbox_children() sees this module's programs only, not those that another pytest process on the
    machine (a pytest-xdist worker, another checkout's suite) runs at the same moment."""
    root = tempfile.mkdtemp(prefix="decodebench-test-sandbox-")
    os.chmod(root, 0o711)  # the sandbox user reaches its work dir through it
    previous, tempfile.tempdir = tempfile.tempdir, root
    yield root
    tempfile.tempdir = previous
    shutil.rmtree(root, ignore_errors=True)


def sandbox_children() -> list[psutil.Process]:
    """Processes still running the sandbox bootstrap on a work dir of this module (leftovers of a run)."""
    root = tempfile.gettempdir() + os.sep
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = process.info["cmdline"] or []
        if CHILD_MARKER not in cmdline or process.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        workdir = cmdline[cmdline.index(CHILD_MARKER) + 1 :][:1]
        if workdir and workdir[0].startswith(root):
            found.append(process)
    return found


@pytest.fixture(scope="module")
def unguarded() -> SandboxLimits:
    """Limits with the audit guard OFF, for testing the OS boundary alone."""
    limits = SandboxLimits(timeout_s=4.0, cpu_time_s=3, memory_mb=384, max_processes=16, audit_guard=False)
    assert run_program("pass\n", limits).isolation["uid"] != 0
    return limits


def test_a_correct_program_passes_and_reports_its_isolation():
    result = run_program("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\n", FAST)
    assert result.passed and result.status == "passed" and result.detail == ""
    isolation = result.isolation
    assert isolation["boundary"] == "bwrap" and isolation["network"] == "none" and isolation["audit_guard"]
    assert isolation["uid"] != 0 and isolation["child_uid"] == isolation["uid"]  # never root, inside or out
    if os.geteuid() == 0:
        assert isolation["user"] == "decodebench-sandbox"


@pytest.mark.parametrize(
    "program, reason",
    [
        ("assert 1 == 2, 'wrong'\n", "AssertionError: wrong"),
        ("raise SystemExit(0)\n", "SystemExit"),  # exiting early is not passing the tests
        ("def f(:\n", "SyntaxError"),
    ],
)
def test_failing_programs_fail_with_a_reason(program, reason):
    result = run_program(program, FAST)
    assert result.status == "failed" and reason in result.detail


def test_hard_exit_without_running_the_tests_is_not_a_pass():
    result = run_program("import os\nos._exit(0)\n", FAST)
    assert not result.passed and result.status == "no_report"


@pytest.mark.parametrize("program", ["while True:\n    pass\n", "import time\ntime.sleep(60)\n"])
def test_infinite_loops_and_sleeps_time_out(program):
    started = time.perf_counter()
    result = run_program(program, SHORT)
    assert result.status == "timeout" and not result.passed
    assert time.perf_counter() - started < SHORT.timeout_s + 2.0
    assert not sandbox_children()


def test_unbounded_allocation_is_stopped_by_the_memory_limit():
    result = run_program("blocks = []\nwhile True:\n    blocks.append(bytearray(10 ** 7))\n", FAST)
    assert not result.passed and result.status in ("failed", "killed")
    assert "MemoryError" in result.detail or result.status == "killed"


def test_file_size_limit():
    limits = SandboxLimits(timeout_s=5, file_size_mb=1)
    result = run_program("open('big.bin', 'wb').write(b'x' * (8 << 20))\n", limits)
    assert not result.passed and ("File too large" in result.detail or "SIGXFSZ" in result.detail)


def test_fork_bomb_is_refused_by_the_guard():
    result = run_program("import os\nwhile True:\n    os.fork()\n", FAST)
    assert result.status == "failed" and "os.fork" in result.detail
    assert not sandbox_children()


def test_fork_bomb_without_the_guard_is_held_by_the_process_limit(unguarded):
    program = (
        "import os, time\n"
        "children = 0\n"
        "for _ in range(1000):\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(60)\n"
        "            os._exit(0)\n"
        "        children += 1\n"
        "    except OSError:\n"
        "        break\n"
        "raise RuntimeError(f'forked {children}')\n"
    )
    result = run_program(program, unguarded)
    assert result.status == "failed" and result.detail.startswith("RuntimeError: forked")
    assert int(result.detail.rsplit(" ", 1)[1]) < unguarded.max_processes
    time.sleep(0.2)
    assert not sandbox_children()  # the sleeping children died with the process group


def test_writes_and_deletes_outside_the_sandbox_are_refused(tmp_path):
    target, precious = tmp_path / "written.txt", tmp_path / "precious.txt"
    precious.write_text("keep me")
    write = run_program(f"open({str(target)!r}, 'w').write('x')\n", FAST)
    delete = run_program(f"import os\nos.remove({str(precious)!r})\n", FAST)
    rename = run_program(f"import os\nos.rename({str(precious)!r}, 'stolen.txt')\n", FAST)
    for result in (write, delete, rename):
        assert result.status == "failed" and "sandbox:" in result.detail
    assert not target.exists() and precious.read_text() == "keep me"


def test_writes_outside_without_the_guard_meet_the_read_only_file_system(unguarded):
    outside = Path(tempfile.mkdtemp(prefix="decodebench-outside-", dir="/var/tmp"))  # /tmp is private in there
    try:
        outside.chmod(0o777)  # writable by every uid: only the sandbox's read-only view stops the write
        target = outside / "written.txt"
        result = run_program(f"open({str(target)!r}, 'w').write('x')\n", unguarded)
        assert result.status == "failed" and "Read-only file system" in result.detail and not target.exists()
    finally:
        shutil.rmtree(outside)


def test_the_working_directory_is_fresh_and_private_to_each_program():
    first = run_program(
        "import os\nassert os.listdir('.') == []\nopen('note.txt', 'w').write('x')\n"
        "assert open('note.txt').read() == 'x'\n",
        FAST,
    )
    second = run_program("import os\nassert not os.path.exists('note.txt')\n", FAST)
    assert first.passed and second.passed


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    monkeypatch.setenv("HF_TOKEN", "hf-secret")
    program = (
        "import os\n"
        "assert not any('secret' in value for value in os.environ.values()), sorted(os.environ)\n"
        "assert os.environ['HOME'] == os.getcwd() == os.environ['TMPDIR']\n"
    )
    assert run_program(program, FAST).passed


class Listener:
    """A TCP server on 127.0.0.1 in the test's own network namespace that records any bytes."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.port = self.server.getsockname()[1]
        self.received = b""
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                connection, _ = self.server.accept()
            except OSError:
                continue
            with connection:
                connection.settimeout(1)
                try:
                    self.received += connection.recv(1024)
                except OSError:
                    pass

    def close(self):
        self.stop.set()
        self.thread.join()
        self.server.close()


@pytest.fixture
def listener():
    server = Listener()
    yield server
    server.close()


def exfiltrate(port: int) -> str:
    return f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'leak')\n"


def test_sockets_are_refused_by_the_guard(listener):
    result = run_program(exfiltrate(listener.port), FAST)
    assert result.status == "failed" and "socket" in result.detail
    assert listener.received == b""


def test_network_namespace_alone_reaches_nothing(listener):
    limits = SandboxLimits(timeout_s=3, audit_guard=False)
    result = run_program(exfiltrate(listener.port), limits)
    assert result.status == "failed" and "Connection refused" in result.detail and listener.received == b""


def test_harness_keeps_running_after_hostile_programs():
    hostile = [
        "import os\nwhile True:\n    os.fork()\n",
        "x = []\nwhile True:\n    x.append(bytearray(10 ** 7))\n",
        "while True:\n    pass\n",
    ]
    assert all(not run_program(program, SHORT).passed for program in hostile)
    assert run_program("assert sum(range(10)) == 45\n", FAST).passed
    assert not sandbox_children()


# --- the guard on its own (no subprocess) ------------------------------------------------------
@pytest.fixture
def guard(tmp_path):
    return make_guard(str(tmp_path / "box")), tmp_path / "box"


def test_guard_allows_reads_anywhere_and_writes_inside(guard):
    hook, box = guard
    hook("open", ("/etc/hostname", "r", os.O_RDONLY))
    hook("open", (str(box / "out.txt"), "w", os.O_WRONLY | os.O_CREAT))
    hook("open", (str(box / "sub" / "f"), None, os.O_WRONLY | os.O_CREAT))
    hook("os.remove", (str(box / "out.txt"), -1))
    hook("open", (os.devnull, "w", os.O_WRONLY))
    hook("import", ("math", None, [], [], []))


@pytest.mark.parametrize(
    "event, args",
    [
        ("open", ("/tmp/outside.txt", "w", os.O_WRONLY)),
        ("open", ("/tmp/outside.txt", "a", os.O_WRONLY)),
        ("open", ("relative.txt", None, os.O_WRONLY | os.O_CREAT)),  # os.open may use an unseen dir_fd
        ("open", ("{box}/../escape.txt", "w", os.O_WRONLY)),
        ("os.remove", ("/tmp/x", -1)),
        ("os.remove", ("{box}/x", 3)),  # relative to another directory's fd
        ("os.rename", ("{box}/a", "/tmp/b", -1, -1)),
        ("os.chmod", (5, 0o777, -1)),  # an fd could be any file
        ("shutil.rmtree", ("/", None)),
        ("socket.__new__", (None, 2, 1, 0)),
        ("os.fork", ()),
        ("os.system", (b"ls",)),
        ("subprocess.Popen", ("ls", [], None, None)),
        ("ctypes.dlopen", (None,)),
        ("import", ("_posixsubprocess", None, [], [], [])),
        ("resource.setrlimit", (0, (1, 1))),
        ("os.kill", (1, 9)),
    ],
)
def test_guard_refuses(guard, event, args):
    hook, box = guard
    args = tuple(a.replace("{box}", str(box)) if isinstance(a, str) else a for a in args)
    with pytest.raises(PermissionError, match="sandbox"):
        hook(event, args)


# --- no OS sandbox: a clear error, and nothing runs ----------------------------------------------
@pytest.fixture
def no_cached_probe():
    from decodebench.tasks import sandbox

    sandbox.ensure_sandbox.cache_clear()
    sandbox.probe.cache_clear()
    yield sandbox
    sandbox.ensure_sandbox.cache_clear()
    sandbox.probe.cache_clear()


@pytest.mark.parametrize("missing", ["bwrap", "user", "python"])
def test_without_an_os_sandbox_nothing_runs_and_the_error_says_why(missing, no_cached_probe, monkeypatch, tmp_path):
    sandbox = no_cached_probe
    canary = tmp_path / "ran"
    if missing == "bwrap":
        monkeypatch.setattr(sandbox.shutil, "which", lambda name, *a, **k: None)
        expected = "bubblewrap (bwrap) is not installed"
    elif missing == "user":
        if os.geteuid() != 0:
            pytest.skip("the dedicated sandbox user is needed only by a root harness")
        monkeypatch.setattr(sandbox, "SANDBOX_USER", "no-such-sandbox-user")
        expected = "'no-such-sandbox-user' that sandboxed programs run as does not exist"
    else:
        expected = "/nonexistent/python3: no such file"
    limits = SandboxLimits(python="/nonexistent/python3" if missing == "python" else None)
    with pytest.raises(sandbox.SandboxUnavailableError, match="make setup") as error:
        run_program(f"open({str(canary)!r}, 'w').write('ran')\n", limits)
    assert expected in str(error.value) and not canary.exists()


def test_humaneval_checks_the_sandbox_before_loading_anything(no_cached_probe, monkeypatch, tmp_path):
    from decodebench.config import compose_run_config
    from decodebench.tasks import build_task

    sandbox = no_cached_probe
    monkeypatch.setattr(sandbox.shutil, "which", lambda name, *a, **k: None)
    cfg = compose_run_config(["task=humaneval", "task.limit=1"])
    task = build_task(cfg.task, data_dir=None, cache_dir=tmp_path)
    with pytest.raises(sandbox.SandboxUnavailableError, match="bwrap"):
        task.load_samples()
