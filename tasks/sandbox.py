"""Run untrusted generated code (HumanEval completions + tests) in a sandbox.

The operating system is the boundary, in every configuration. Every program gets its own process,
started as ``bwrap ... python -I -B -c <tasks/sandbox_child.py>`` (bubblewrap, Debian package
``bubblewrap``; ``make setup`` installs it and the rest with ``scripts/sandbox.sh``):

- never as root: a harness running as root starts the sandbox as the dedicated unprivileged user
  ``decodebench-sandbox`` (no supplementary groups, no capabilities); a harness running as a normal
  user starts it as itself. The interpreter must be runnable by that user: the harness's own when it
  is, else Debian's ``/usr/bin/python3`` (a Python under ``/root`` is not; ``python`` sets one);
- bubblewrap's namespaces: a read-only view of the whole file system, a private writable tmpfs on
  ``/tmp`` and ``/dev/shm``, a fresh working directory (also ``HOME`` and ``TMPDIR``, bound
  read-write, deleted afterwards) the only other writable place, an empty network namespace (no
  interface but loopback: nothing outside is reachable), its own PID namespace (it sees and signals
  only itself), IPC and UTS namespaces, all capabilities dropped, killed with the harness;
- a scrubbed environment (``PATH``, ``HOME``, ``TMPDIR``, ``LANG`` only: no API keys or tokens);
- its own session, killed as a whole at the wall-clock timeout and after every run, so nothing it
  started outlives it;
- CPU-time, address-space, file-size, process-count and open-file limits (``setrlimit``), not
  dumpable (``/proc/self/mem`` unreadable to itself);
- the audit-hook guard of :mod:`decodebench.tasks.sandbox_child` (defence in depth): no process
  creation, sockets, ctypes, signals, frame or garbage-collector walking, writes outside the
  working directory.

Where this cannot be had (no bubblewrap, user namespaces off, no sandbox user, no usable
interpreter) :func:`ensure_sandbox` raises :class:`SandboxUnavailableError` — before a model is
loaded, and no program runs: there is no fall-back to running programs without the OS sandbox.

A program passes only if the child reports, on a private channel and with the per-run nonce, that
the program ran to the end without an exception. Anything else — an exception, a guard refusal,
a limit hit (killed by a signal), the timeout, no report — is a failure with a reason, never an
error of the harness. What the verdict can and cannot withstand: README, "Sandbox limits".
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from decodebench.registry import DecodeBenchError, check

log = logging.getLogger(__name__)

CHILD_SCRIPT = Path(__file__).with_name("sandbox_child.py")
CHILD_MARKER = "decodebench-sandbox-child"  # argv[1] of every sandboxed interpreter
SANDBOX_USER = "decodebench-sandbox"  # created by scripts/sandbox.sh (make setup) for root harnesses
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's python3: the interpreter when the harness's is unreadable
SETUP_HINT = "run `make setup` (or, as root, `bash scripts/sandbox.sh setup`)"
REPORT_TAIL_BYTES = 4096  # the child's report is the last line of its private channel


class SandboxUnavailableError(DecodeBenchError):
    """The OS sandbox cannot be had here: no program is run (never a fall-back without it)."""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandboxed program (HumanEval's own harness uses a 3 s timeout)."""

    timeout_s: float = 10.0  # wall clock, from start to kill
    cpu_time_s: int = 10  # RLIMIT_CPU (SIGXCPU, then SIGKILL one second later)
    memory_mb: int = 1024  # RLIMIT_AS: address space
    file_size_mb: int = 16  # RLIMIT_FSIZE: largest file it may write
    max_processes: int = 32  # RLIMIT_NPROC (per uid: the sandbox user's, or the harness user's)
    max_open_files: int = 64  # RLIMIT_NOFILE
    audit_guard: bool = True  # the Python audit-hook guard (defence in depth)
    python: str | None = None  # interpreter for the programs; null = the harness's own, else /usr/bin/python3

    def __post_init__(self) -> None:
        for key in ("timeout_s", "cpu_time_s", "memory_mb", "file_size_mb", "max_processes", "max_open_files"):
            check(getattr(self, key) > 0, f"task.params.sandbox.{key}", getattr(self, key), "> 0")
        check(self.memory_mb >= 64, "task.params.sandbox.memory_mb", self.memory_mb, ">= 64 (the interpreter needs it)")
        check(self.max_open_files >= 16, "task.params.sandbox.max_open_files", self.max_open_files, ">= 16")


