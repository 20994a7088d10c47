"""The sandbox for generated code: each hostile program ends ok=False with a clear reason, a normal one ends
ok=True with its output, and afterwards the calling process and the machine are healthy (it can still spawn
processes; nothing of the sandbox uid is left; the working directory is gone)."""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid

import pytest

from optimas_fast import sandbox
from optimas_fast.sandbox import SandboxError, run_python, sandbox_mode

ISOLATED = sandbox_mode() in ("root", "userns")  # network and filesystem isolation need namespaces
needs_ns = pytest.mark.skipif(not ISOLATED, reason=f"sandbox mode {sandbox_mode()!r}: no namespaces on this platform")


def procs_of(uid):
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
            except (OSError, StopIteration):
                continue
            if str(uid) in uids:
                pids.append(int(entry))
    return pids


def run_bounded(code, limit_s=60.0, **kwargs):
    """run_python in a thread with an outer bound, so that a sandbox bug fails the test instead of hanging it."""
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", run_python(code, **kwargs)), daemon=True)
    t.start()
    t.join(limit_s)
    assert not t.is_alive(), f"run_python did not return within {limit_s}s"
    return box["r"]


def assert_healthy(res):
    assert subprocess.run(["true"], timeout=30).returncode == 0  # the caller can still spawn processes
    if sandbox_mode() in ("root", "uid"):
        assert res.uid is not None and res.uid != os.getuid()
        assert procs_of(res.uid) == [], f"processes of sandbox uid {res.uid} left behind"
    assert res.workdir and not os.path.exists(os.path.dirname(res.workdir)), "working directory not removed"


def test_normal_program_ok():
    res = run_bounded(
        "import os, sys\nopen('out.txt', 'w').write('42')\nprint(open('out.txt').read(), os.getcwd())\n"
        "print('warn', file=sys.stderr)",
        timeout_s=10,
    )
    assert res.ok and res.returncode == 0 and res.reason == "ok" and res.kind == "ok"
    value, cwd = res.stdout.split()
    assert value == "42" and cwd == res.workdir  # writes inside the working directory work
    assert res.stderr == "warn\n" and not res.truncated
    if sandbox_mode() == "root":
        assert {"netns", "mntns", "pidns", "private-tmp"} <= set(res.isolation)
        assert f"uid {res.uid}" in res.isolation
    assert_healthy(res)


def test_exit_code_and_exception_reason():
    res = run_bounded("import sys; sys.exit(3)")
    assert not res.ok and res.returncode == 3 and res.reason == "exit code 3" and res.kind == "exit"
    res = run_bounded("raise ValueError('bad input 7')")
    assert not res.ok and res.returncode == 1 and "ValueError: bad input 7" in res.reason
    assert_healthy(res)


def test_infinite_loop_times_out():
    res = run_bounded("while True:\n    pass\n", timeout_s=1.5, cpu_s=30)
    assert not res.ok and res.kind == "timeout" and res.reason.startswith("timeout after 1.5s")
    assert res.returncode is None
    assert_healthy(res)


def test_cpu_limit():
    res = run_bounded("while True:\n    pass\n", timeout_s=20, cpu_s=1)
    assert not res.ok and res.kind == "cpu" and "CPU time limit (1s)" in res.reason
    assert_healthy(res)


def test_sleeping_program_times_out_on_wall_clock():
    res = run_bounded("import time; time.sleep(60)", timeout_s=1)
    assert not res.ok and res.kind == "timeout"
    assert_healthy(res)


@pytest.mark.parametrize("swallow", [True, False], ids=["retrying", "crashing"])
def test_fork_bomb_is_contained(swallow):
    body = "    try:\n        os.fork()\n    except OSError:\n        pass\n" if swallow else "    os.fork()\n"
    res = run_bounded("import os\nwhile True:\n" + body, limit_s=60, timeout_s=2 if swallow else 20, max_procs=8)
    assert not res.ok
    if swallow:  # never stops on its own: the timeout ends it, and the process count shows the limit held
        assert res.kind == "timeout"
        if res.procs is not None:
            assert res.procs <= 8 and "process limit reached" in res.reason
    else:  # the first failed fork kills the main process: the limit is what it reports
        assert res.kind == "procs" and "process limit (8)" in res.reason and "BlockingIOError" in res.reason
    assert_healthy(res)


