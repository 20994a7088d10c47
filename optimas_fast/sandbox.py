"""Runs untrusted (LM-generated) Python code in a limited child process.

    from optimas_fast.sandbox import run_python
    res = run_python("print(sum(range(10)))", timeout_s=5, memory_mb=256, max_procs=8)
    res.ok, res.stdout, res.reason          # True, "45\\n", "ok"

What a run gets, and how (``SandboxResult.isolation`` lists what applied):

- a fresh temporary directory as its working directory (and HOME, TMPDIR), removed afterwards;
- rlimits: CPU seconds, address space (``memory_mb``), processes (``max_procs``), file size, open files,
  no core files;
- a wall-clock timeout after which the whole process tree is SIGKILLed;
- a minimal environment (PATH, LANG, HOME, TMPDIR, PYTHONDONTWRITEBYTECODE: nothing of the caller's, so
  no secrets) and ``python -I -S`` (no user site, no site-packages, no PYTHON* variables);
- bounded output capture (``max_output_bytes`` of stdout and of stderr are kept, the rest is drained).

Isolation modes, picked once per process by probing (``sandbox_mode()``):

- ``"root"`` (running as root, as on these machines): the child gets fresh network, mount, PID, IPC and
  UTS namespaces and runs as a fresh unprivileged uid/gid (no supplementary groups, no_new_privs). Root
  is exempt from RLIMIT_NPROC, which is why the uid drop matters: the process limit is then enforced, and
  as the uid is unique to the run, concurrent runs do not share one budget. The network namespace has
  only a down loopback, so every connection fails ("Network is unreachable"). The whole filesystem is
  read-only in the child's mount namespace (``mount_setattr``, Linux >= 5.12), and the world-writable
  directories (/tmp, /var/tmp, /dev/shm, /run/lock, /dev/mqueue) are covered by empty read-only
  tmpfs; only the run's working directory is writable. The interpreter must be executable by that uid:
  the caller's when it is, else the system's ``python3`` (a pyenv under /root, mode 0700, is not; the
  code needs the standard library only). The child is PID 1's child in its own PID
  namespace, so killing that namespace's init kills every process the code started, including ones
  that left the process group (``setsid``).
- ``"uid"`` (root, but namespaces refused, e.g. a container without CAP_SYS_ADMIN): the fresh uid, rlimits and
  the timeout; after the run every process of that uid is killed (``kill(-1)`` as that uid). The network
  is NOT disabled; files are protected by ordinary permissions only (world-writable /tmp stays writable).
- ``"userns"`` (not root, unprivileged user namespaces allowed): the same namespaces and read-only
  filesystem inside a user namespace mapping the caller's own uid; the code runs as the caller's uid.
  RLIMIT_NPROC counts all of that uid's processes, so the limit is set to the uid's current count plus
  ``max_procs``.
- ``"plain"`` (not root, no user namespaces): rlimits, timeout, process group, environment and
  working directory only. The network is NOT disabled and files the caller may write are writable by the
  code; processes that call ``setsid`` can outlive the group kill. A warning is logged once.

The supervisor (this file run as a script, by the caller's interpreter) sets the namespaces up, forks
the namespace's init, which forks the program; it enforces the wall-clock timeout and reports the
program's wait status on a private pipe. This module imports only the standard library for that reason.
"""

from __future__ import annotations

import json
import logging
import os
import random
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

__all__ = ["SandboxResult", "SandboxError", "run_python", "sandbox_mode"]

log = logging.getLogger(__name__)

# Linux constants (linux/sched.h, linux/mount.h, linux/prctl.h, fcntl.h)
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x1, 0x2
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (new syscalls are unified since 5.x)
PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER = 38, 36
# world-writable directories covered by an empty root-owned tmpfs in the child's mount namespace
WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/dev/mqueue")
SETUP_FAILED = 125  # supervisor exit code when setting the sandbox up failed (the report says why)
UID_BASE, UID_SPAN = 1_000_000, 1 << 20  # fresh uids for root mode: far above any real account


