"""Optimas against its peers at equal metric-call budgets: ``compare`` and ``optimas-fast compare``.

    from optimas_fast.compare import compare
    summary = compare("examples/own_pipeline.yaml", methods="unoptimized,optimas,gepa,global,random",
                      budget=200, seeds=3, out="cmp")      # cmp/compare.json, compare.md, compare.png

See ``harness.py`` (cells, budgets, resume), ``methods.py`` (unoptimized, optimas, global, random),
``gepa_method.py`` (GEPA's adapter over a System), ``mipro_method.py`` (DSPy's MIPROv2 on DSPy programs),
``judge.py`` (LRF vs an LLM judge) and ``report.py`` (statistics, Markdown, the anytime plot).
"""

from optimas_fast.compare.harness import DEFAULT_METHODS, FORMAT, JUDGE_EXAMPLES, METHODS, check_methods, compare
from optimas_fast.compare.methods import Cell, MethodResult, MethodSkipped

__all__ = [
    "compare",
    "METHODS",
    "DEFAULT_METHODS",
    "FORMAT",
    "JUDGE_EXAMPLES",
    "check_methods",
    "Cell",
    "MethodResult",
    "MethodSkipped",
]
