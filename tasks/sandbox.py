"""Run untrusted generated code (HumanEval completions + tests) in a sandbox.

Every program gets its own process (``python -I -B tasks/sandbox_child.py``) and:

- a fresh temporary working directory (also ``HOME`` and ``TMPDIR``), deleted afterwards;
- a scrubbed environment (``PATH``, ``HOME``, ``TMPDIR``, ``LANG`` only: no API keys or tokens);
- its own session, killed as a whole process group (SIGKILL) at the wall-clock timeout and after
  every run, so nothing it started outlives it;
- CPU-time, address-space, file-size, process-count and open-file limits (``setrlimit``);
- no network: a new network namespace where the kernel allows one (root, or unprivileged user
  namespaces), and in every case socket creation refused by the audit-hook guard;
- as root, the uid ``nobody`` (so the process limit is enforced and root-owned files are safe) —
  possible only when the interpreter's standard library is readable by others (a Python installed
  under ``/root`` is not: then programs run as root, with a warning, and set ``python`` to a
  world-readable interpreter such as ``/usr/bin/python3`` to get the drop back);
- the audit-hook guard of :mod:`decodebench.tasks.sandbox_child`: no process creation, ctypes or
  writes/deletes outside the working directory.

A program passes only if the child reports, on a private channel and with the per-run nonce, that
the program ran to the end without an exception. Anything else — an exception, a guard refusal,
a limit hit (killed by a signal), the timeout, no report — is a failure with a reason, never an
error of the harness.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from decodebench.config import check

log = logging.getLogger(__name__)

CHILD_SCRIPT = Path(__file__).with_name("sandbox_child.py")
REPORT_TAIL_BYTES = 4096  # the child's report is the last line of its private channel


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandboxed program (HumanEval's own harness uses a 3 s timeout)."""

    timeout_s: float = 10.0  # wall clock, from start to kill
    cpu_time_s: int = 10  # RLIMIT_CPU (SIGXCPU, then SIGKILL one second later)
    memory_mb: int = 1024  # RLIMIT_AS: address space
    file_size_mb: int = 16  # RLIMIT_FSIZE: largest file it may write
    max_processes: int = 32  # RLIMIT_NPROC (per uid; not enforced for root, hence drop_privileges)
    max_open_files: int = 64  # RLIMIT_NOFILE
    network_namespace: bool = True  # unshare a network namespace when the kernel allows it
    require_network_namespace: bool = False  # fail every program if no namespace could be made
    drop_privileges: bool = True  # as root: run as nobody (when the interpreter allows, see above)
    audit_guard: bool = True  # the Python audit-hook guard (defence in depth)
    python: Optional[str] = None  # interpreter for the programs; null = the harness's own

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
    returncode: Optional[int]
    # layers the child reported: {"network": "netns"|"userns+netns"|"none", "uid": int,
    # "audit_guard": bool}; empty when the child never reported
    isolation: dict = dataclasses.field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def scrubbed_environment(workdir: str) -> dict[str, str]:
    """The only environment a sandboxed program sees."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
            "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}


def run_program(program: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Execute ``program`` (Python source) in a fresh sandbox and report whether it completed.

    Args:
        program: the whole program, e.g. prompt + completion + tests + ``check(entry_point)``.
        limits: timeouts, resource limits and isolation layers.

    Returns:
        A :class:`SandboxResult`; ``passed`` only when the program ran to the end.
    """
    python = limits.python or sys.executable
    workdir = tempfile.mkdtemp(prefix="decodebench-sandbox-")
    private = tempfile.mkdtemp(prefix="decodebench-sandbox-report-")  # the child never sees this path
    nonce = secrets.token_hex(16)
    settings = {key: getattr(limits, key) for key in (
        "cpu_time_s", "memory_mb", "file_size_mb", "max_processes", "max_open_files", "network_namespace",
        "require_network_namespace", "audit_guard")}
    settings["drop_privileges"] = limits.drop_privileges and os.geteuid() == 0 and can_drop_privileges(python)
    started = time.perf_counter()
    timed_out = False
    try:
        with open(os.path.join(private, "report"), "w+b") as report:
            process = subprocess.Popen(
                [python, "-I", "-B", str(CHILD_SCRIPT), workdir, json.dumps(settings)],
                stdin=subprocess.PIPE, stdout=report, stderr=subprocess.DEVNULL, cwd=workdir,
                env=scrubbed_environment(workdir), start_new_session=True, close_fds=True,
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
                kill_group(process.pid)  # also whatever the program left running
                returncode = process.wait()
            wall_s = time.perf_counter() - started
            report.seek(max(0, os.fstat(report.fileno()).st_size - REPORT_TAIL_BYTES))
            tail = report.read().decode("utf-8", errors="replace")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(private, ignore_errors=True)
    return interpret(tail, nonce, returncode, timed_out, wall_s, limits)


def readable_by_others(path: str) -> bool:
    """True if a user without any group in common can read ``path`` (every parent searchable)."""
    current = Path(path).resolve()
    for directory in [*reversed(current.parents), current]:
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH or (directory == current and not mode & stat.S_IROTH):
            return False
    return True


@functools.lru_cache(maxsize=None)
def can_drop_privileges(python: str) -> bool:
    """Whether ``python`` still finds its standard library after dropping to ``nobody``."""
    found = subprocess.run([python, "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['stdlib'])"],
                           capture_output=True, text=True, timeout=60)
    usable = found.returncode == 0 and readable_by_others(found.stdout.strip())
    if not usable:
        log.warning("sandboxed programs run as root: %s's standard library is not readable by 'nobody' "
                    "(process limits are not enforced for root; the audit guard and the process-group kill "
                    "still contain forks). Set task.params.sandbox.python to a world-readable interpreter, "
                    "e.g. /usr/bin/python3, to run them as nobody.", python)
    return usable


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def interpret(tail: str, nonce: str, returncode: Optional[int], timed_out: bool, wall_s: float,
              limits: SandboxLimits) -> SandboxResult:
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
        return SandboxResult("timeout", f"wall-clock timeout after {limits.timeout_s:g} s", wall_s, returncode,
                             isolation)
    if report is None:
        if returncode is not None and returncode < 0:
            name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
            return SandboxResult("killed", f"killed by {name}", wall_s, returncode)
        return SandboxResult("no_report", f"exited with code {returncode} without a report", wall_s, returncode)
    return SandboxResult(report["status"], report["detail"], wall_s, returncode, isolation)
