"""A DSPy program as a System: the program's own ``forward`` runs, each predictor is a component.

    system = ProgramSystem(program, metric, lm=dspy_lm)   # metric(example, prediction, trace=None), DSPy's form
    trace = system.run(dspy.Example(question="...", answer="...").with_inputs("question"))
    trace["rewrite"].inputs, trace["rewrite"].outputs     # what that predictor saw and said in this run
    trace = system.run(example, overrides={"answer": "Answer in one word."})   # run-scoped, thread-safe

(optional extra: ``pip install optimas-fast[dspy]``; dspy is imported when a ProgramSystem is built, never at
import of ``optimas_fast.system``.)

How it works:

- The system runs a private deep copy of the program (the *working copy*); the program passed in is never
  touched. Every predictor of the copy (``named_predictors()``: a ``dspy.Predict``, or the inner Predict of
  a ``ChainOfThought``) becomes a ``PredictorComponent`` (inputs/outputs = its signature's fields, variable
  = a ``Prompt`` holding its instructions) and gets a per-instance ``forward`` hook. Outside a system run
  the hook calls the predictor's own ``forward``: the working copy behaves exactly like the program.
- Inside a run (a ``contextvars`` value, so runs on other threads never see it) each predictor call runs
  with *this run's* instructions, passed as Predict's ``signature=`` argument (nothing shared is mutated),
  records a ``Step`` (inputs, outputs, usage) in call order, and is attributed to its component in the LM
  usage ledger (``usage_scope``).
- Rollouts (``run_downstream``): the forward runs again on the same example; calls before the replaced
  component replay their recorded outputs (no LM call), its first call returns the given outputs, and the
  rest runs for real. So any control flow works: loops, branches, plain Python between predictors.
- A predictor called several times in one run records one Step per call; ``trace.step(name)`` (what
  preference collection reads) is its first call, and a rollout replaces the first call's outputs.
- Each predictor call's DSPy trace entry ``(predictor, inputs, prediction)`` lands in ``dspy.settings.trace``
  as usual (a fresh list per run); the metric is called as DSPy's evaluator does, ``metric(example,
  prediction, None)``, with the program's own Prediction.

- Step hooks (``run/evaluate(hooks={predictor: hook})``) work as in ``System``: each call of that predictor is
  made by the hook (single-predictor calls), e.g. reward-guided best-of-N (``optimas_fast.best_of.BestOfN``).

Not supported: ``run(start_from=..., given=...)`` (the program's forward decides the data flow; rollouts go
through ``run_downstream``) and async programs (``aforward``).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import re
import time
import traceback as tb
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from optimas_fast.lm.errors import BudgetExceeded
from optimas_fast.system.component import Component
from optimas_fast.system.context import usage_scope
from optimas_fast.system.system import System, score_trace
from optimas_fast.system.trace import Step, Trace
from optimas_fast.system.variables import Prompt

__all__ = ["PredictorComponent", "ProgramSystem", "component_name"]


def _dspy():
    try:
        import dspy
    except ImportError as exc:
        raise ImportError("the DSPy integration needs dspy: pip install 'optimas-fast[dspy]'") from exc
    return dspy


def component_name(dspy_name: str) -> str:
    """Component name for a DSPy predictor path: ``answer.predict`` -> ``answer``, ``hops[0]`` -> ``hops_0``
    (dots separate variable keys in our addresses, so none may remain)."""
    name = dspy_name[: -len(".predict")] if dspy_name.endswith(".predict") else dspy_name
    return re.sub(r"_+", "_", re.sub(r"[^0-9A-Za-z_]", "_", name)).strip("_") or "predictor"


def budget_cause(exc: BaseException) -> BudgetExceeded | None:
    """The BudgetExceeded inside ``exc`` if any: DSPy wraps engine failures in its own LMError (``raise ...
    from exc``), and a budget stop must reach the loop as itself, not as one example's failure."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, BudgetExceeded):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


