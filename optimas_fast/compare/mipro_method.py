"""DSPy's MIPROv2 on systems that are DSPy programs (``ProgramSystem``), instruction-only, at the cell's budget.

Where it runs: the system must be a ``ProgramSystem`` (a DSPy program wrapped by
``optimas_fast.system.dspy_adapter``), and its LM must follow DSPy's reply format (the ``[[ ## field ## ]]``
markers of DSPy's ChatAdapter). A probe runs the program on two validation examples first (two metric calls,
charged); when every probe run fails to parse, the method is reported as not run, with the error, instead of
a number (the embedded 135M model is in that case). Anything else (a plain ``System``) is not run either:
MIPROv2 optimizes a DSPy program's predictors through DSPy's own ``compile``.

Budget: MIPROv2 has no metric-call limit of its own, so the number of trials comes from the budget: its
demo bootstrap (at most one call per training example for each of k - 1 sets), one full validation pass for the
initial program, then per trial a minibatch of ``minibatch_size`` examples and every
``minibatch_full_eval_steps`` trials a full validation pass (a full pass per trial when the validation set is no
larger than the minibatch). The cell's counter stays the hard cap:
DSPy's evaluator records a refused call as that example's failure, so a run that reaches the cap says so in
``stopped``. Demos are off (``max_bootstrapped_demos = max_labeled_demos = 0``): the comparison is between
instruction optimizers, and a ``Prompt`` variable carries instructions only. The compiled predictors'
instructions are written into the system's ``Prompt`` variables, which the harness then test-evaluates.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from optimas_fast.compare.methods import Cell, MethodResult, MethodSkipped
from optimas_fast.system import Prompt
from optimas_fast.system.dspy_adapter import ProgramSystem

__all__ = ["run_mipro", "NOT_A_PROGRAM"]

log = logging.getLogger(__name__)

NOT_A_PROGRAM = (
    "MIPROv2 optimizes DSPy programs through DSPy's compile; this system is not a DSPy program "
    "(a ProgramSystem), so there is nothing for it to compile"
)
MINIBATCH = 8  # MIPROv2's minibatch per trial (its default 35 exceeds the small validation sets used here)
FULL_EVAL_STEPS = 5  # trials between full validation passes (MIPROv2's default)


def mipro_trials(budget: int, n_val: int, spent: int) -> int:
    """Trials that fit the budget after ``spent`` calls: ``n_val`` (the default program's full pass) +
    T * (one minibatch + a share of the full passes every FULL_EVAL_STEPS trials)."""
    minibatch = min(MINIBATCH, n_val)
    per_trial = n_val if minibatch == n_val else minibatch + n_val / FULL_EVAL_STEPS  # no minibatch: all full
    return max(0, int((budget - spent - n_val) // per_trial))


def run_mipro(cell: Cell) -> MethodResult:
    system = cell.system
    if not isinstance(system, ProgramSystem):
        raise MethodSkipped(NOT_A_PROGRAM)
    try:
        import dspy  # the optional extra (a ProgramSystem exists only when it is installed)

        from optimas_fast.dspy import DSPyLM
    except ImportError as exc:  # pragma: no cover - a ProgramSystem implies dspy
        raise MethodSkipped(f"dspy is not installed: {exc}") from None
    if importlib.util.find_spec("optuna") is None:  # MIPROv2's Bayesian search over instruction candidates
        raise MethodSkipped("DSPy's MIPROv2 needs optuna: pip install optuna")
    probe = cell.val[:2]
    res = system.evaluate(probe, workers=1, seed=cell.seed)
    if probe and all(e is not None for e in res.errors):
        raise MethodSkipped(
            f"the LM does not follow DSPy's reply format: {len(probe)} of {len(probe)} probe runs "
            f"failed ({' '.join(res.errors[0].split())[:200]})"
        )
    k = max(2, cell.loop.prompt.num_proposals)  # instruction candidates per predictor
    # MIPROv2 first bootstraps demo sets on the training set to show its instruction proposer (measured: k - 1
    # of its k sets run the program, each at most one metric call per training example)
    bootstrap = max(0, k - 1) * len(cell.train)
    trials = mipro_trials(cell.budget, len(cell.val), len(probe) + bootstrap)
    if trials < 1:
        raise MethodSkipped(
            f"a budget of {cell.budget} metric calls does not fit one MIPROv2 trial "
            f"({len(cell.val)} validation examples)"
        )

    def example(ex: Any):
        return ex if isinstance(ex, dspy.Example) else dspy.Example(**ex).with_inputs(*system.inputs)

    task_lm = system.dspy_lm or dspy.settings.lm
    prompt_lm = DSPyLM(cell.proposer) if cell.proposer is not None else task_lm
    optimizer = dspy.MIPROv2(
        metric=system.dspy_metric,
        prompt_model=prompt_lm,
        task_model=task_lm,
        auto=None,
        num_candidates=k,
        max_bootstrapped_demos=0,
        max_labeled_demos=0,
        num_threads=cell.workers,
        seed=cell.seed,
        verbose=False,
    )
    student = system.program.deepcopy()
    for _, predictor in student.named_predictors():
        # the working copy's predictors carry the system's run hook as an instance ``forward`` (a closure over
        # the working copy's own predictor): a deep copy would keep calling that predictor, whatever
        # instructions MIPROv2 gives the copy. Without it the class's forward runs, as in the user's program.
        predictor.__dict__.pop("forward", None)
    with dspy.context(lm=task_lm):
        compiled = optimizer.compile(
            student,
            trainset=[example(e) for e in cell.train],
            valset=[example(e) for e in cell.val],
            num_trials=trials,
            minibatch=len(cell.val) > MINIBATCH,
            minibatch_size=MINIBATCH,
            minibatch_full_eval_steps=FULL_EVAL_STEPS,
            requires_permission_to_run=False,
        )
    out = system.copy()
    predictors = dict(compiled.named_predictors())
    for name, path in system.predictor_paths().items():
        if path in predictors:
            out.set_variable(name, Prompt(predictors[path].signature.instructions))
    stopped = None
    if cell.counter.remaining == 0:
        stopped = "budget: max_metric_calls reached (later calls were refused and scored as failures by DSPy)"
    best_val = float(getattr(compiled, "score", float("nan")))
    cell.point(best_val)
    return MethodResult(out, best_val, stopped, {"trials": trials})