def test_processes_that_leave_the_group_are_killed():
    code = (
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(120)\n"
        "    os._exit(0)\nprint('parent done')\n"
    )
    res = run_bounded(code, timeout_s=5)
    assert res.ok and res.stdout == "parent done\n"
    assert_healthy(res)  # the daemonised grandchild is gone too


def test_memory_hog():
    res = run_bounded(
        "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 2**20))\n", timeout_s=20, memory_mb=256
    )
    assert not res.ok and res.kind == "memory" and "memory limit (256 MB)" in res.reason
    assert "MemoryError" in res.reason
    assert_healthy(res)


@needs_ns
@pytest.mark.parametrize("where", ["tmp", "repo", "home"])
def test_writing_outside_the_working_directory_fails(where):
    target = {
        "tmp": f"/tmp/optimas-sandbox-escape-{uuid.uuid4().hex}",
        "repo": os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))), f"escape-{uuid.uuid4().hex}.txt"
        ),
        "home": os.path.join(os.path.expanduser("~"), f"escape-{uuid.uuid4().hex}.txt"),
    }[where]
    res = run_bounded(f"open({target!r}, 'w').write('escaped')", timeout_s=10)
    assert not res.ok, res.reason
    if target.startswith(("/tmp/", "/var/tmp/")) and where != "tmp" and ISOLATED:
        # a checkout under /tmp (CI clones there) is hidden by the sandbox's empty private /tmp: the folder
        # does not exist inside, which blocks the write as surely as a read-only mount
        assert "No such file or directory" in res.reason, res.reason
    else:
        assert res.kind == "filesystem", res.reason
        assert "Read-only file system" in res.reason or "Permission denied" in res.reason
    assert not os.path.exists(target)
    assert_healthy(res)


def test_environment_secret_is_not_inherited(monkeypatch):
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    monkeypatch.setenv("SECRET_TOKEN", secret)
    res = run_bounded("import os; print(os.environ['SECRET_TOKEN'])", timeout_s=10)
    assert not res.ok and res.kind == "exit" and "KeyError: 'SECRET_TOKEN'" in res.reason
    assert secret not in res.stdout + res.stderr
    # nor can it be read from the caller's /proc entry, nor is anything of the caller's environment there
    res = run_bounded(
        f"import os\nprint(dict(os.environ))\ntry:\n"
        f"    print(open('/proc/{os.getpid()}/environ').read())\n"
        "except OSError as e:\n    print('denied', e)\n",
        timeout_s=10,
    )
    assert secret not in res.stdout + res.stderr
    assert "SECRET_TOKEN" not in res.stdout
    if ISOLATED:
        assert "denied" in res.stdout
    assert_healthy(res)


@needs_ns
def test_socket_connection_fails():
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        res = run_bounded(
            f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=3).sendall(b'x')", timeout_s=10
        )
        assert not res.ok and res.kind == "network" and "network disabled" in res.reason, res.reason
        with pytest.raises(socket.timeout):
            server.accept()  # nothing ever reached the server
    finally:
        server.close()
    assert_healthy(res)


def test_output_is_bounded():
    res = run_bounded(
        "import sys\nfor _ in range(200):\n    sys.stdout.write('x' * 100000)\nprint('end', file=sys.stderr)",
        timeout_s=20,
        max_output_bytes=1000,
    )
    assert res.ok and len(res.stdout) == 1000 and res.truncated and res.stderr == "end\n"
    assert_healthy(res)


def test_concurrent_runs_are_independent():
    results = [None] * 4

    def one(i):
        results[i] = run_python(f"import os\nprint({i} * 10)", timeout_s=20)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r.stdout for r in results] == [f"{i * 10}\n" for i in range(4)]
    if sandbox_mode() in ("root", "uid"):
        assert len({r.uid for r in results}) == 4  # each run its own uid: no shared process budget
    for r in results:
        assert_healthy(r)