class SandboxError(RuntimeError):
    """The sandbox itself could not run (no usable interpreter, a bad argument); not the code's failure."""


@dataclass
class SandboxResult:
    ok: bool  # exit code 0 within every limit
    returncode: int | None  # the program's exit code, -N when killed by signal N, None when it never ran
    stdout: str  # at most max_output_bytes (utf-8, undecodable bytes replaced)
    stderr: str
    reason: str  # "ok", "timeout after 2s", "memory limit (256 MB): exit code 1: MemoryError", ...
    kind: str = "ok"  # ok | timeout | cpu | memory | procs | network | filesystem | filesize | signal | exit | setup
    seconds: float = 0.0  # wall time of the run
    truncated: bool = False  # stdout or stderr was cut at max_output_bytes
    isolation: tuple = ()  # what applied, e.g. ("rlimits", "uid 1234567", "netns", "mntns", "pidns", "ro-root")
    procs: int | None = None  # processes alive in the sandbox at the timeout (when it could be counted)
    uid: int | None = None  # the uid the code ran as
    workdir: str = ""  # the working directory it had (removed when run_python returns)
    extra: dict = field(default_factory=dict)


# ======================================================================================================
# caller side
_MODE_LOCK = threading.Lock()
_PROBE_LOCK = threading.Lock()  # one probe at a time: the first callers of several threads wait for it
_MODE: str | None = None
_PYTHON: dict[str, str] = {}
_UIDS_IN_USE: set[int] = set()


def _fresh_uid() -> int:
    with _MODE_LOCK:
        while True:
            uid = UID_BASE + random.randrange(UID_SPAN)
            if uid not in _UIDS_IN_USE:
                _UIDS_IN_USE.add(uid)
                return uid


def _release_uid(uid: int | None) -> None:
    with _MODE_LOCK:
        _UIDS_IN_USE.discard(uid)


def _check_positive(name: str, value, kind=(int, float)) -> None:
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        raise ValueError(f"run_python({name}): expected a positive number, got {value!r}")


def _probe(mode: str, python: str) -> SandboxResult:
    return _run(
        mode,
        "import sys; print(sys.version_info[0])",
        python,
        timeout_s=20,
        memory_mb=256,
        max_procs=8,
        cpu_s=20,
        file_size_mb=1,
        max_open_files=32,
        max_output_bytes=4096,
        env=None,
    )


def _python_candidates() -> list[str]:
    """Interpreters to try, the caller's first. In root mode the caller's may sit under a private home (pyenv
    in /root, mode 0700) that the sandbox uid cannot enter; the system's then serves (the code needs the
    standard library only: it runs with -I -S)."""
    seen, out = set(), []
    for p in (
        sys.executable,
        getattr(sys, "_base_executable", None),
        "/usr/bin/python3",
        "/usr/local/bin/python3",
        shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin"),
    ):
        if p and os.path.isfile(p) and os.path.realpath(p) not in seen:
            seen.add(os.path.realpath(p))
            out.append(os.path.realpath(p))
    return out


def _select() -> tuple[str, str]:
    """(mode, default interpreter), probed once per process by running a trivial program in each mode."""
    with _PROBE_LOCK:
        return _select_locked()


def _select_locked() -> tuple[str, str]:
    global _MODE
    with _MODE_LOCK:
        if _MODE is not None:
            return _MODE, _PYTHON[_MODE]
    tried = []
    modes = ["root", "uid"] if os.geteuid() == 0 else ["userns", "plain"]
    for mode in modes:
        for python in _python_candidates() if os.geteuid() == 0 else [os.path.realpath(sys.executable)]:
            res = _probe(mode, python)
            if res.ok and res.stdout.strip() == "3":
                if mode in ("uid", "plain"):
                    log.warning(
                        "sandbox: no namespaces available (%s): generated code runs with rlimits and a "
                        "timeout only; the network is NOT disabled%s",
                        "; ".join(tried),
                        "" if mode == "uid" else " and the caller's files are writable by it",
                    )
                with _MODE_LOCK:
                    _MODE, _PYTHON[mode] = mode, python
                return mode, python
            tried.append(f"{mode} with {python}: {res.reason} {_last_line(res.stderr)}".strip())
    raise SandboxError("sandbox: no isolation mode works here (tried " + "; ".join(tried) + ")")


