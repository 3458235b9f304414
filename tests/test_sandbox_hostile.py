"""Hostile programs against the sandbox itself, each next to a canary file outside it that must stay
untouched, tried with the harness running as root (this process) and as a normal user (the same
harness code run by Debian's python3 as ``nobody``), with the audit guard on and off.

The canary sits in a world-writable directory outside ``/tmp`` (so the program sees it) and is
itself world-writable (as root) or owned by the harness's user (as a normal user): no uid check
protects it — only the OS boundary does (bubblewrap's read-only view, the unprivileged uid).
Programs that try to forge a pass end with a failing test: they must never be reported as passed.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from decodebench.tasks.sandbox import SYSTEM_PYTHON, SandboxLimits, run_program

REPO = Path(__file__).resolve().parents[1]
LIMITS = {"timeout_s": 15, "cpu_time_s": 10, "memory_mb": 384}
CANARY_TEXT = "canary: must stay exactly like this\n"

# {canary}: the canary file; {outside}: its directory. Each program tries its attack and then ends.
ATTACKS = {
    "rebind_realpath_then_write": """
import os, os.path, posixpath
os.path.realpath = posixpath.realpath = os.path.abspath = lambda path, *a, **k: os.getcwd() + '/x'
os.readlink = lambda *a, **k: (_ for _ in ()).throw(OSError(22, 'not a link'))
os.symlink({canary!r}, 'link')
open('link', 'w').write('pwned')
""",
    "rebind_str_and_open": """
import builtins, io, os
builtins.str = type('S', (str,), {{'startswith': lambda self, *a: True}})
io.open = builtins.open
open({canary!r}, 'a').write('pwned')
""",
    "symlink_out_of_the_workdir": """
import os
os.symlink({canary!r}, 'link')
with open('link', 'r+') as handle:
    handle.write('pwned')
""",
    "symlink_to_the_directory": """
import os
os.symlink({outside!r}, 'dir')
open('dir/new-file', 'w').write('pwned')
""",
    "hard_link_out_of_the_workdir": """
import os
os.link({canary!r}, 'hard')
open('hard', 'a').write('pwned')
""",
    "proc_self_root_and_cwd": """
import os
for path in ('/proc/self/root' + {canary!r}, '/proc/1/root' + {canary!r}, '/proc/self/cwd/../../' + {canary!r}):
    try:
        open(path, 'a').write('pwned')
    except OSError:
        pass
raise SystemExit('tried')
""",
    "proc_self_mem_and_environ": """
import os
found = []
for path in ('/proc/self/mem', '/proc/self/environ', '/proc/self/task/' + str(os.getpid()) + '/mem'):
    try:
        found.append(open(path, 'rb').read(16))
    except OSError:
        pass
raise SystemExit(f'read {{len(found)}}')
""",
    "writes_through_inherited_fds": """
import os
for fd in range(3, 256):
    for attempt in (lambda: os.write(fd, b'pwned\\n'), lambda: os.ftruncate(fd, 0), lambda: os.fchmod(fd, 0o777)):
        try:
            attempt()
        except OSError:
            pass
raise SystemExit('tried')
""",
    "delete_rename_chmod_utime": """
import os, shutil
for attempt in (lambda: os.chmod({canary!r}, 0o777), lambda: os.utime({canary!r}, (0, 0)),
                lambda: os.rename({canary!r}, 'stolen'), lambda: os.remove({canary!r}),
                lambda: shutil.rmtree({outside!r}), lambda: os.truncate({canary!r}, 0),
                lambda: open({outside!r} + '/new', 'w')):
    try:
        attempt()
    except OSError:
        pass
raise SystemExit('tried')
""",
}

# forge a pass: each ends with a failing test; the verdict must not be "passed"
FORGERIES = {
    "walk_frames_for_the_nonce": """
import os, sys
frame = sys._getframe()
while frame is not None:
    for value in list(frame.f_locals.values()):
        if isinstance(value, bytes) and b'"passed"' in value:
            for fd in range(3, 64):
                try:
                    os.write(fd, value)
                except OSError:
                    pass
            os._exit(0)  # before the bootstrap writes its own (failed) verdict after it
    frame = frame.f_back
