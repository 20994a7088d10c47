"""GEPA (the ``gepa`` package, an optional extra: ``pip install 'optimas-fast[gepa]'``) over a ``System``.

``SystemAdapter`` implements GEPA's adapter protocol (``gepa.core.adapter.GEPAAdapter``):

- a *candidate* is ``{variable address: instruction text}`` for every optimized ``Prompt`` variable; Choice and
  Weights variables stay as configured (GEPA only edits text: part of what the comparison shows);
- ``evaluate(batch, candidate, capture_traces)`` runs the system on the batch with the candidate's texts as
  run-scoped overrides and returns the per-example metric scores, the predictions and (when asked) the traces;
- ``make_reflective_dataset`` turns each trace's step of the component owning an address into a record
  ``{"Inputs", "Generated Outputs", "Feedback"}``; the feedback is the run's score, its error if it failed,
  and the gold fields the metric reads (the example's fields that are not system inputs).

The reflection LM is the config's proposer; ``max_metric_calls`` is the budget. GEPA counts ``len(batch)`` per
evaluation and checks its count between iterations, so its last iteration can reach past the budget; the
cell's counter stops that call before its metric runs, and the method returns the best candidate found on
the full validation set so far (GEPA's own choice rule: the highest validation mean). The adapter records
every full-validation evaluation, which is also the anytime curve.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

try:  # the optional extra: without it the method is skipped with the install line, nothing else breaks
    import gepa
    from gepa.core.adapter import EvaluationBatch
except ImportError as _exc:  # pragma: no cover - gepa is part of the test install
    gepa, EvaluationBatch, _GEPA_MISSING = None, None, str(_exc)

from optimas_fast.compare.methods import Cell, MethodResult, MethodSkipped
from optimas_fast.lm.usage import usage_scope
from optimas_fast.optimize.budget import MetricBudgetExceeded
from optimas_fast.render import format_value
from optimas_fast.system import Prompt, System

__all__ = ["SystemAdapter", "run_gepa"]

log = logging.getLogger(__name__)

FEEDBACK_CHARS = 400  # per gold field in a feedback line (reflection prompts stay short for small LMs)


def _key(example: Any) -> str:
    return json.dumps(example, sort_keys=True, default=str)


class SystemAdapter:
    """GEPA's adapter protocol over a ``System`` (module docstring)."""

    # the protocol's optional hook, read by GEPA's reflective proposer: None = GEPA's own instruction proposal
    # (the reflection LM rewrites each component's text from its reflective records)
    propose_new_texts = None

    def __init__(
        self,
        system: System,
        addresses: Sequence[str],
        valset: Sequence[Mapping],
        *,
        workers: int,
        seed: int,
        on_val=None,
    ):
        self.system = system
        self.addresses = list(addresses)
        self.workers, self.seed = workers, seed
        self._val_keys = sorted(_key(e) for e in valset)
        self.on_val = on_val  # called with (candidate, mean) after every full-validation evaluation

    # --- GEPA's protocol ---------------------------------------------------------------------------------
    def evaluate(self, batch: list, candidate: dict[str, str], capture_traces: bool = False):
        overrides = {a: Prompt(candidate[a]) for a in self.addresses if a in candidate}
        res = self.system.evaluate(batch, workers=self.workers, overrides=overrides, seed=self.seed)
        if (
            self.on_val is not None
            and len(batch) == len(self._val_keys)
            and sorted(_key(e) for e in batch) == self._val_keys
        ):
            self.on_val(dict(candidate), res.mean)
        return EvaluationBatch(
            outputs=[t.prediction for t in res.traces],
            scores=list(res.scores),
            trajectories=list(res.traces) if capture_traces else None,
        )

    def make_reflective_dataset(self, candidate: dict[str, str], eval_batch, components_to_update: list[str]):
        gold_fields = lambda ex: {k: v for k, v in ex.items() if k not in self.system.inputs and k != "id"}  # noqa: E731
        out: dict[str, list[dict]] = {}
        for address in components_to_update:
            name = address.split(".")[0]
            records = []
            for trace, score in zip(eval_batch.trajectories or [], eval_batch.scores, strict=False):
                try:
                    step = trace.step(name)
                except KeyError:
                    continue  # the run failed before this component
                feedback = f"This run scored {score:.3f} (1 is best)."
                if trace.error:
                    feedback += f" It failed: {trace.error}."
                gold = gold_fields(trace.example)
                if gold:
                    feedback += (
                        " The correct final answer: "
                        + "; ".join(f"{k} = {format_value(v, FEEDBACK_CHARS)}" for k, v in gold.items())
                        + "."
                    )
                records.append(
                    {
                        "Inputs": {k: format_value(v, FEEDBACK_CHARS) for k, v in step.inputs.items()},
                        "Generated Outputs": (
                            {k: format_value(v, FEEDBACK_CHARS) for k, v in step.outputs.items()}
                            if step.outputs is not None
                            else f"(failed: {step.error})"
                        ),
                        "Feedback": feedback,
                    }
                )
            out[address] = records
        return out


