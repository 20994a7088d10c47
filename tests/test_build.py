"""The build: a missing C++ compiler is a clear error (never a silent pure-Python install), and the
extension exposes what the Python layer needs without linking against torch."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_missing_compiler_is_a_clear_error(tmp_path):
    env = dict(os.environ, CC="/nonexistent/bin/g++", CXX="/nonexistent/bin/g++")
    res = subprocess.run(
        [
            sys.executable,
            "setup.py",
            "-q",
            "build_ext",
            "--build-temp",
            str(tmp_path / "t"),
            "--build-lib",
            str(tmp_path / "l"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode != 0
    assert "needs a C++17 compiler" in res.stderr + res.stdout
    assert not list(tmp_path.rglob("_C*.so"))


def test_extension_does_not_link_torch():
    import optimas_fast._C as C

    if sys.platform != "linux":
        pytest.skip("ldd check is Linux-only")
    out = subprocess.run(["ldd", C.__file__], capture_output=True, text=True).stdout
    assert "libtorch" not in out and "libc10" not in out
    for name in (
        "multihead_score_fwd",
        "multihead_score_bwd",
        "fused_head_bt",
        "bt_loss_rows",
        "last_token_fwd",
        "last_token_bwd",
        "max_threads",
    ):
        assert hasattr(C, name), name


def test_extension_checks_raw_arguments():
    """The binding re-checks what would corrupt memory even if the Python wrapper were bypassed."""
    import numpy as np
    import optimas_fast._C as C

    x = np.ones((2, 3), dtype=np.float32)
    ids = np.array([0, 5], dtype=np.int64)  # 5 is out of range for C = 2
    W = np.ones((2, 3), dtype=np.float32)
    b = np.zeros(2, dtype=np.float32)
    out = np.empty(2, dtype=np.float32)
    with pytest.raises(ValueError, match="head_ids"):
        C.multihead_score_fwd(0, 2, 3, 2, x.ctypes.data, ids.ctypes.data, W.ctypes.data, b.ctypes.data, out.ctypes.data)
    with pytest.raises(ValueError, match="dtype code"):
        C.multihead_score_fwd(
            7, 2, 3, 2, x.ctypes.data, np.zeros(2, np.int64).ctypes.data, W.ctypes.data, b.ctypes.data, out.ctypes.data
        )
    with pytest.raises(ValueError, match="position"):
        C.last_token_fwd(2, 3, 3, 4, x.ctypes.data, np.array([0, 3], np.int64).ctypes.data, out.ctypes.data)