assert False, 'the tests fail'
""",
    "traceback_frames_for_the_nonce": """
import os
try:
    1 / 0
except ZeroDivisionError as error:
    frame = error.__traceback__.tb_frame
    while frame is not None:
        for value in list(frame.f_locals.values()):
            if isinstance(value, bytes) and b'"passed"' in value:
                for fd in range(3, 64):
                    try:
                        os.write(fd, value)
                    except OSError:
                        pass
                os._exit(0)
        frame = frame.f_back
assert False, 'the tests fail'
""",
    "garbage_collector_for_the_nonce": """
import gc, os
for value in gc.get_objects() + [r for o in gc.get_objects() for r in gc.get_referents(o)]:
    if isinstance(value, bytes) and b'"passed"' in value:
        for fd in range(3, 64):
            try:
                os.write(fd, value)
            except OSError:
                pass
        os._exit(0)
assert False, 'the tests fail'
""",
    "signal_handler_frame": """
import os, signal
def handler(signum, frame):
    while frame is not None:
        for value in list(frame.f_locals.values()):
            if isinstance(value, bytes) and b'"passed"' in value:
                for fd in range(3, 64):
                    try:
                        os.write(fd, value)
                    except OSError:
                        pass
                os._exit(0)
        frame = frame.f_back
signal.signal(signal.SIGUSR1, handler)
os.kill(os.getpid(), signal.SIGUSR1)
assert False, 'the tests fail'
""",
    "read_own_memory_for_the_nonce": """
import os, re
maps = open('/proc/self/maps').read()
with open('/proc/self/mem', 'rb') as memory:
    for line in maps.splitlines():
        start, end = (int(x, 16) for x in line.split()[0].split('-'))
        try:
            memory.seek(start)
            for line in re.findall(rb'\\{{"nonce": "[0-9a-f]{{32}}", "status": "passed"[^\\n]*\\n', memory.read(end - start)):
                for fd in range(3, 64):
                    try:
                        os.write(fd, line)
                    except OSError:
                        pass
                os._exit(0)
        except (OSError, ValueError, OverflowError):
            pass
assert False, 'the tests fail'
""",
    "rebind_the_reporting_functions": """
import builtins, json, os, sys
json.dumps = lambda *a, **k: '{{"status": "passed"}}'
os.write = lambda fd, data: len(data)
builtins.BaseException = type('Nothing', (Exception,), {{}})
bytes_type = builtins.bytes
sys.modules['__main__'].JSON_SAFE = b''
assert False, 'the tests fail'
""",
    "fake_report_lines_on_every_fd": """
import os
for fd in range(1, 64):
    try:
        os.write(fd, b'{{"nonce": "0", "status": "passed", "detail": ""}}\\n')
    except OSError:
        pass