@dataclass
class SandboxResult:
    """Outcome of one program."""

    status: str  # passed | failed | timeout | killed | no_report
    detail: str  # exception, signal or refusal; empty when passed
    wall_s: float
    returncode: int | None
    # how it ran: {"boundary": "bwrap", "user": name, "uid": uid outside, "network": "none",
    # "python": interpreter, "audit_guard": bool} (from the harness), plus the child's "child_uid"
    isolation: dict = dataclasses.field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class SandboxUser:
    """The uid programs run as: the dedicated user (harness as root) or the harness's own user."""

    name: str
    uid: int
    gid: int

    @property
    def switch(self) -> bool:
        return self.uid != os.geteuid()


def scrubbed_environment(workdir: str) -> dict[str, str]:
    """The only environment a sandboxed program sees."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "PYTHONHASHSEED": "0",
    }


def sandbox_user() -> SandboxUser:
    """Root: the dedicated ``decodebench-sandbox`` user (an error if it is missing); else oneself."""
    if os.geteuid() != 0:
        entry = pwd.getpwuid(os.geteuid())
        return SandboxUser(entry.pw_name, entry.pw_uid, entry.pw_gid)
    try:
        entry = pwd.getpwnam(SANDBOX_USER)
    except KeyError:
        raise SandboxUnavailableError(
            f"the harness runs as root and the unprivileged user '{SANDBOX_USER}' that sandboxed programs run as "
            f"does not exist: {SETUP_HINT}"
        ) from None
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise SandboxUnavailableError(f"user '{SANDBOX_USER}' has uid/gid 0: sandboxed programs never run as root")
    return SandboxUser(entry.pw_name, entry.pw_uid, entry.pw_gid)


def bwrap_command(workdir: str) -> list[str]:
    """bubblewrap's command line (the program's command follows it): read-only root, private /tmp,
    only ``workdir`` writable, every namespace new (an empty network one), no capabilities."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailableError(f"bubblewrap (bwrap) is not installed: {SETUP_HINT} (apt-get install bubblewrap)")
    return [
        bwrap,
        "--unshare-all",
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--tmpfs",
        "/tmp",
        "--tmpfs",
        "/dev/shm",
        "--bind",
        workdir,
        workdir,
        "--chdir",
        workdir,
        "--hostname",
        "sandbox",
    ]


def child_command(python: str, workdir: str, settings: dict) -> list[str]:
    """The bootstrap, given to the interpreter on its command line (the sandbox user need not be
    able to read the harness's files)."""
    return [
        python,
        "-I",
        "-B",
        "-c",
        CHILD_SCRIPT.read_text(encoding="utf-8"),
        CHILD_MARKER,
        workdir,
        json.dumps(settings),
    ]


def start_sandboxed(command: list[str], user: SandboxUser, workdir: str, **popen) -> subprocess.Popen:
    """Popen ``command`` in its own session as ``user`` (no supplementary groups when switching)."""
    identity = dict(user=user.uid, group=user.gid, extra_groups=[]) if user.switch else {}
    return subprocess.Popen(
        command,
        cwd=workdir,
        env=scrubbed_environment(workdir),
        start_new_session=True,
        close_fds=True,
        **identity,
        **popen,
    )


def fresh_workdir(user: SandboxUser) -> str:
    workdir = tempfile.mkdtemp(prefix="decodebench-sandbox-")
    if user.switch:
        os.chown(workdir, user.uid, user.gid)
    return workdir


