"""Builds the one native extension, optimas_fast._C, from csrc/.

The extension takes raw buffers (pointers + shapes) and never links against PyTorch, so one build
works with any torch. A missing C++ compiler is an error: we never fall back to a silent pure-Python
install, because the fast paths are the point of the package.
"""

import glob
import os
import shutil
import subprocess
import sys
import tempfile

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

SOURCES = ["csrc/bindings.cpp", "csrc/cpu_ops.cpp", "csrc/scheduler.cpp", "csrc/wordpiece.cpp"]


def _compiles(compiler: str, flags: list[str]) -> bool:
    """True if `compiler flags` builds and links a tiny OpenMP program."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "t.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(){return omp_get_max_threads() > 0 ? 0 : 1;}\n")
        cmd = [compiler, src, "-o", os.path.join(tmp, "t"), *flags]
        return subprocess.run(cmd, capture_output=True).returncode == 0


class BuildExt(build_ext):
    def build_extensions(self):
        cxx = self.compiler.compiler_so[0] if getattr(self.compiler, "compiler_so", None) else None
        if cxx is None or shutil.which(cxx) is None:
            raise RuntimeError(
                "optimas-fast needs a C++17 compiler to build its native extension optimas_fast._C "
                f"(looked for {cxx!r}). Install one (Debian/Ubuntu: `apt-get install g++`; macOS: "
                "`xcode-select --install`) and run the install again."
            )
        compile_flags = ["-O3", "-std=c++17", "-fvisibility=hidden"]
        # A source build runs on the machine that built it, so tune for it unless asked not to
        # (OPTIMAS_FAST_PORTABLE=1 for wheels that travel).
        if os.environ.get("OPTIMAS_FAST_PORTABLE", "0") != "1":
            compile_flags.append("-march=native")
        link_flags = []
        if _compiles(cxx, ["-fopenmp"]):
            compile_flags.append("-fopenmp")
            link_flags.append("-fopenmp")
        else:
            print("optimas-fast: WARNING: the compiler has no OpenMP; CPU kernels run on one thread", file=sys.stderr)
        for ext in self.extensions:
            ext.extra_compile_args += compile_flags
            ext.extra_link_args += link_flags
        super().build_extensions()


class BuildPy(build_py):
    """Copies the Triton kernels (top-level kernels/*.py) into the built optimas_fast/kernels package.

    kernels/ has no __init__.py on purpose: with the repository root on sys.path (python -c, a notebook or a
    script started there) a regular package there would shadow Hugging Face's `kernels`, which transformers
    imports. In a source checkout or an editable install optimas_fast/kernels/__init__.py reaches the folder
    through its __path__; a wheel carries the modules inside the package instead."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "optimas_fast", "kernels")
        self.mkpath(target)
        for src in sorted(glob.glob(os.path.join("kernels", "*.py"))):
            self.copy_file(src, os.path.join(target, os.path.basename(src)))


setup(
    packages=find_packages(include=["optimas_fast", "optimas_fast.*"]),
    # the example data sets ship inside the package (a clone or a wheel needs nothing beside it)
    package_data={"optimas_fast": ["data/*.jsonl", "data/*.csv", "data/README.md"]},
    ext_modules=[Pybind11Extension("optimas_fast._C", SOURCES, cxx_std=17)],
    cmdclass={"build_ext": BuildExt, "build_py": BuildPy},
    zip_safe=False,
)