def test_bad_arguments():
    with pytest.raises(TypeError, match="code"):
        run_python(b"print(1)")
    with pytest.raises(ValueError, match="timeout_s"):
        run_python("pass", timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        run_python("pass", memory_mb=-5)
    with pytest.raises(ValueError, match="max_procs"):
        run_python("pass", max_procs=1.5)
    with pytest.raises(ValueError, match="cpu_s"):
        run_python("pass", cpu_s=-1)
    with pytest.raises(TypeError, match="env"):
        run_python("pass", env={"A": 1})
    with pytest.raises(SandboxError, match="python"):
        run_python("pass", python="/nonexistent/python")


def test_extra_env_is_passed():
    res = run_bounded("import os; print(os.environ['GREETING'], sorted(os.environ))", env={"GREETING": "hi"})
    assert res.ok and res.stdout.startswith("hi ")
    assert "SECRET_TOKEN" not in res.stdout


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.access("/usr/bin/python3", os.X_OK) or not shutil.which("setpriv"),
    reason="needs root (to become an unprivileged user), a system python3 and setpriv (util-linux)",
)
def test_unprivileged_caller_gets_user_namespaces():
    """The non-root path: the module run by an unprivileged user (nobody) picks the userns mode where the kernel
    allows it, and still blocks the network and writes outside the working directory; or reports plain mode."""
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "optimas_fast", "sandbox.py")
    tmp_path = pathlib.Path(tempfile.mkdtemp())  # pytest's tmp_path sits in a root-only folder
    try:
        _run_as_nobody(src, tmp_path)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def _run_as_nobody(src, tmp_path):
    (tmp_path / "sandbox.py").write_bytes(open(src, "rb").read())
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import importlib.util, json, sys\n"
        "spec = importlib.util.spec_from_file_location('sbx', sys.argv[1])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['sbx'] = m; spec.loader.exec_module(m)\n"
        "out = {'mode': m.sandbox_mode()}\n"
        "for name, code in [('ok', 'print(6 * 7)'),\n"
        "                   ('net', \"import socket; socket.create_connection(('127.0.0.1', 9), 1)\"),\n"
        "                   ('tmp', \"open('/tmp/optimas-nonroot-escape', 'w')\"),\n"
        "                   ('bomb', 'import os\\nwhile True:\\n    os.fork()\\n')]:\n"
        "    r = m.run_python(code, timeout_s=5, max_procs=8)\n"
        "    out[name] = [r.ok, r.kind, r.stdout]\n"
        "print(json.dumps(out))\n"
    )
    os.chmod(tmp_path, 0o755)
    for p in tmp_path.iterdir():
        os.chmod(p, 0o644)
    proc = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            str(driver),
            str(tmp_path / "sandbox.py"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["ok"] == [True, "ok", "42\n"]
    assert out["bomb"][:2] == [False, "procs"]
    if out["mode"] == "userns":
        assert out["net"][:2] == [False, "network"] and out["tmp"][:2] == [False, "filesystem"]
    else:
        assert out["mode"] == "plain"
    assert not os.path.exists("/tmp/optimas-nonroot-escape") or out["mode"] == "plain"
    assert procs_of(65534) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="the 'uid' fallback is root's (namespaces refused)")
def test_uid_fallback_mode_contains_fork_bombs_and_escapees():
    """Root without namespaces (a container without CAP_SYS_ADMIN): the fresh uid alone bounds the processes,
    and every process of that uid, including a setsid escapee, is killed after the run."""
    python = sandbox._select()[1]
    kw = dict(
        timeout_s=3.0,
        memory_mb=256,
        max_procs=8,
        cpu_s=None,
        file_size_mb=1,
        max_open_files=32,
        max_output_bytes=4096,
        env=None,
    )
    res = sandbox._run("uid", "import os; print(os.getuid())", python, **kw)
    assert res.ok and res.stdout == f"{res.uid}\n" and "netns" not in res.isolation
    bomb = sandbox._run(
        "uid", "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n", python, **kw
    )
    assert not bomb.ok and bomb.kind == "timeout" and bomb.procs is not None and bomb.procs <= 8
    assert_healthy(bomb)
    escapee = sandbox._run(
        "uid",
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(120)\nprint('done')\n",
        python,
        **kw,
    )
    assert escapee.ok and escapee.stdout == "done\n"
    assert_healthy(escapee)