@functools.cache
def probe(python: str) -> str | None:
    """None if ``python`` runs inside the sandbox as the sandbox user, else why not."""
    user = sandbox_user()
    workdir = fresh_workdir(user)
    try:
        command = [*bwrap_command(workdir), python, "-I", "-c", "import json, resource, ctypes"]
        done = start_sandboxed(command, user, workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = done.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            kill_group(done.pid)
            done.communicate()
            return "the probe timed out"
        return (
            None
            if done.returncode == 0
            else (err or out).decode(errors="replace").strip()[-500:] or f"exit code {done.returncode}"
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@functools.cache
def ensure_sandbox(python: str | None = None) -> str:
    """Check that programs can run in the OS sandbox here; returns the interpreter they will use.

    Args:
        python: ``SandboxLimits.python``; None tries the harness's interpreter, then /usr/bin/python3.

    Raises:
        SandboxUnavailableError: no bubblewrap, no user namespaces, no sandbox user, or no
            interpreter the sandbox user can run (the message says why and how to fix it).
    """
    user = sandbox_user()
    candidates = [python] if python else list(dict.fromkeys([sys.executable, SYSTEM_PYTHON]))
    reasons = []
    for candidate in candidates:
        if not os.path.isfile(candidate):
            reasons.append(f"{candidate}: no such file")
            continue
        reason = probe(candidate)
        if reason is None:
            if candidate != candidates[0]:
                log.info("sandboxed programs run with %s (%s cannot run %s)", candidate, user.name, candidates[0])
            return candidate
        reasons.append(f"{candidate}: {reason}")
    raise SandboxUnavailableError(
        f"no sandbox for generated code here (programs run as '{user.name}' in bubblewrap): "
        + "; ".join(reasons)
        + f". {SETUP_HINT}; or set task.params.sandbox.python to an interpreter "
        f"'{user.name}' can run (outside /root)"
    )


def run_program(program: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Execute ``program`` (Python source) in a fresh sandbox and report whether it completed.

    Args:
        program: the whole program, e.g. prompt + completion + tests + ``check(entry_point)``.
        limits: timeouts, resource limits and the audit guard.

    Returns:
        A :class:`SandboxResult`; ``passed`` only when the program ran to the end.

    Raises:
        SandboxUnavailableError: the OS sandbox cannot be had here (nothing was run).
    """
    python = ensure_sandbox(limits.python)
    user = sandbox_user()
    workdir = fresh_workdir(user)
    private = tempfile.mkdtemp(prefix="decodebench-sandbox-report-")  # never inside the sandbox
    nonce = secrets.token_hex(16)
    settings = {
        key: getattr(limits, key)
        for key in ("cpu_time_s", "memory_mb", "file_size_mb", "max_processes", "max_open_files", "audit_guard")
    }
    isolation = {
        "boundary": "bwrap",
        "user": user.name,
        "uid": user.uid,
        "network": "none",
        "python": python,
        "audit_guard": limits.audit_guard,
    }
    started = time.perf_counter()
    timed_out = False
    try:
        with open(os.path.join(private, "report"), "w+b") as report:
            process = start_sandboxed(
                [*bwrap_command(workdir), *child_command(python, workdir, settings)],
                user,
                workdir,
                stdin=subprocess.PIPE,
                stdout=report,
                stderr=subprocess.DEVNULL,
            )
            try:
                process.stdin.write(json.dumps({"nonce": nonce, "program": program}).encode())
                process.stdin.close()
            except BrokenPipeError:  # died before reading: reported below as no_report
                pass
            try:
                returncode = process.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                kill_group(process.pid)  # bwrap dies; the PID namespace and everything in it with it
                returncode = process.wait()
            wall_s = time.perf_counter() - started
            report.seek(max(0, os.fstat(report.fileno()).st_size - REPORT_TAIL_BYTES))
            tail = report.read().decode("utf-8", errors="replace")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # never follows the program's symlinks
        shutil.rmtree(private, ignore_errors=True)
    result = interpret(tail, nonce, returncode, timed_out, wall_s, limits)
    result.isolation = {**isolation, **({"child_uid": result.isolation["uid"]} if result.isolation else {})}
    return result


def kill_group(pgid: int, wait_s: float = 5.0) -> None:
    """SIGKILL the sandbox: its process group and every process below its bwrap (bubblewrap's
    PID-namespace init and the program run in sessions of their own; when the init dies the kernel
    kills the rest of the namespace), then wait until none of them runs (zombies aside)."""
    table = process_table()
    doomed = {pid for pid, (_, _, group) in table.items() if group == pgid} | descendants(pgid, table)
    deadline = time.monotonic() + wait_s
    while True:
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        table = process_table()
        doomed = {pid for pid in doomed if pid in table and table[pid][0] not in "ZX"}
        if not doomed or time.monotonic() > deadline:
            return
        time.sleep(0.005)


def process_table() -> dict[int, tuple[str, int, int]]:
    """``{pid: (state, parent pid, process group)}`` of every process, from /proc/<pid>/stat."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(entry.name)] = (fields[0], int(fields[1]), int(fields[2]))
    return table


def descendants(pid: int, table: dict[int, tuple[str, int, int]]) -> set[int]:
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, (_, parent, _) in table.items() if parent in frontier} - found
        found |= frontier
    return found


def interpret(
    tail: str, nonce: str, returncode: int | None, timed_out: bool, wall_s: float, limits: SandboxLimits
) -> SandboxResult:
    """Turn the child's report channel and exit status into a :class:`SandboxResult`."""
    report = None
    for line in reversed(tail.splitlines()):
        try:
            candidate = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(candidate, dict) and candidate.get("nonce") == nonce:
            report = candidate
            break
    isolation = report.get("isolation", {}) if report else {}
    if timed_out:
        return SandboxResult(
            "timeout", f"wall-clock timeout after {limits.timeout_s:g} s", wall_s, returncode, isolation
        )
    if report is None:
        if returncode is not None and returncode < 0:
            name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
            return SandboxResult("killed", f"killed by {name}", wall_s, returncode)
        return SandboxResult("no_report", f"exited with code {returncode} without a report", wall_s, returncode)
    return SandboxResult(report["status"], report["detail"], wall_s, returncode, isolation)
