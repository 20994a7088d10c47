"""System: a DAG of components wired by field names, run in a deterministic topological order.

    system = System([analyst, selector, solver], metric=accuracy, final_outputs=["answer"],
                    inputs=["question", "context"])
    trace = system.run(example)                                   # one run, every step recorded
    trace = system.run(example, overrides={"solver": "New instruction"})   # run-scoped, thread-safe
    result = system.evaluate(examples, workers=8)                 # per-example scores and errors

What the LRF engine uses (all run-scoped, nothing global is touched):

- ``system.run_component(name, inputs, variable=...)``: one component on stored inputs with a candidate
  variable, e.g. to score candidate prompts/choices.
- ``system.run_downstream(name, outputs, trace, seed=...)``: replace one component's outputs in a
  recorded trace and re-run only the components that depend on them (rollouts); other fields are kept.
- ``system.run(example, start_from=name, given=fields)``: run ``name`` and its descendants, every other
  field taken from ``given`` (or the example).

Overrides map a variable *address* (``"component"`` or ``"component.key"``) to a value (a Variable or a
raw value: str for a Prompt, dict for a Choice, module/path for Weights). They travel as arguments down
the call path, never through shared state, so concurrent runs cannot see each other's overrides.

Errors inside a run (a component raising, a wrong output set, a failing metric) never propagate: the
trace records them (``trace.error``, ``trace.failed_component``, ``trace.traceback``) and a failed run
scores 0. Wrong *arguments* (unknown override address, non-dict example) raise at once, and so does
``optimas_fast.lm.errors.BudgetExceeded``: a budget stop ends the evaluation, it is no example's failure.

Step hooks: ``run`` / ``evaluate`` with ``hooks={"name": hook}`` let ``hook(component, inputs, variable, ctx)
-> (outputs, record)`` make component ``name``'s step instead of the plain call: it may call the component
several times (``call_component``, sub-calls under ``context.usage_scope``, billed to ``ctx.usage``), and
``record`` lands in ``step.best_of``. Reward-guided best-of-N (``optimas_fast.best_of.BestOfN``) is such a
hook; the system knows nothing of rewards.

State: ``state_dict()`` is a JSON-safe dict of every variable (Weights tensors as base64 safetensors
bytes, see ``variables.py``) plus a signature of the system; ``load_state_dict`` checks the signature
so that a state from another system is a clear error, and builds every new variable before assigning
any, so a failed load leaves the system unchanged.
"""

from __future__ import annotations

import contextvars
import copy
import heapq
import json
import logging
import math
import os
import time
import traceback as tb
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from optimas_fast._io import atomic_write_text
from optimas_fast._validate import is_int
from optimas_fast.lm.errors import BudgetExceeded
from optimas_fast.system.component import Component, ComponentError
from optimas_fast.system.context import RunContext, usage_scope
from optimas_fast.system.trace import EvalResult, Step, Trace
from optimas_fast.system.variables import Choice, Variable, Weights, variable_from_state

__all__ = ["System", "STATE_FORMAT", "StepHook", "call_component"]

log = logging.getLogger(__name__)

STATE_FORMAT = "optimas_fast.system.state/1"

Metric = Callable[[Mapping, Mapping], float]

# hook(component, inputs, variable, ctx) -> (outputs, record or None): makes one component's step (see above)
StepHook = Callable[[Component, dict, Any, RunContext], "tuple[dict, dict | None]"]


def call_component(c: Component, inputs: Mapping[str, Any], var: Any) -> dict[str, Any]:
    """One plain call of ``c`` with ``var`` already resolved (overrides applied): its checked outputs.

    Calls ``forward`` directly rather than ``Component.__call__``, which would resolve ``var`` a second time.
    """
    missing = [f for f in c.inputs if f not in inputs]
    if missing:
        raise ComponentError(f"component '{c.name}': missing input fields {missing}")
    return c.check_outputs(c.forward(variable=var, **{f: inputs[f] for f in c.inputs}))