def sandbox_mode() -> str:
    """The isolation mode of this process: "root", "uid", "userns" or "plain" (see the module docstring)."""
    return _select()[0]


def run_python(
    code: str,
    *,
    timeout_s: float = 10.0,
    memory_mb: int = 512,
    max_procs: int = 16,
    cpu_s: float | None = None,
    file_size_mb: int = 16,
    max_open_files: int = 64,
    max_output_bytes: int = 64 * 1024,
    python: str | None = None,
    env: dict | None = None,
) -> SandboxResult:
    """Runs ``code`` (Python source) as ``python -I -S main.py`` in the sandbox; never raises for the code's
    failures (they are ``ok=False`` with a ``reason``).

    Args:
        timeout_s: wall-clock limit; the whole process tree is killed after it.
        memory_mb: address-space limit (RLIMIT_AS) of each process.
        max_procs: process (and thread) limit (RLIMIT_NPROC) for the run's uid.
        cpu_s: CPU-seconds limit per process (RLIMIT_CPU); default ``timeout_s`` rounded up.
        file_size_mb: largest file the code may write (RLIMIT_FSIZE).
        max_open_files: RLIMIT_NOFILE.
        max_output_bytes: how much of stdout and of stderr is kept (each).
        python: the interpreter to run the code with (default: the caller's, or in root mode the first
            of a few candidates that the sandbox uid can execute).
        env: extra environment variables for the code (nothing of the caller's environment is passed).
    """
    if not isinstance(code, str):
        raise TypeError(f"run_python(code): expected a str, got {type(code).__name__}")
    _check_positive("timeout_s", timeout_s)
    for name, value in (
        ("memory_mb", memory_mb),
        ("max_procs", max_procs),
        ("file_size_mb", file_size_mb),
        ("max_open_files", max_open_files),
        ("max_output_bytes", max_output_bytes),
    ):
        _check_positive(name, value, int)
    if cpu_s is not None:
        _check_positive("cpu_s", cpu_s)
    if env is not None and (
        not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
    ):
        raise TypeError("run_python(env): expected a dict of str -> str")
    if python is not None and not os.path.isfile(python):
        raise SandboxError(f"run_python(python): {python!r} is not a file")
    mode, default_python = _select()
    interpreter = python or default_python
    return _run(
        mode,
        code,
        interpreter,
        timeout_s=float(timeout_s),
        memory_mb=memory_mb,
        max_procs=max_procs,
        cpu_s=cpu_s,
        file_size_mb=file_size_mb,
        max_open_files=max_open_files,
        max_output_bytes=max_output_bytes,
        env=env,
    )


def _count_user_procs(uid: int) -> int:
    n = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    for line in f:
                        if line.startswith("Uid:"):
                            n += line.split()[1] == str(uid)
                            break
            except OSError:
                pass
    return n