os._exit(0), 'the tests fail'
""",
}

MODES = [("root", True), ("root", False), ("user", True), ("user", False)]


def canary_state(path: Path) -> tuple:
    stat = path.stat()
    return (
        path.read_text(),
        stat.st_mode,
        stat.st_uid,
        stat.st_ino,
        stat.st_nlink,
        stat.st_mtime_ns,
        sorted(os.listdir(path.parent)),
    )


@pytest.fixture(scope="module")
def normal_user_harness(tmp_path_factory) -> Path:
    """A copy of the harness's sandbox modules that ``nobody`` can read, run by Debian's python3
    (the harness code itself: config validation, the sandbox and its child; not the package's heavy
    ``decodebench.tasks`` imports). Skips unless this test runs as root (it switches to nobody)."""
    if os.geteuid() != 0:
        pytest.skip("this test process already runs as a normal user: the 'root' mode is that mode")
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.fail(f"{SYSTEM_PYTHON} is missing: make setup installs it (scripts/sandbox.sh)")
    root = Path(tempfile.mkdtemp(prefix="decodebench-user-harness-", dir="/var/tmp"))
    package = root / "decodebench"
    (package / "tasks").mkdir(parents=True)
    for name in ("__init__.py", "config.py", "registry.py"):
        shutil.copy(REPO / "decodebench" / name, package / name)
    (package / "tasks" / "__init__.py").write_text("")
    for name in ("sandbox.py", "sandbox_child.py"):
        shutil.copy(REPO / "tasks" / name, package / "tasks" / name)
    (root / "driver.py").write_text(
        "import dataclasses, json, os, sys\n"
        "sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))\n"
        "from decodebench.tasks.sandbox import SandboxLimits, run_program\n"
        "jobs = json.load(sys.stdin)\n"
        "print(json.dumps([dataclasses.asdict(run_program(p, SandboxLimits(**l))) for p, l in jobs]))\n"
    )
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield root
    shutil.rmtree(root)


def run_as(mode: str, programs: list[str], guard: bool, harness: Path = None) -> list[dict]:
    """Results of ``programs``: run by this process (root) or by the copied harness as nobody."""
    limits = {**LIMITS, "audit_guard": guard}
    if mode == "root":
        return [
            {"status": r.status, "detail": r.detail, "isolation": r.isolation}
            for r in (run_program(p, SandboxLimits(**limits)) for p in programs)
        ]
    done = subprocess.run(
        [
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            SYSTEM_PYTHON,
            "-I",
            str(harness / "driver.py"),
        ],
        input=json.dumps([[p, limits] for p in programs]),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=harness,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(harness), "LANG": "C.UTF-8"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def make_canary(mode: str, request) -> tuple[Path, Path]:
    """(canary file, its directory) outside /tmp, writable by the uid the programs run as: as root
    world-writable (the sandbox user is not root), as a normal user owned by that user."""
    outside = Path(tempfile.mkdtemp(prefix="decodebench-canary-", dir="/var/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(outside))
    path = outside / "canary.txt"
    path.write_text(CANARY_TEXT)
    outside.chmod(0o777)
    path.chmod(0o666)
    if mode == "user":
        nobody = pwd.getpwnam("nobody")
        for item in (outside, path):
            os.chown(item, nobody.pw_uid, nobody.pw_gid)
    return path, outside


@pytest.mark.slow
@pytest.mark.parametrize("mode, guard", MODES, ids=[f"{m}-guard_{'on' if g else 'off'}" for m, g in MODES])
def test_hostile_programs_leave_the_canary_untouched(mode, guard, request):
    harness = request.getfixturevalue("normal_user_harness") if mode == "user" else None
    path, outside = make_canary(mode, request)
    before = canary_state(path)
    programs = {name: code.format(canary=str(path), outside=str(outside)) for name, code in ATTACKS.items()}
    leaked = None
    if mode == "root":  # a careless harness: the canary open for writing in an inheritable fd
        leaked = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.set_inheritable(leaked, True)
    try:
        results = dict(zip(programs, run_as(mode, list(programs.values()), guard, harness)))
    finally:
        if leaked is not None:
            os.close(leaked)
    assert canary_state(path) == before, "the canary changed"
    lines = [f"  {name:<30} {r['status']:<9} {r['detail'][:90]}" for name, r in results.items()]
    print(f"\nhostile programs as {mode}, guard {'on' if guard else 'off'}: canary untouched\n" + "\n".join(lines))
    for name, result in results.items():
        assert result["status"] != "passed", (name, result)
        assert result["isolation"]["uid"] != 0 and result["isolation"].get("child_uid", 1) != 0
    assert results["proc_self_mem_and_environ"]["detail"] == "SystemExit: read 0"  # its own memory (not dumpable)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["root", "user"])
def test_programs_cannot_forge_a_pass(mode, request):
    """Each program tries to find the verdict (nonce, report line) and write it before failing its
    test: frames, tracebacks, the garbage collector, a signal handler's frame, its own memory,
    rebinding the reporting functions, fake lines on every fd. With the guard on (the default)."""
    harness = request.getfixturevalue("normal_user_harness") if mode == "user" else None
    results = dict(zip(FORGERIES, run_as(mode, [code.format() for code in FORGERIES.values()], True, harness)))
    print(
        f"\nforgeries as {mode}:\n"
        + "\n".join(f"  {name:<32} {r['status']:<9} {r['detail'][:80]}" for name, r in results.items())
    )
    assert all(r["status"] == "failed" or r["status"] == "no_report" for r in results.values()), results
    assert all(r["status"] != "passed" for r in results.values())
