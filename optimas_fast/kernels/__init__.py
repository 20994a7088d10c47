"""Triton kernels, imported as ``optimas_fast.kernels.<module>`` (only when a Triton backend is selected:
importing triton is slow and, on a CPU, the kernels run only under TRITON_INTERPRET=1).

Their source lives in the repository's top-level ``kernels/`` folder, which has no ``__init__.py`` on
purpose: a regular package there would shadow Hugging Face's ``kernels`` (which transformers imports)
whenever the repository root is on ``sys.path`` -- ``python -c``, a script or a notebook started there.
A wheel carries the modules here, beside this file (setup.py copies them in); a source checkout or an
editable install reaches them through this package's ``__path__``.
"""

from pathlib import Path

_HERE = Path(__file__).resolve().parent
_SOURCE = _HERE.parents[1] / "kernels"  # <repo>/optimas_fast/kernels -> <repo>/kernels
if not (_HERE / "_utils.py").is_file() and _SOURCE.is_dir():
    __path__.append(str(_SOURCE))
