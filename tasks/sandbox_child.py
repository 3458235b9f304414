"""Child side of the code sandbox: confines this process, then runs one untrusted program.

Started by :func:`decodebench.tasks.sandbox.run_program` as
``python -I -B sandbox_child.py <workdir> <settings-json>`` with a scrubbed environment, in its own
session, cwd = the fresh ``workdir``. Standard library only (it runs before any isolation of
``sys.path`` could be trusted). Order matters — each step needs the privileges the later ones drop:

1. read the request (nonce + program) from stdin, then point stdin at /dev/null;
2. resource limits: CPU seconds, address space, file size, processes, open files, no core dumps;
3. a new network namespace (``unshare(CLONE_NEWNET)``; unprivileged: together with a new user
   namespace) — no interface but a downed loopback, so nothing is reachable;
4. as root: give ``workdir`` to ``nobody`` and drop to it (so the process limit applies and the
   file system refuses writes to root-owned paths);
5. the audit-hook guard (:func:`make_guard`): no sockets, processes, signals to others, ctypes or
   rlimit changes; no writes, deletes, renames, chmods... outside ``workdir``. Audit hooks cannot
   be removed, so the guard holds for the rest of the process;
6. run the program with stdout/stderr sent to /dev/null; report ``{"nonce", "status", "detail",
   "isolation"}`` as one JSON line on a private duplicate of the original stdout, then ``_exit``.

The guard is Python-level defence in depth, not a security boundary against code that targets
the harness itself (the OS layers — limits, namespaces, the unprivileged user — are the boundary).
"""

import json
import os
import sys

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
NOBODY = 65534

# audit events refused whatever their arguments
DENIED_EVENTS = frozenset({
    "socket.__new__", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
    "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
    "os.kill", "os.killpg", "signal.pthread_kill", "resource.setrlimit", "resource.prlimit",
    "sys.remote_exec", "os.startfile",
})
DENIED_PREFIXES = ("ctypes.", "winreg.", "msvcrt.")
DENIED_IMPORTS = frozenset({"_posixsubprocess", "_ctypes", "ctypes"})  # spawn/FFI without audit events
# audit events that change the file system: (indices of path arguments, index of a dir_fd argument)
PATH_EVENTS = {
    "os.remove": ((0,), 1), "os.rmdir": ((0,), 1), "os.mkdir": ((0,), 2),
    "os.rename": ((0, 1), 2), "os.link": ((0, 1), 2), "os.symlink": ((1,), 2),
    "os.chmod": ((0,), 2), "os.chown": ((0,), 3), "os.utime": ((0,), 3), "os.truncate": ((0,), None),
    "os.chflags": ((0,), None), "os.lchflags": ((0,), None), "os.setxattr": ((0,), None),
    "os.removexattr": ((0,), None), "shutil.rmtree": ((0,), 1), "shutil.chown": ((0,), None),
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def make_guard(root: str):
    """Audit hook allowing file-system changes only inside ``root``.

    Args:
        root: the sandbox working directory.

    Returns:
        ``hook(event, args)`` raising ``PermissionError("sandbox: ...")`` for a refused event.
    """
    root = os.path.realpath(root)

    def inside(path) -> bool:
        if isinstance(path, int):  # an fd: could belong to any file; refuse the change
            return False
        resolved = os.path.realpath(os.fsdecode(path))
        return resolved == os.devnull or resolved == root or resolved.startswith(root + os.sep)

    def refuse(event: str, what: str = "") -> None:
        raise PermissionError(f"sandbox: {event} {what}".strip() + " is not allowed")

    def hook(event: str, args: tuple) -> None:
        if event in DENIED_EVENTS or event.startswith(DENIED_PREFIXES):
            refuse(event)
        if event == "import" and args[0] in DENIED_IMPORTS:
            refuse(event, args[0])
        if event == "open":
            path, mode, flags = args
            writes = (any(c in mode for c in "wax+") if isinstance(mode, str)
                      else bool((flags or 0) & WRITE_FLAGS))
            if not writes or isinstance(path, int) and isinstance(mode, str):
                return  # reading, or builtin open() of an fd that is already open
            # os.open (mode None) may be relative to an unseen dir_fd: only absolute paths inside
            if path is None or (mode is None and not os.path.isabs(os.fsdecode(path))) or not inside(path):
                refuse("writing", repr(path))
        elif event in PATH_EVENTS:
            positions, dir_fd_at = PATH_EVENTS[event]
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


def enter_network_namespace() -> str:
    """Move into a new, empty network namespace; returns how ("netns", "userns+netns" or "none")."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    attempts = [(CLONE_NEWNET, "netns")] if os.geteuid() == 0 else []
    attempts.append((CLONE_NEWUSER | CLONE_NEWNET, "userns+netns"))
    for flags, name in attempts:
        if libc.unshare(flags) == 0:
            return name
    return "none"


def drop_privileges(workdir: str) -> int:
    """As root: hand ``workdir`` to nobody and become nobody. Returns the uid now in effect."""
    if os.geteuid() != 0:
        return os.geteuid()
    os.chown(workdir, NOBODY, NOBODY)
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    return os.geteuid()


def main() -> None:
    workdir, settings = sys.argv[1], json.loads(sys.argv[2])
    request = json.loads(sys.stdin.read())
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    verdict = os.fdopen(os.dup(1), "w")  # private channel for the result line
    apply_limits(settings)
    isolation = {"network": enter_network_namespace() if settings["network_namespace"] else "none"}
    isolation["uid"] = drop_privileges(workdir) if settings["drop_privileges"] else os.geteuid()
    isolation["audit_guard"] = bool(settings["audit_guard"])
    os.chdir(workdir)
    os.umask(0o077)
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]  # a later import goes through the guard's import check again
    if settings["audit_guard"]:
        sys.addaudithook(make_guard(workdir))
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    status, detail = "passed", ""
    try:
        if settings["require_network_namespace"] and isolation["network"] == "none":
            raise PermissionError("sandbox: no network namespace could be created (required)")
        exec(compile(request["program"], "<candidate>", "exec"), {"__name__": "__main__"})
    except BaseException as error:  # SystemExit and KeyboardInterrupt too: the tests did not finish
        status, detail = "failed", f"{type(error).__name__}: {error}"[:500]
    verdict.write(json.dumps({"nonce": request["nonce"], "status": status, "detail": detail,
                              "isolation": isolation}) + "\n")
    verdict.flush()
    os._exit(0)  # skip atexit handlers and thread joins the program may have set up


if __name__ == "__main__":
    main()