@functools.lru_cache(maxsize=1024)
def _with_instructions(signature: type, text: str) -> type:
    # a Signature class per (signature, instruction): building one is a pydantic model creation (~1 ms), and
    # the optimizers run the same few candidates on many inputs. lru_cache is thread-safe.
    return signature if signature.instructions == text else signature.with_instructions(text)


@dataclass
class _Run:
    """One run of the program (or one call of a single predictor) in progress on this context."""

    program: Any  # the working copy this run belongs to (a hook of another system's copy ignores the run)
    variables: dict[str, Prompt]  # component -> the Prompt it runs with (overrides applied)
    seed: int | None = None  # sampling seed handed to the LM calls
    record: bool = True  # False: a single predictor called as a component (run_component, optimizers)
    steps: list[Step] = field(default_factory=list)  # the calls so far, in call order
    replay: list[Step] | None = None  # recorded steps a rollout reuses while they match (its prefix)
    target: tuple[str, dict] | None = None  # (component, outputs): its first call returns these
    target_done: bool = False
    failed: str | None = None  # the component whose call raised first
    system: Any = None  # the ProgramSystem running (its components, for step hooks)
    hooks: dict = field(default_factory=dict)  # component -> step hook (System.run's hooks), e.g. best-of-N

    def call(self, name: str, predictor: Any, original: Callable, kwargs: dict) -> Any:
        dspy = _dspy()
        sig = kwargs.pop("signature", None) or predictor.signature
        if isinstance(sig, str):
            sig = dspy.ensure_signature(sig)
        var = self.variables[name]
        run_sig = _with_instructions(sig, var.text)
        if not self.record:  # a component call: the caller (System.run_component, run_batch) scopes usage
            return self._real(original, run_sig, kwargs)
        inputs = {k: v for k, v in kwargs.items() if k in sig.input_fields}
        if self.target is not None and not self.target_done and name == self.target[0]:
            self.target_done = True
            return self._reuse(predictor, name, inputs, dict(self.target[1]), var)
        if self.replay is not None and not self.target_done and len(self.steps) < len(self.replay):
            rec = self.replay[len(self.steps)]
            if rec.component == name and rec.outputs is not None and rec.inputs == inputs:
                return self._reuse(predictor, name, rec.inputs, rec.outputs, rec.variable)
        s0 = time.perf_counter()
        record = None
        with usage_scope(name, self.seed) as ctx:
            try:
                if name in self.hooks:  # the hook makes single-predictor calls (PredictorComponent)
                    comp = self.system.components[name]
                    outputs, record = self.hooks[name](comp, inputs, var, ctx)
                    prediction = dspy.Prediction(**comp.check_outputs(outputs))
                else:
                    prediction = self._real(original, run_sig, kwargs)
            except Exception as exc:
                self.steps.append(
                    Step(name, inputs, None, var, time.perf_counter() - s0, ctx.usage, f"{type(exc).__name__}: {exc}")
                )
                self.failed = self.failed or name
                raise
        outputs = {f: prediction.get(f) for f in sig.output_fields}
        self.steps.append(Step(name, inputs, outputs, var, time.perf_counter() - s0, ctx.usage, best_of=record))
        return prediction

    @staticmethod
    def _real(original: Callable, sig: type, kwargs: dict) -> Any:
        try:
            return original(signature=sig, **kwargs)
        except Exception as exc:
            budget = budget_cause(exc)
            if budget is not None and budget is not exc:
                raise budget from None
            raise

    def _reuse(self, predictor: Any, name: str, inputs: dict, outputs: dict, var: Any) -> Any:
        dspy = _dspy()
        prediction = dspy.Prediction(**outputs)
        trace = dspy.settings.trace
        if trace is not None:  # what the real call would have left in DSPy's trace
            trace.append((predictor, dict(inputs), prediction))
        self.steps.append(Step(name, dict(inputs), dict(outputs), var, reused=True))
        return prediction