def _run(
    mode: str,
    code: str,
    python: str,
    *,
    timeout_s: float,
    memory_mb: int,
    max_procs: int,
    cpu_s: float | None,
    file_size_mb: int,
    max_open_files: int,
    max_output_bytes: int,
    env: dict | None,
) -> SandboxResult:
    t0 = time.perf_counter()
    drop = mode in ("root", "uid")
    uid = _fresh_uid() if drop else os.getuid()
    gid = uid if drop else os.getgid()
    base = tempfile.mkdtemp(prefix="optimas-sandbox-")
    read_fd = write_fd = None
    proc = None
    try:
        script, work = os.path.join(base, "main.py"), os.path.join(base, "work")
        with open(script, "w", encoding="utf-8") as f:
            f.write(code)
        os.mkdir(work, 0o700)
        os.chmod(base, 0o711)  # the sandbox uid may traverse base and read main.py, not list or write it
        os.chmod(script, 0o644)
        if drop:
            os.chown(work, uid, gid)
        # RLIMIT_NPROC counts every process of the real uid: with the caller's own uid, add what it runs already
        nproc = max_procs if drop else _count_user_procs(uid) + max_procs
        child_env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "HOME": work,
            "TMPDIR": work,
            "PYTHONDONTWRITEBYTECODE": "1",
            **(env or {}),
        }
        read_fd, write_fd = os.pipe()
        cfg = {
            "mode": mode,
            "python": python,
            "script": script,
            "work": work,
            "base": base,
            "uid": uid,
            "gid": gid,
            "timeout_s": timeout_s,
            "report_fd": write_fd,
            "env": child_env,
            "rlimits": {
                "CPU": int(-(-(cpu_s or timeout_s) // 1)),
                "AS": memory_mb << 20,
                "NPROC": nproc,
                "FSIZE": file_size_mb << 20,
                "NOFILE": max_open_files,
                "CORE": 0,
            },
        }
        proc = subprocess.Popen(
            [os.path.realpath(sys.executable), "-I", "-S", os.path.abspath(__file__), json.dumps(cfg)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=work,
            env={"PATH": child_env["PATH"], "LANG": "C.UTF-8"},
            start_new_session=True,
            close_fds=True,
            pass_fds=(write_fd,),
        )
        os.close(write_fd)
        write_fd = None
        out, err, report, truncated = _collect(
            proc, read_fd, deadline=time.monotonic() + timeout_s + 10.0, limit=max_output_bytes
        )
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
        res = _result(
            report,
            out,
            err,
            truncated,
            time.perf_counter() - t0,
            mode,
            uid,
            timeout_s,
            memory_mb,
            max_procs,
            cfg["rlimits"]["CPU"],
            proc.returncode,
        )
        res.workdir = work
        return res
    finally:
        if proc is not None and proc.poll() is None:
            _kill_group(proc)
        for fd in (read_fd, write_fd):
            if fd is not None:
                os.close(fd)
        _rmtree(base)
        if drop:
            _release_uid(uid)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        log.error("sandbox: supervisor %d did not die after SIGKILL", proc.pid)


def _rmtree(path: str) -> None:
    def onerror(func, p, exc):  # a non-root run may leave directories without write permission
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=onerror)
    if os.path.exists(path):
        log.warning("sandbox: could not remove %s", path)


def _collect(proc: subprocess.Popen, report_fd: int, *, deadline: float, limit: int):
    """Reads stdout, stderr (first ``limit`` bytes kept each, the rest drained) and the report pipe until
    all three close; past ``deadline`` (the supervisor is stuck) the process group is killed."""
    bufs = {"out": bytearray(), "err": bytearray(), "rep": bytearray()}
    truncated = False
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "out")
    sel.register(proc.stderr, selectors.EVENT_READ, "err")
    sel.register(report_fd, selectors.EVENT_READ, "rep")
    killed_at = None
    try:
        while sel.get_map():
            now = time.monotonic()
            if now > deadline and killed_at is None:
                log.error("sandbox: supervisor %d passed its deadline; killing its process group", proc.pid)
                _kill_group(proc)
                killed_at = now
            if killed_at is not None and now > killed_at + 2.0:
                break  # something outside the group (a setsid escapee in plain mode) holds a pipe: stop reading
            for key, _ in sel.select(timeout=0.2):
                fd = key.fd
                chunk = os.read(fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = bufs[key.data]
                room = (limit if key.data != "rep" else 1 << 20) - len(buf)
                if room > 0:
                    buf += chunk[:room]
                if len(chunk) > max(room, 0):
                    truncated = truncated or key.data != "rep"
    finally:
        sel.close()
        proc.stdout.close()
        proc.stderr.close()
    report = {}
    for line in bufs["rep"].decode("utf-8", "replace").splitlines():
        try:
            report.update(json.loads(line))
        except ValueError:
            pass
    dec = lambda b: bytes(b).decode("utf-8", "replace")  # noqa: E731
    return dec(bufs["out"]), dec(bufs["err"]), report, truncated


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


# (substring of the program's last stderr line, kind, label); the first match names the failure
_HINTS = (
    ("MemoryError", "memory", "memory limit ({memory_mb} MB)"),
    ("Cannot allocate memory", "memory", "memory limit ({memory_mb} MB)"),
    ("Resource temporarily unavailable", "procs", "process limit ({max_procs})"),
    ("BlockingIOError", "procs", "process limit ({max_procs})"),
    ("Network is unreachable", "network", "network disabled"),
    ("Cannot assign requested address", "network", "network disabled"),
    ("Temporary failure in name resolution", "network", "network disabled"),
    ("Read-only file system", "filesystem", "write outside the working directory refused"),
    ("PermissionError", "filesystem", "permission denied"),
    ("File too large", "filesize", "file size limit"),
)


def _result(
    report: dict,
    out: str,
    err: str,
    truncated: bool,
    seconds: float,
    mode: str,
    uid: int,
    timeout_s: float,
    memory_mb: int,
    max_procs: int,
    cpu_s: int,
    sup_rc: int | None,
) -> SandboxResult:
    isolation = tuple(report.get("isolation", ()))
    common = dict(
        stdout=out,
        stderr=err,
        seconds=seconds,
        truncated=truncated,
        isolation=isolation,
        procs=report.get("procs"),
        uid=uid,
    )
    if "error" in report or "status" not in report:
        why = report.get("error") or f"supervisor exited with {sup_rc} without a report: {_last_line(err)}"
        return SandboxResult(False, None, reason=f"sandbox setup failed: {why}", kind="setup", **common)
    status = report["status"]
    rc = os.waitstatus_to_exitcode(status) if status is not None else None
    if report.get("timed_out"):
        reason = f"timeout after {timeout_s:g}s"
        procs = report.get("procs")
        if procs is not None and procs >= max_procs:
            reason += f"; process limit reached ({procs} processes, limit {max_procs})"
        return SandboxResult(False, rc, reason=reason, kind="timeout", **common)
    if rc == 0:
        return SandboxResult(True, 0, reason="ok", kind="ok", **common)
    if rc is not None and rc < 0:
        sig = -rc
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = "?"
        if sig == signal.SIGXCPU:
            return SandboxResult(
                False, rc, reason=f"CPU time limit ({cpu_s}s): killed by signal {sig} ({name})", kind="cpu", **common
            )
        if sig == signal.SIGXFSZ:
            return SandboxResult(
                False, rc, reason=f"file size limit: killed by signal {sig} ({name})", kind="filesize", **common
            )
        return SandboxResult(False, rc, reason=f"killed by signal {sig} ({name})", kind="signal", **common)
    last = _last_line(err)
    # the last line names the failure; when many processes wrote at once (a fork bomb's children), the
    # failing traceback can sit a few lines higher, so the recent lines are the fallback
    recent = [ln.strip()[:300] for ln in reversed(err.strip().splitlines()[-40:]) if ln.strip()]
    for lines in ([last], recent):
        for needle, kind, label in _HINTS:
            line = next((ln for ln in lines if needle in ln), None)
            if line is not None:
                label = label.format(memory_mb=memory_mb, max_procs=max_procs)
                return SandboxResult(False, rc, reason=f"{label}: exit code {rc}: {line}", kind=kind, **common)
    return SandboxResult(False, rc, reason=f"exit code {rc}" + (f": {last}" if last else ""), kind="exit", **common)


# ======================================================================================================
# supervisor side: runs as ``python -I -S sandbox.py CONFIG`` (a fresh single-threaded process)
_LIBC = None


def _libc():
    """(ctypes, libc), imported once by the supervisor before any fork: after the uid drop the caller's
    standard library may not be readable any more."""
    global _LIBC
    if _LIBC is None:
        import ctypes  # only the supervisor needs it
        import resource  # noqa: F401 — the program's process uses it after the uid drop

        _LIBC = ctypes, ctypes.CDLL(None, use_errno=True)
    return _LIBC


def _check(ret: int, what: str, ctypes) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _setup_namespaces(cfg: dict, isolation: list) -> None:
    ctypes, libc = _libc()
    userns = cfg["mode"] == "userns"
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | (CLONE_NEWUSER if userns else 0)
    _check(libc.unshare(flags), "unshare", ctypes)
    if userns:  # map our own uid/gid so that files in the working directory stay ours
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{cfg['uid']} {cfg['uid']} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{cfg['gid']} {cfg['gid']} 1")
        isolation.append("userns")
    isolation += ["netns", "pidns", "ipcns"]
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /", ctypes)
    isolation.append("mntns")

    class MountAttr(ctypes.Structure):
        _fields_ = [
            ("attr_set", ctypes.c_uint64),
            ("attr_clr", ctypes.c_uint64),
            ("propagation", ctypes.c_uint64),
            ("userns_fd", ctypes.c_uint64),
        ]

    def mount_setattr(path: str, recursive: bool, attr_set: int, attr_clr: int) -> int:
        attr = MountAttr(attr_set, attr_clr, 0, 0)
        libc.syscall.restype = ctypes.c_long
        return libc.syscall(
            ctypes.c_long(SYS_MOUNT_SETATTR),
            ctypes.c_int(AT_FDCWD),
            path.encode(),
            ctypes.c_uint(AT_RECURSIVE if recursive else 0),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        )

    ro_root = mount_setattr("/", True, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0) == 0
    if ro_root:
        isolation.append("ro-root")
    # else (kernel < 5.12): the uid drop and the tmpfs below still keep the code out of writable places
    # opened in this namespace: a bind mount's source must belong to the namespace it is mounted in
    base_fd = os.open(cfg["base"], os.O_PATH | os.O_DIRECTORY)
    covered = [d for d in WORLD_WRITABLE if os.path.isdir(d) and not os.path.islink(d)]
    tmpfs_flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    for d in covered:
        _check(
            libc.mount(b"tmpfs", d.encode(), b"tmpfs", tmpfs_flags, b"size=64k,mode=755"), f"mount tmpfs on {d}", ctypes
        )
    # the run's own directory, hidden by the tmpfs (or read-only), comes back writable at the same path
    os.makedirs(cfg["base"], 0o711, exist_ok=True)
    _check(
        libc.mount(f"/proc/self/fd/{base_fd}".encode(), cfg["base"].encode(), None, MS_BIND, None),
        "bind-mount the working directory",
        ctypes,
    )
    os.close(base_fd)
    for d in covered:  # read-only: in a user namespace the tmpfs belongs to the caller's uid, so mode is no bar
        _check(
            libc.mount(None, d.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY | tmpfs_flags, None),
            f"remount {d} read-only",
            ctypes,
        )
    isolation.append("private-tmp")
    if ro_root:  # a bind mount copies its source's flags: make this one writable again
        _check(mount_setattr(cfg["base"], False, 0, MOUNT_ATTR_RDONLY), "make the working directory writable", ctypes)


def _exec_program(cfg: dict, report_fd: int) -> None:
    """In the program's process: rlimits, the uid drop, then exec. Never returns."""
    import resource  # already imported by _libc(): no file access after the uid drop

    try:
        os.close(report_fd)
        for name, value in cfg["rlimits"].items():
            lim = getattr(resource, f"RLIMIT_{name}")
            hard = value + 1 if name == "CPU" else value  # soft CPU limit: SIGXCPU first, SIGKILL a second later
            resource.setrlimit(lim, (value, hard))
        if cfg["mode"] in ("root", "uid"):
            os.setgroups([])
            os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
            os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
        ctypes, libc = _libc()
        _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)", ctypes)
        os.chdir(cfg["work"])
        os.execve(cfg["python"], [cfg["python"], "-I", "-S", cfg["script"]], cfg["env"])
    except BaseException as exc:  # noqa: BLE001 — report and leave; this is a forked child
        os.write(2, f"optimas-sandbox: could not start the program: {exc}\n".encode())
    os._exit(SETUP_FAILED)


def _init(cfg: dict, report_fd: int, isolation: list) -> None:
    """The namespace's init (or, in plain mode, the group leader): starts the program, reaps every child,
    writes the program's wait status, exits. Never returns."""
    try:
        if cfg["mode"] in ("root", "userns"):
            ctypes, libc = _libc()
            # a fresh /proc shows only the sandbox's processes (and not the host's command lines)
            if libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None) == 0:
                isolation.append("private-proc")
        else:
            os.setpgid(0, 0)
        pid = os.fork()
        if pid == 0:
            _exec_program(cfg, report_fd)
        status = None
        while True:
            try:
                child, st = os.wait()
            except ChildProcessError:
                break
            if child == pid:
                status = st
                break  # init's exit kills the rest of the namespace
        os.write(report_fd, (json.dumps({"status": status, "isolation": isolation}) + "\n").encode())
    except BaseException as exc:  # noqa: BLE001
        os.write(report_fd, (json.dumps({"error": f"init: {exc}"}) + "\n").encode())
    os._exit(0)


