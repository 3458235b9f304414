"""Child side of the code sandbox: confines this process, then runs one untrusted program.

Started by :func:`decodebench.tasks.sandbox.run_program` inside the OS sandbox (bubblewrap, as an
unprivileged uid: see that module) as ``python -I -B -c <this source> decodebench-sandbox-child
<workdir> <settings-json>``, with a scrubbed environment, cwd = the fresh ``workdir``. Standard
library only, and read by the interpreter from its command line (the sandbox user need not be able
to read the harness's files). Order matters — each step needs what the later ones take away:

1. read the request (nonce + program) from stdin, then point stdin at /dev/null;
2. resource limits: CPU seconds, address space, file size, processes, open files, no core dumps;
3. not dumpable (``prctl(PR_SET_DUMPABLE, 0)``): ``/proc/self/mem``, ``/proc/self/fd`` and
   ``/proc/self/environ`` become unreadable to the process itself;
4. the verdict lines are encoded BEFORE the program runs (the program may rebind any library
   function afterwards: after it, only builtins captured here are called);
5. the audit-hook guard (:func:`make_guard`): no sockets, processes, ctypes, signals, rlimit
   changes, frame / garbage-collector walking or tracing hooks; no writes, deletes, renames,
   chmods... outside ``workdir``. Audit hooks cannot be removed, so it holds for the whole process;
6. run the program with stdout/stderr sent to /dev/null; report ``{"nonce", "status", "detail",
   "isolation"}`` as one JSON line on a private duplicate of the original stdout, then ``_exit``.

The guard is defence in depth, not a security boundary: the OS layers around this process (the
unprivileged uid, bubblewrap's read-only view, private tmpfs and empty network namespace, the
limits) are. A program runs in the same interpreter as its tests, so a program written against
this bootstrap can still subvert its own verdict (e.g. an ``__eq__`` that is always true): the
nonce keeps it from forging a report through the known paths (README, "Sandbox limits").
"""

import json
import os
import sys

MARKER = "decodebench-sandbox-child"  # argv[1]: how the harness (and its tests) find leftovers
PR_SET_DUMPABLE = 4

# audit events refused whatever their arguments
DENIED_EVENTS = frozenset(
    {
        "socket.__new__",
        "socket.getaddrinfo",
        "socket.gethostbyname",
        "socket.gethostbyaddr",
        "os.fork",
        "os.forkpty",
        "os.system",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "subprocess.Popen",
        "os.kill",
        "os.killpg",
        "signal.pthread_kill",
        "resource.setrlimit",
        "resource.prlimit",
        "sys.remote_exec",
        "os.startfile",
        "sys._current_frames",
        "sys._current_exceptions",
        "sys.settrace",
        "sys.setprofile",
        "gc.get_objects",
        "gc.get_referrers",
        "gc.get_referents",
        "sys.addaudithook",
        "cpython._PySys_ClearAuditHooks",
    }
)
# frame walking: sys._getframe (and inspect, traceback.walk_stack...) reach the bootstrap's frame
FRAME_EVENTS = frozenset({"sys._getframe", "sys._getframemodulename"})
FRAME_ATTRIBUTES = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back"})
DENIED_PREFIXES = ("ctypes.", "winreg.", "msvcrt.")
# spawn/FFI without audit events; signal handlers receive the current frame
DENIED_IMPORTS = frozenset({"_posixsubprocess", "_ctypes", "ctypes", "signal", "_signal"})
# imported before the guard: their import-time code walks frames (typing's TypeVars, enum, ...)
PRELOADED = (
    "typing",
    "collections",
    "enum",
    "dataclasses",
    "functools",
    "re",
    "math",
    "string",
    "itertools",
    "heapq",
    "bisect",
    "fractions",
    "decimal",
    "random",
    "hashlib",
    "statistics",
)
# audit events that change the file system: (indices of path arguments, index of a dir_fd argument)
PATH_EVENTS = {
    "os.remove": ((0,), 1),
    "os.rmdir": ((0,), 1),
    "os.mkdir": ((0,), 2),
    "os.rename": ((0, 1), 2),
    "os.link": ((0, 1), 2),
    "os.symlink": ((1,), 2),
    "os.chmod": ((0,), 2),
    "os.chown": ((0,), 3),
    "os.utime": ((0,), 3),
    "os.truncate": ((0,), None),
    "os.chflags": ((0,), None),
    "os.lchflags": ((0,), None),
    "os.setxattr": ((0,), None),
    "os.removexattr": ((0,), None),
    "shutil.rmtree": ((0,), 1),
    "shutil.chown": ((0,), None),
}
JSON_SAFE = bytes(32 if byte < 32 or byte > 126 else byte for byte in range(256))  # control -> space
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class FrameAccessRefused(PermissionError, ValueError):
    """Refusal of a frame lookup; also a ValueError, which is what typing / enum / namedtuple catch
    when the interpreter has no frames, so programs that merely define those keep working."""