_RUN: contextvars.ContextVar[_Run | None] = contextvars.ContextVar("optimas_fast_dspy_run", default=None)


def _install_hook(predictor: Any, name: str, program: Any) -> None:
    # the class's forward bound to this predictor (read off the class: DSPy warns on ``module.forward`` access
    # from anywhere but Module.__call__)
    original = type(predictor).forward.__get__(predictor)

    def forward(**kwargs):
        run = _RUN.get()
        if run is None or run.program is not program or name not in run.variables:
            return original(**kwargs)
        return run.call(name, predictor, original, kwargs)

    # an instance attribute: Module.__call__ looks ``self.forward`` up on the instance first. Only the
    # system's private working copy carries it; named_parameters/dump_state ignore plain functions.
    predictor.forward = forward


class PredictorComponent(Component):
    """One predictor of a ProgramSystem's working copy. Called alone (``run_component``, the optimizers'
    batches) it runs that predictor with the given instructions under the system's LM."""

    def __init__(
        self, name: str, dspy_name: str, predictor: Any, program: Any, *, lm: Any = None, description: str | None = None
    ):
        sig = predictor.signature
        super().__init__(
            name,
            inputs=list(sig.input_fields),
            outputs=list(sig.output_fields),
            description=description or sig.instructions or name,
            variable=Prompt(sig.instructions),
        )
        self.dspy_name = dspy_name  # its path in the program (``answer.predict``)
        self.predictor = predictor  # the working copy's predictor (shared by System.copy: it holds no state)
        self.program = program
        self.lm = lm  # a dspy LM for its calls (None: the ambient dspy.settings.lm)

    #: threads of ``forward_batch``: concurrent calls let a batching LM backend (the embedded engine, a server)
    #: decode the optimizers' (candidate, input) rows together instead of one at a time
    batch_workers: int = 8

    def forward(self, variable: Prompt, **inputs) -> dict:
        dspy = _dspy()
        settings: dict[str, Any] = {"trace": None}  # nobody reads a lone call's DSPy trace: keep none
        if self.lm is not None:
            settings["lm"] = self.lm
        token = _RUN.set(_Run(self.program, {self.name: variable}, record=False))
        try:
            with dspy.context(**settings):
                prediction = self.predictor(**inputs)
        finally:
            _RUN.reset(token)
        return {f: prediction.get(f) for f in self.outputs}

    def forward_batch(self, batch: Sequence[Mapping[str, Any]], variable: Prompt) -> list[dict]:
        """``forward`` on every row, on up to ``batch_workers`` threads (each in a copy of the caller's context:
        the usage scope, ledger and seed follow); results in row order; the first failure raises."""
        if len(batch) <= 1 or self.batch_workers <= 1:
            return [self.forward(variable, **row) for row in batch]
        with ThreadPoolExecutor(min(self.batch_workers, len(batch)), thread_name_prefix="optimas-dspy") as pool:
            futures = [
                pool.submit(contextvars.copy_context().run, functools.partial(self.forward, variable, **row))
                for row in batch
            ]
            return [f.result() for f in futures]