def _count_procs(cfg: dict) -> int | None:
    """Processes of the sandbox at the timeout (by its uid), or None where the uid is the caller's own."""
    return _count_user_procs(cfg["uid"]) if cfg["mode"] in ("root", "uid") else None


def _kill_leftovers(cfg: dict, init: int) -> None:
    """Without a PID namespace nothing dies with init: kill what the program left behind."""
    if cfg["mode"] == "uid":
        # every process of the run's (unique) uid, including ones that left the group with setsid: a helper
        # takes that uid and signals everything it may (kill(-1) blocks forks while it runs: no escape)
        helper = os.fork()
        if helper == 0:
            try:
                os.setgroups([])
                os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
                os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
                for _ in range(100):
                    os.kill(-1, signal.SIGKILL)
                    time.sleep(0.005)
            except (ProcessLookupError, PermissionError):
                pass  # ESRCH: nothing of the uid is left
            os._exit(0)
        os.waitpid(helper, 0)
    if cfg["mode"] in ("uid", "plain"):
        try:
            os.killpg(init, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        # the supervisor is a subreaper: the killed orphans are its children now; reap them so that none is
        # left as a zombie (bounded: in plain mode a setsid escapee may still be alive)
        until = time.monotonic() + 2.0
        while time.monotonic() < until:
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    time.sleep(0.01)
            except ChildProcessError:
                break


def _supervise(cfg: dict) -> int:
    report_fd = cfg["report_fd"]
    isolation = ["rlimits", "env", "tmpdir", "pgroup"]
    if cfg["mode"] in ("root", "uid"):
        isolation.append(f"uid {cfg['uid']}")
    try:
        ctypes, libc = _libc()
        if cfg["mode"] in ("root", "userns"):
            _setup_namespaces(cfg, isolation)
        else:  # no PID namespace: orphans of the program reparent to us (and are reaped by us), not to init
            _check(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)", ctypes)
        init = os.fork()
        if init == 0:
            _init(cfg, report_fd, isolation)
    except BaseException as exc:  # noqa: BLE001
        os.write(report_fd, (json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n").encode())
        return SETUP_FAILED
    deadline = time.monotonic() + cfg["timeout_s"]
    delay = 0.001
    timed_out = False
    while not os.waitpid(init, os.WNOHANG)[0]:
        if time.monotonic() >= deadline:
            timed_out = True
            procs = _count_procs(cfg)
            os.kill(init, signal.SIGKILL)  # a PID namespace's init: the kernel kills every process in it
            os.waitpid(init, 0)
            break
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
    _kill_leftovers(cfg, init)
    if timed_out:
        os.write(
            report_fd,
            (json.dumps({"timed_out": True, "status": None, "procs": procs, "isolation": isolation}) + "\n").encode(),
        )
    return 0


if __name__ == "__main__":
    sys.exit(_supervise(json.loads(sys.argv[1])))