class _Reflection:
    """GEPA's ``LanguageModel`` (``prompt -> text``) over the proposer, its calls attributed to "proposer"."""

    def __init__(self, lm: Any, max_tokens: int, temperature: float, seed: int):
        self.lm, self.max_tokens, self.temperature, self.seed = lm, max_tokens, temperature, seed
        self.calls = 0

    def __call__(self, prompt: str | list[dict[str, Any]]) -> str:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        self.calls += 1
        with usage_scope("proposer"):
            out = self.lm.generate(
                [messages], max_tokens=self.max_tokens, temperature=self.temperature, seed=self.seed + self.calls
            )
        return out[0][0].text or ""


class _Logger:
    def log(self, message: str) -> None:
        log.debug("gepa: %s", message)


def run_gepa(cell: Cell) -> MethodResult:
    if gepa is None:
        raise MethodSkipped(f"the gepa package is not installed (pip install 'optimas-fast[gepa]'): {_GEPA_MISSING}")
    system = cell.system.copy()
    addresses = [a for n in cell.targets() for a, v in system.components[n].variables().items() if v.kind == "prompt"]
    if not addresses:
        raise MethodSkipped("the system has no Prompt variable: GEPA only edits text")
    if cell.proposer is None:
        raise MethodSkipped("GEPA needs a reflection LM: the config names no proposer or lm")
    seed_candidate = {a: system.variables()[a].text for a in addresses}
    best = {"candidate": dict(seed_candidate), "val": float("-inf"), "evals": 0}

    def on_val(candidate: dict, mean: float) -> None:
        best["evals"] += 1
        if mean > best["val"]:  # ties keep the earlier candidate, as GEPA's best_idx does
            best["candidate"], best["val"] = candidate, mean
        cell.point(best["val"])

    adapter = SystemAdapter(system, addresses, cell.val, workers=cell.workers, seed=cell.seed, on_val=on_val)
    reflection = _Reflection(
        cell.proposer,
        max_tokens=max(256, cell.loop.prompt.max_tokens),
        temperature=cell.loop.prompt.temperature,
        seed=cell.seed,
    )
    stopped = None
    try:
        gepa.optimize(
            seed_candidate=seed_candidate,
            trainset=list(cell.train),
            valset=list(cell.val),
            adapter=adapter,
            reflection_lm=reflection,
            max_metric_calls=cell.budget,
            seed=cell.seed,
            logger=_Logger(),
            display_progress_bar=False,
            raise_on_exception=True,
        )
    except MetricBudgetExceeded as exc:
        stopped = str(exc)
    if best["evals"] == 0:  # the budget ended before GEPA measured even the seed candidate
        return MethodResult(system, float("nan"), stopped, {"reflections": reflection.calls, "val_evals": 0})
    for address, text in best["candidate"].items():
        system.set_variable(address, Prompt(text))
    return MethodResult(system, best["val"], stopped, {"reflections": reflection.calls, "val_evals": best["evals"]})