def score_trace(trace: Trace, metric: Callable[[], Any]) -> None:
    """Sets ``trace.score`` from ``metric()`` (0.0 when the run failed); a metric that raises or returns a
    non-finite value is this example's failure, recorded in ``trace.error``, never propagated."""
    trace.score = 0.0
    if trace.error is not None:
        return
    try:
        value = float(metric())
        if not math.isfinite(value):
            raise ValueError(f"metric returned {value}")
        trace.score = value
    except BudgetExceeded:
        raise  # a metric-call budget (optimas_fast.optimize.budget) stops the evaluation; no example's failure
    except Exception as exc:  # noqa: BLE001 — a metric failure is this example's failure
        trace.error = f"metric: {type(exc).__name__}: {exc}"
        trace.traceback = tb.format_exc()


class System:
    """A compound system; see the module docstring.

    Args:
        components: the components, in declaration order (which breaks ties in the run order).
        metric: ``metric(example, prediction) -> float`` in [0, 1]; ``prediction`` holds the final outputs.
        final_outputs: field names that form the prediction.
        inputs: field names the examples provide. When given, any component input that is neither
            produced nor listed is a construction error; when None, they are inferred as every field
            no component produces (a missing one then fails the run that needs it).
        name: a label stored in states and logs.
    """

    def __init__(
        self,
        components: Sequence[Component],
        metric: Metric,
        final_outputs: Sequence[str],
        *,
        inputs: Sequence[str] | None = None,
        name: str = "system",
    ):
        if isinstance(components, Component) or not isinstance(components, Sequence) or not components:
            raise ValueError("System(components): expected a non-empty list of Component")
        for c in components:
            if not isinstance(c, Component):
                raise TypeError(f"System(components): {c!r} is not a Component")
        if not callable(metric):
            raise TypeError("System(metric): expected a callable metric(example, prediction) -> float")
        if isinstance(final_outputs, str) or not isinstance(final_outputs, Sequence) or not final_outputs:
            raise ValueError("System(final_outputs): expected a non-empty list of field names")
        self.name = name
        self.metric = metric
        self.final_outputs = tuple(final_outputs)
        self.components: dict[str, Component] = {}
        for c in components:
            if c.name in self.components:
                raise ValueError(f"System: two components are named '{c.name}'")
            self.components[c.name] = c

        # field -> producing component; two producers of one field make the data flow ambiguous.
        self.producers: dict[str, str] = {}
        for c in components:
            for f in c.outputs:
                if f in self.producers:
                    raise ValueError(f"System: field '{f}' is produced by both '{self.producers[f]}' and '{c.name}'")
                self.producers[f] = c.name
        consumed = [f for c in components for f in c.inputs]
        if inputs is None:
            self.inputs = tuple(dict.fromkeys(f for f in consumed if f not in self.producers))
        else:
            self.inputs = tuple(inputs)
            clash = [f for f in self.inputs if f in self.producers]
            if clash:
                raise ValueError(
                    f"System: fields {clash} are declared as system inputs but also produced by "
                    f"{sorted({self.producers[f] for f in clash})}"
                )
            for c in components:
                missing = [f for f in c.inputs if f not in self.producers and f not in self.inputs]
                if missing:
                    raise ValueError(
                        f"System: component '{c.name}' reads {missing}, which no component produces "
                        f"and which are not system inputs {list(self.inputs)}"
                    )
        missing_final = [f for f in self.final_outputs if f not in self.producers]
        if missing_final:
            raise ValueError(f"System: final outputs {missing_final} are not produced by any component")

        self.order: list[str] = self._topological_order(components)
        self._position = {name: i for i, name in enumerate(self.order)}
        self._children: dict[str, set[str]] = {n: set() for n in self.components}
        for c in components:
            for f in c.inputs:
                if f in self.producers:
                    self._children[self.producers[f]].add(c.name)

    # ----------------------------------------------------------------------------------------------
    # graph
    def _topological_order(self, components: Sequence[Component]) -> list[str]:
        """Kahn's algorithm with a heap on declaration index: the same DAG always runs in the same order."""
        index = {c.name: i for i, c in enumerate(components)}
        deps = {c.name: {self.producers[f] for f in c.inputs if f in self.producers} for c in components}
        users: dict[str, list[str]] = {c.name: [] for c in components}
        for name, ds in deps.items():
            for d in ds:
                users[d].append(name)
        indegree = {name: len(ds) for name, ds in deps.items()}
        ready = [(index[n], n) for n, k in indegree.items() if k == 0]
        heapq.heapify(ready)
        order = []
        while ready:
            _, name = heapq.heappop(ready)
            order.append(name)
            for u in users[name]:
                indegree[u] -= 1
                if indegree[u] == 0:
                    heapq.heappush(ready, (index[u], u))
        if len(order) != len(components):
            stuck = [c.name for c in components if c.name not in set(order)]
            raise ValueError(f"System: the field dependencies form a cycle among components {stuck}")
        return order

    def descendants(self, name: str) -> list[str]:
        """Components that (transitively) read ``name``'s outputs, in run order."""
        self._check_component(name)
        seen: set[str] = set()
        stack = list(self._children[name])
        while stack:
            n = stack.pop()
            if n not in seen:
                seen.add(n)
                stack.extend(self._children[n])
        return sorted(seen, key=self._position.__getitem__)

    def _check_component(self, name: str) -> Component:
        if name not in self.components:
            raise ValueError(f"System '{self.name}': no component named {name!r} (has {list(self.components)})")
        return self.components[name]

    # ----------------------------------------------------------------------------------------------
    # variables and overrides
    def variables(self) -> dict[str, Variable]:
        """Every optimizable variable by address, in run order."""
        out: dict[str, Variable] = {}
        for name in self.order:
            out.update(self.components[name].variables())
        return out

    def _split_address(self, address: str) -> tuple[str, str | None]:
        if not isinstance(address, str):
            raise TypeError(f"variable address must be a str, got {type(address).__name__}")
        comp, _, key = address.partition(".")
        c = self._check_component(comp)
        if c.variable is None:
            raise ValueError(f"component '{comp}' has no variable (address {address!r})")
        if key and c._single:
            raise ValueError(f"component '{comp}' has a single variable: address it as {comp!r}, not {address!r}")
        return comp, (key or None)

    def _resolve_overrides(self, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
        """{component: value passed to forward}, validated and coerced now so bad overrides fail early."""
        if overrides is None:
            return {}
        if not isinstance(overrides, Mapping):
            raise TypeError(f"overrides must be a dict {{address: value}}, got {type(overrides).__name__}")
        per_comp: dict[str, Any] = {}
        for address, value in overrides.items():
            comp, key = self._split_address(address)
            if key is None:
                per_comp[comp] = value
            else:
                existing = per_comp.setdefault(comp, {})
                if not isinstance(existing, dict):
                    raise ValueError(f"overrides give both {comp!r} and {address!r}")
                existing[key] = value
        return {comp: self.components[comp].resolve_variable(v) for comp, v in per_comp.items()}

    def set_variable(self, address: str, value: Any) -> None:
        """Permanently sets one variable (e.g. accepting an optimizer's candidate)."""
        comp, key = self._split_address(address)
        c = self.components[comp]
        if key is None:
            c.variable = c.resolve_variable(value)
        else:
            c.variable = c.resolve_variable({key: value})

    def copy(self) -> System:
        """An independent copy for optimizing (DSPy's convention: the optimizer returns a new program and
        leaves its input as it was). Each component is ``Component.copy()``: variables are independent,
        while LM clients, caches, indexes and models are shared; the graph and the metric are shared (never
        changed after construction)."""
        new = copy.copy(self)
        new.components = {name: c.copy() for name, c in self.components.items()}
        return new

    # ----------------------------------------------------------------------------------------------
    # running
    def run(
        self,
        example: Mapping[str, Any],
        overrides: Mapping[str, Any] | None = None,
        *,
        seed: int | None = None,
        start_from: str | None = None,
        given: Mapping[str, Any] | None = None,
        score: bool = True,
        hooks: Mapping[str, StepHook] | None = None,
    ) -> Trace:
        """Runs the system on one example and returns its Trace (errors are recorded, not raised).

        Args:
            example: the example's fields (system inputs and whatever the metric reads, e.g. the gold).
            overrides: {address: value} applied to this run only.
            seed: sampling seed handed to components' LM calls (distinct seeds give distinct rollouts).
            start_from: run only this component and its descendants; other fields come from ``given``
                or the example.
            given: field values that take precedence over the example's.
            score: compute ``metric(example, prediction)``.
            hooks: {component: hook} making that component's step (see the module docstring), e.g. best-of-N.
        """
        if not isinstance(example, Mapping):
            raise TypeError(f"System.run(example): expected a dict of fields, got {type(example).__name__}")
        hooks = self._check_hooks(hooks)
        resolved = self._resolve_overrides(overrides)
        fields = dict(example)
        if given is not None:
            if not isinstance(given, Mapping):
                raise TypeError(f"System.run(given): expected a dict of fields, got {type(given).__name__}")
            fields.update(given)
        if start_from is None:
            names = list(self.order)
        else:
            self._check_component(start_from)
            names = [start_from] + self.descendants(start_from)
        return self._execute(example, fields, names, resolved, seed=seed, score=score, prior=None, hooks=hooks)

    def run_component(
        self, name: str, inputs: Mapping[str, Any], variable: Any = None, *, seed: int | None = None
    ) -> dict[str, Any]:
        """Runs one component on ``inputs`` with ``variable`` overriding its current one; returns its outputs.

        Unlike ``run`` this raises on failure (the caller asked for this one call).
        """
        c = self._check_component(name)
        var = c.resolve_variable(variable)
        with usage_scope(name, seed):
            return call_component(c, inputs, var)

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
        """A new trace where ``name``'s outputs are replaced and its descendants re-run (a rollout).

        Components that do not depend on ``name`` keep their recorded outputs (their steps are copied
        with ``reused=True``); ``name``'s own step is copied with the new outputs.
        """
        c = self._check_component(name)
        if not isinstance(trace, Trace):
            raise TypeError(f"run_downstream(trace): expected a Trace, got {type(trace).__name__}")
        new_outputs = c.check_outputs(outputs)
        resolved = self._resolve_overrides(overrides)
        fields = dict(trace.fields)
        fields.update(new_outputs)
        prior = {s.component: s for s in trace.steps}
        if name not in prior:
            raise ValueError(f"run_downstream: the trace has no step for '{name}' (it failed before it)")
        base = prior[name]
        prior[name] = Step(name, dict(base.inputs), dict(new_outputs), base.variable, reused=True)
        return self._execute(
            trace.example, fields, self.descendants(name), resolved, seed=seed, score=score, prior=prior
        )

    def _execute(
        self,
        example: Mapping,
        fields: dict,
        names: list[str],
        resolved: dict[str, Any],
        *,
        seed: int | None,
        score: bool,
        prior: dict[str, Step] | None,
        hooks: Mapping[str, StepHook] | None = None,
    ) -> Trace:
        t0 = time.perf_counter()
        to_run = set(names)
        trace = Trace(example=example, fields=fields, steps=[], seed=seed)
        for name in self.order:
            if name not in to_run:
                if prior is not None and name in prior:
                    s = prior[name]
                    trace.steps.append(
                        Step(s.component, s.inputs, s.outputs, s.variable, s.seconds, s.usage, s.error, reused=True)
                    )
                continue
            c = self.components[name]
            var = resolved[name] if name in resolved else c.variable
            missing = [f for f in c.inputs if f not in fields]
            if missing:
                trace.error = f"component '{name}': missing input fields {missing} (not in the example or upstream)"
                trace.failed_component = name
                trace.steps.append(Step(name, {}, None, var, error=trace.error))
                break
            inputs = {f: fields[f] for f in c.inputs}
            s0 = time.perf_counter()
            record = None
            with usage_scope(name, seed) as ctx:
                try:
                    if hooks and name in hooks:
                        outputs, record = hooks[name](c, inputs, var, ctx)
                        outputs = c.check_outputs(outputs)
                    else:
                        outputs = call_component(c, inputs, var)
                    err = None
                except BudgetExceeded:
                    raise  # a budget stop ends the whole run/evaluation cleanly; it is no example's fault
                except Exception as exc:  # noqa: BLE001 — a failed component is recorded, never propagated
                    outputs, err = None, f"component '{name}': {type(exc).__name__}: {exc}"
                    trace.traceback = tb.format_exc()
            trace.steps.append(
                Step(name, inputs, outputs, var, time.perf_counter() - s0, ctx.usage, err, best_of=record)
            )
            if err is not None:
                trace.error, trace.failed_component = err, name
                break
            fields.update(outputs)

        if trace.error is None:
            trace.prediction = {f: fields[f] for f in self.final_outputs if f in fields}
            if len(trace.prediction) != len(self.final_outputs):
                trace.error = f"final outputs {[f for f in self.final_outputs if f not in fields]} were not produced"
                trace.prediction = None
        if score:
            score_trace(trace, lambda: self.metric(example, trace.prediction))
        trace.seconds = time.perf_counter() - t0
        return trace

    def _check_hooks(self, hooks: Mapping[str, StepHook] | None) -> dict[str, StepHook]:
        """``hooks`` as a dict, checked: a mapping of this system's component names to callables."""
        if hooks is None:
            return {}
        if not isinstance(hooks, Mapping):
            raise TypeError(f"hooks must be a dict {{component: hook}}, got {type(hooks).__name__}")
        for name, hook in hooks.items():
            if not isinstance(name, str) or name not in self.components:
                raise ValueError(
                    f"hooks: no component named {name!r} in system '{self.name}' (has {list(self.components)})"
                )
            if not callable(hook):
                raise TypeError(
                    f"hooks[{name!r}] must be callable (component, inputs, variable, ctx) -> "
                    f"(outputs, record), got {type(hook).__name__}"
                )
        return dict(hooks)

    def evaluate(
        self,
        examples: Iterable[Mapping[str, Any]],
        *,
        workers: int = 1,
        overrides: Mapping[str, Any] | None = None,
        seed: int | None = None,
        hooks: Mapping[str, StepHook] | None = None,
    ) -> EvalResult:
        """Runs every example (``workers`` threads) and returns per-example scores, errors and traces.

        A failed example (a component or the metric raised, the example is malformed) scores 0 and keeps
        its error; nothing is dropped, and results are in input order whatever the thread timing.
        ``hooks``: step hooks, as in ``run`` (e.g. best-of-N: ``optimas_fast.best_of.BestOfN.evaluate``).
        """
        if not is_int(workers) or workers < 1:
            raise ValueError(f"evaluate(workers): expected an int >= 1, got {workers!r}")
        examples = list(examples)
        self._resolve_overrides(overrides)  # fail early on bad overrides, not once per example
        self._check_hooks(hooks)  # and on bad hooks
        t0 = time.perf_counter()

        def one(example: Any) -> Trace:
            try:
                return self.run(example, overrides, seed=seed, hooks=hooks)
            except BudgetExceeded:
                raise
            except Exception as exc:  # noqa: BLE001 — e.g. an example that is not a dict
                return Trace(
                    example=example if isinstance(example, Mapping) else {"example": example},
                    fields={},
                    steps=[],
                    score=0.0,
                    error=f"example: {type(exc).__name__}: {exc}",
                    traceback=tb.format_exc(),
                )

        if workers == 1 or len(examples) <= 1:
            traces = [one(e) for e in examples]
        else:
            # each task runs in a copy of the caller's context, so contextvars set around evaluate (the LM
            # layer's current ledger and budget, for one) apply inside the worker threads too
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="optimas-eval") as pool:
                futures = [pool.submit(contextvars.copy_context().run, one, e) for e in examples]
                traces = [f.result() for f in futures]
        for i, t in enumerate(traces):
            if t.error is not None:
                log.warning("evaluate: example %d failed: %s", i, t.error)
        return EvalResult(
            scores=[float(t.score or 0.0) for t in traces],
            errors=[t.error for t in traces],
            traces=traces,
            seconds=time.perf_counter() - t0,
        )

    # ----------------------------------------------------------------------------------------------
    # state
    def signature(self) -> dict:
        """Component names with their fields and variable kinds; two systems with equal signatures can
        exchange states."""
        return {
            name: {
                "inputs": list(c.inputs),
                "outputs": list(c.outputs),
                "variable": c.variable_kinds(),
            }
            for name, c in self.components.items()
        }

    def state_dict(self) -> dict:
        """JSON-safe state of every variable (see the module docstring)."""
        return {
            "format": STATE_FORMAT,
            "system": self.name,
            "signature": self.signature(),
            "variables": {addr: var.to_state() for addr, var in self.variables().items()},
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restores every variable from ``state_dict()`` output; a state of another system is a ValueError."""
        if not isinstance(state, Mapping):
            raise TypeError(f"load_state_dict(state): expected a dict, got {type(state).__name__}")
        if state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"load_state_dict: unknown state format {state.get('format')!r}, expected {STATE_FORMAT!r}"
            )
        theirs, ours = state.get("signature"), self.signature()
        if theirs != ours:
            raise ValueError("load_state_dict: the state is for a different system: " + _signature_diff(ours, theirs))
        states = state.get("variables")
        current = self.variables()
        if not isinstance(states, Mapping) or set(states) != set(current):
            got = sorted(states) if isinstance(states, Mapping) else states
            raise ValueError(f"load_state_dict: variables {got} do not match this system's {sorted(current)}")
        new: dict[str, Variable] = {}
        for addr, var in current.items():
            vs = states[addr]
            if not isinstance(vs, Mapping) or vs.get("kind") != var.kind:
                raise ValueError(f"load_state_dict: variable {addr!r} is a {var.kind}, the state holds {vs!r:.80}")
            if isinstance(var, Weights):
                continue  # loaded in place below, after every other variable is known to be valid
            loaded = variable_from_state(vs)
            if isinstance(var, Choice) and loaded.space != var.space:
                raise ValueError(f"load_state_dict: Choice {addr!r} has a different space in the state")
            new[addr] = loaded
        for addr, var in current.items():
            if isinstance(var, Weights):
                new[addr] = var.load_state(states[addr])
        for addr, var in new.items():
            self.set_variable(addr, var)

    def save_state(self, path: str | os.PathLike) -> None:
        """Writes ``state_dict()`` as JSON atomically (temp file, fsync, rename)."""
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        atomic_write_text(path, json.dumps(self.state_dict(), indent=1, sort_keys=True))

    def load_state(self, path: str | os.PathLike) -> None:
        """Reads a JSON state written by ``save_state``."""
        with open(path, encoding="utf-8") as f:
            try:
                state = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"load_state: {path} is not valid JSON ({exc})") from exc
        self.load_state_dict(state)

    def describe(self) -> str:
        """A few lines: each component in run order with its fields and variable."""
        lines = [f"System '{self.name}' (inputs {list(self.inputs)} -> outputs {list(self.final_outputs)})"]
        for name in self.order:
            c = self.components[name]
            lines.append(f"  {name}: {list(c.inputs)} -> {list(c.outputs)}; variable {c.variable!r}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"System(name={self.name!r}, order={self.order})"


def _signature_diff(ours: Mapping, theirs: Any) -> str:
    if not isinstance(theirs, Mapping):
        return "the state has no signature"
    missing = [n for n in ours if n not in theirs]
    unexpected = [n for n in theirs if n not in ours]
    if missing or unexpected:
        return f"components missing from the state {missing}, unexpected in the state {unexpected}"
    diffs = [n for n in ours if ours[n] != theirs[n]]
    return "; ".join(f"'{n}': ours {ours[n]}, state {theirs[n]}" for n in diffs)