def make_guard(root: str):
    """Audit hook allowing file-system changes only inside ``root``.

    Every library function it uses is bound here, once: a program that rebinds ``os.path.realpath``
    or ``str.startswith`` in its modules later does not change what the guard checks.

    Args:
        root: the sandbox working directory.

    Returns:
        ``hook(event, args)`` raising ``PermissionError("sandbox: ...")`` for a refused event.
    """
    realpath, fsdecode, isabs, devnull = os.path.realpath, os.fsdecode, os.path.isabs, os.devnull
    root = realpath(root)
    prefix = root + os.sep
    denied_events, frame_events, frame_attributes = DENIED_EVENTS, FRAME_EVENTS, FRAME_ATTRIBUTES
    denied_prefixes, denied_imports, path_events = DENIED_PREFIXES, DENIED_IMPORTS, dict(PATH_EVENTS)
    write_flags, is_int, is_str, startswith = WRITE_FLAGS, int, str, str.startswith

    def inside(path) -> bool:
        if isinstance(path, is_int):  # an fd: could belong to any file; refuse the change
            return False
        resolved = realpath(fsdecode(path))
        return resolved == devnull or resolved == root or startswith(resolved, prefix)

    def refuse(event: str, what: str = "", error=PermissionError) -> None:
        raise error(f"sandbox: {event} {what}".strip() + " is not allowed")

    def hook(event: str, args: tuple) -> None:
        if event in denied_events or startswith(event, denied_prefixes):
            refuse(event)
        if event in frame_events:
            refuse(event, error=FrameAccessRefused)
        if event == "object.__getattr__" and args[1] in frame_attributes:
            refuse(event, args[1])
        if event == "import" and args[0] in denied_imports:
            refuse(event, args[0])
        if event == "open":
            path, mode, flags = args
            if isinstance(path, (is_str, bytes)) and startswith(realpath(fsdecode(path)), "/proc/"):
                refuse("opening", repr(path))  # /proc/self/{mem,fd,environ,...}: the process itself
            writes = any(c in mode for c in "wax+") if isinstance(mode, is_str) else bool((flags or 0) & write_flags)
            if not writes or isinstance(path, is_int) and isinstance(mode, is_str):
                return  # reading, or builtin open() of an fd that is already open
            # os.open (mode None) may be relative to an unseen dir_fd: only absolute paths inside
            if path is None or (mode is None and not isabs(fsdecode(path))) or not inside(path):
                refuse("writing", repr(path))
        elif event in path_events:
            positions, dir_fd_at = path_events[event]
            if dir_fd_at is not None and len(args) > dir_fd_at and args[dir_fd_at] not in (None, -1):
                refuse(event, "with dir_fd")
            for at in positions:
                if not inside(args[at]):
                    refuse(event, repr(args[at]))

    return hook


def apply_limits(limits: dict) -> None:
    """Hard resource limits (an unprivileged process cannot raise them again)."""
    import resource

    cpu = int(limits["cpu_time_s"])
    settings = {
        resource.RLIMIT_CPU: (cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL one second later
        resource.RLIMIT_AS: (limits["memory_mb"] << 20,) * 2,
        resource.RLIMIT_FSIZE: (limits["file_size_mb"] << 20,) * 2,
        resource.RLIMIT_NPROC: (limits["max_processes"],) * 2,
        resource.RLIMIT_NOFILE: (limits["max_open_files"],) * 2,
        resource.RLIMIT_CORE: (0, 0),
    }
    for which, (soft, hard) in settings.items():
        resource.setrlimit(which, (soft, hard))


def make_undumpable() -> None:
    """``PR_SET_DUMPABLE 0``: /proc/self/* owned by root, unreadable to this unprivileged process."""
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]  # a later import goes through the guard's import check again


def verdict_lines(nonce: str, isolation: dict) -> tuple[bytes, bytes, bytes]:
    """``(passed line, failed-line head, failed-line tail)``, encoded before the program runs; the
    failure detail goes between head and tail as a JSON string made of builtins only."""
    passed = json.dumps({"nonce": nonce, "status": "passed", "detail": "", "isolation": isolation})
    head, tail = json.dumps({"nonce": nonce, "status": "failed", "detail": "\x00", "isolation": isolation}).split(
        '"\\u0000"'
    )
    return (passed + "\n").encode(), head.encode(), (tail + "\n").encode()


def main() -> None:
    workdir, settings = sys.argv[2], json.loads(sys.argv[3])
    request = json.loads(sys.stdin.read())
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    verdict = os.dup(1)  # private channel for the result line
    apply_limits(settings)
    make_undumpable()
    isolation = {"uid": os.getuid(), "audit_guard": bool(settings["audit_guard"])}
    passed, failed_head, failed_tail = verdict_lines(request.pop("nonce"), isolation)
    program = request.pop("program")
    os.chdir(workdir)
    os.umask(0o077)
    for name in PRELOADED:
        __import__(name)
    sys.modules.pop("_signal", None)  # a later import goes through the guard's import check
    # everything the report needs after the program, bound now (it may rebind modules and builtins)
    write, exit_now, encode, slice_of, cut = os.write, os._exit, str.encode, str.__getitem__, slice(0, 500)
    translate, replace, safe, type_of, base_exception = bytes.translate, bytes.replace, JSON_SAFE, type, BaseException
    if settings["audit_guard"]:
        sys.addaudithook(make_guard(workdir))
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        exec(compile(program, "<candidate>", "exec"), {"__name__": "__main__"})
    except base_exception as error:  # SystemExit and KeyboardInterrupt too: the tests did not finish
        try:
            detail = f"{type_of(error).__name__}: {error}"
        except base_exception:  # a hostile __str__
            detail = "unprintable exception"
        detail = translate(encode(slice_of(detail, cut), "ascii", "replace"), safe)
        detail = replace(replace(detail, b"\\", b"\\\\"), b'"', b'\\"')
        write(verdict, failed_head + b'"' + detail + b'"' + failed_tail)
        exit_now(0)
    write(verdict, passed)
    exit_now(0)  # skip atexit handlers and thread joins the program may have set up


if __name__ == "__main__":
    main()