class ProgramSystem(System):
    """A DSPy program as a System (see the module docstring).

    Args:
        program: a ``dspy.Module`` with at least one predictor; it is deep-copied, never changed.
        metric: DSPy's ``metric(example, prediction, trace=None) -> float | bool``.
        lm: a dspy LM (``dspy.BaseLM``) for the program's calls, e.g. ``optimas_fast.dspy.DSPyLM``; None uses
            the ambient ``dspy.settings.lm``. A predictor with its own ``lm`` keeps it (DSPy's precedence).
        name: a label stored in states and logs.
    """

    def __init__(self, program: Any, metric: Callable[..., Any], *, lm: Any = None, name: str = "dspy"):
        dspy = _dspy()
        if not isinstance(program, dspy.Module):
            raise TypeError(f"ProgramSystem(program): expected a dspy.Module, got {type(program).__name__}")
        if not callable(metric):
            raise TypeError("ProgramSystem(metric): expected a callable metric(example, prediction, trace=None)")
        if lm is not None and not isinstance(lm, dspy.BaseLM):
            raise TypeError(f"ProgramSystem(lm): expected a dspy.BaseLM or None, got {type(lm).__name__}")
        if not program.named_predictors():
            raise ValueError(
                f"ProgramSystem(program): {type(program).__name__} has no predictors (dspy.Predict, "
                "ChainOfThought, ...) to optimize"
            )
        self.program = program.deepcopy()  # the working copy: hooks go on it, never on the caller's program
        self.dspy_lm = lm
        self.dspy_metric = metric
        components: list[PredictorComponent] = []
        for dspy_name, predictor in self.program.named_predictors():
            cname, k = component_name(dspy_name), 2
            while any(c.name == cname for c in components):  # "a.b" and "a_b" both map to "a_b"
                cname, k = f"{component_name(dspy_name)}_{k}", k + 1
            _install_hook(predictor, cname, self.program)
            components.append(PredictorComponent(cname, dspy_name, predictor, self.program, lm=lm))

        # System's graph, built by hand: a program's predictors need not have distinct field names (two hops
        # may both write ``query``), and the data flow is the forward's, not a DAG of field names.
        self.name = name
        self.metric = lambda example, prediction: metric(example, prediction, None)
        self.components = {c.name: c for c in components}
        self.order = [c.name for c in components]  # declaration order (named_predictors)
        self._position = {n: i for i, n in enumerate(self.order)}
        # "descendants" = predictors declared later: what a rollout may re-run (a program may call them in
        # any order; the loop only uses this to skip repeated rollouts of a last predictor)
        self._children = {n: set(self.order[i + 1 :]) for i, n in enumerate(self.order)}
        self.producers = {}
        params = [
            p
            for p in inspect.signature(type(self.program).forward).parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ][1:]  # [1:]: self
        # what a dict example must provide: the forward's parameters; a forward(**kwargs) (Predict,
        # ChainOfThought) takes its first predictor's input fields
        self.inputs = tuple(p.name for p in params) or tuple(components[0].inputs)
        self.final_outputs = tuple(components[-1].outputs)  # for describe(); the prediction is the forward's

    # ----------------------------------------------------------------------------------------------
    def descendants(self, name: str) -> list[str]:
        self._check_component(name)
        return self.order[self._position[name] + 1 :]

    def predictor_paths(self) -> dict[str, str]:
        """Component name -> the predictor's path in the program (``answer.predict``)."""
        return {n: c.dspy_name for n, c in self.components.items()}

    def program_inputs(self, example: Any) -> dict[str, Any]:
        """The keyword arguments of ``program(**inputs)`` for an example: ``example.inputs()`` of a
        ``dspy.Example`` (``with_inputs`` must have been called), or the forward's parameters from a dict."""
        dspy = _dspy()
        if isinstance(example, dspy.Example):
            if example._input_keys is None:
                raise ValueError(
                    f"ProgramSystem.run(example): {example!r:.120} has no input keys; build it with "
                    "dspy.Example(...).with_inputs('field', ...)"
                )
            return dict(example.inputs().items())
        if isinstance(example, Mapping):
            return {k: example[k] for k in self.inputs if k in example}
        raise TypeError(f"ProgramSystem.run(example): expected a dspy.Example or a dict, got {type(example).__name__}")

    def run(
        self,
        example: Any,
        overrides: Mapping[str, Any] | None = None,
        *,
        seed: int | None = None,
        start_from: str | None = None,
        given: Mapping[str, Any] | None = None,
        score: bool = True,
        hooks: Mapping[str, Any] | None = None,
    ) -> Trace:
        """Runs the program's forward on one example (errors are recorded in the trace, not raised).
        ``hooks={predictor: hook}``: that predictor's calls are made by the hook, as in ``System.run`` (e.g.
        best-of-N: ``optimas_fast.best_of.BestOfN``)."""
        if start_from is not None or given is not None:
            raise ValueError(
                "ProgramSystem.run: start_from/given are not supported (the program's forward decides "
                "the data flow); use run_downstream to replace one predictor's outputs"
            )
        hooks = self._check_hooks(hooks)
        return self._run_program(example, self._resolve_overrides(overrides), seed, score, hooks=hooks)

    def run_downstream(
        self,
        name: str,
        outputs: Mapping[str, Any],
        trace: Trace,
        overrides: Mapping[str, Any] | None = None,
        *,
        seed: int | None = None,
        score: bool = True,
    ) -> Trace:
        """A rollout: the forward again on ``trace``'s example, ``name``'s first call returning ``outputs``;
        calls before it replay their recorded outputs, calls after it run (see the module docstring)."""
        c = self._check_component(name)
        if not isinstance(trace, Trace):
            raise TypeError(f"run_downstream(trace): expected a Trace, got {type(trace).__name__}")
        new_outputs = c.check_outputs(outputs)
        first = next((i for i, s in enumerate(trace.steps) if s.component == name), None)
        if first is None:
            raise ValueError(f"run_downstream: the trace has no step for '{name}' (the run did not call it)")
        return self._run_program(
            trace.example,
            self._resolve_overrides(overrides),
            seed,
            score,
            replay=trace.steps[:first],
            target=(name, new_outputs),
        )

    def _run_program(
        self,
        example: Any,
        resolved: dict,
        seed: int | None,
        score: bool,
        *,
        replay: list[Step] | None = None,
        target: tuple[str, dict] | None = None,
        hooks: Mapping[str, Any] | None = None,
    ) -> Trace:
        dspy = _dspy()
        inputs = self.program_inputs(example)
        variables = {n: (resolved[n] if n in resolved else c.variable) for n, c in self.components.items()}
        run = _Run(self.program, variables, seed, replay=replay, target=target, system=self, hooks=dict(hooks or {}))
        fields = dict(example.items()) if hasattr(example, "items") else dict(inputs)
        trace = Trace(example=example, fields=fields, steps=run.steps, seed=seed)
        t0 = time.perf_counter()
        prediction = None
        settings = {"trace": []}  # a fresh DSPy trace per run: runs on other threads never share one
        if self.dspy_lm is not None:
            settings["lm"] = self.dspy_lm
        token = _RUN.set(run)
        try:
            with dspy.context(**settings):
                prediction = self.program(**inputs)
        except BudgetExceeded:
            raise  # a budget stop ends the whole run/evaluation cleanly; it is no example's fault
        except Exception as exc:  # noqa: BLE001 — a failed run is recorded, never propagated
            budget = budget_cause(exc)
            if budget is not None:
                raise budget from None
            where = f"component '{run.failed}'" if run.failed else "program"
            trace.error, trace.failed_component = f"{where}: {type(exc).__name__}: {exc}", run.failed
            trace.traceback = tb.format_exc()
        finally:
            _RUN.reset(token)
        if trace.error is None:
            trace.prediction = _prediction_fields(prediction)
            trace.fields.update(trace.prediction)
        if score:
            score_trace(trace, lambda: self.dspy_metric(example, prediction, None))
        trace.seconds = time.perf_counter() - t0
        return trace

    def describe(self) -> str:
        lines = [f"ProgramSystem '{self.name}' ({type(self.program).__name__}.forward{tuple(self.inputs)})"]
        for name in self.order:
            c = self.components[name]
            lines.append(f"  {name} ({c.dspy_name}): {list(c.inputs)} -> {list(c.outputs)}; variable {c.variable!r}")
        return "\n".join(lines)


def _prediction_fields(prediction: Any) -> dict:
    """The trace's dict form of what forward returned (a Prediction's fields; a dict as is; else one field)."""
    if hasattr(prediction, "items") and callable(prediction.items):
        return dict(prediction.items())
    return {"prediction": prediction}
