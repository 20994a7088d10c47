"""Optimas for DSPy programs, the DSPy way (optional extra: ``pip install optimas-fast[dspy]``).

    import dspy
    from optimas_fast.dspy import DSPyLM, OptimasOptimizer

    lm = DSPyLM("embedded")                      # any make_lm spec, or an optimas_fast.lm.LM
    optimizer = OptimasOptimizer(metric, lm=lm, iterations=6, batch_size=8)
    compiled = optimizer.compile(program, trainset=train, valset=val)   # program itself is left as it was
    compiled.save("qa.json")                     # DSPy's own save/load: the optimized instructions ride along
    optimizer.result.history, optimizer.result.usage                    # the loop's record and LM usage

``OptimasOptimizer`` wraps the program as a ``ProgramSystem`` (``optimas_fast.system.dspy_adapter``): the
program's own ``forward`` runs, whatever its control flow, each predictor is a component whose variable is
its instructions, and every predictor call is recorded from the run. The Optimas loop then trains a local
reward function per predictor and optimizes each predictor's instructions against it, behind a validation
gate. The result is a deep copy of the student with the accepted instructions written into its predictors'
signatures (demos and everything else as they were).

``DSPyLM`` is a ``dspy.BaseLM`` whose calls go through this project's LM layer (``optimas_fast.lm``): the
completion cache, the usage ledger (per predictor, since each call runs in its component's usage scope), the
cost report and the run's budgets cover every call DSPy makes. It plugs into DSPy's 3.4 engine contract
(a ``dspy.LM`` with a custom engine: ``complete(Request) -> Response``), so DSPy's own cache and retries are
off for it (ours apply instead).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

try:
    import dspy  # the real top-level package: absolute imports never resolve to this module
except ImportError as exc:  # pragma: no cover - the extra is part of the test install
    raise ImportError("optimas_fast.dspy needs dspy: pip install 'optimas-fast[dspy]'") from exc
from dspy.clients.base_lm import LM_CLASS_STATE_KEY
from dspy.clients.engines.base import validate_request
from dspy.lm15 import Config as _Config
from dspy.lm15 import Message as _Message
from dspy.lm15 import Request as _Request
from dspy.lm15 import Response as _Response
from dspy.lm15 import Usage as _Usage
from dspy.lm15 import response_to_events

from optimas_fast.lm.base import LM, Completion, Request, SamplingParams, Usage
from optimas_fast.lm.factory import make_lm
from optimas_fast.optimize import ConfigError, Optimas, OptimasConfig, OptimasResult
from optimas_fast.optimize.config import MOVED_KEYS
from optimas_fast.reward import RewardModel, RewardModelConfig
from optimas_fast.system.context import current_run, record_usage
from optimas_fast.system.dspy_adapter import ProgramSystem

__all__ = ["DSPyLM", "OptimasOptimizer", "LOOP_SETTINGS"]

log = logging.getLogger(__name__)

#: the keyword settings OptimasOptimizer accepts besides its own (OptimasConfig's fields)
LOOP_SETTINGS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(OptimasConfig))

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


# --------------------------------------------------------------------------------------------- the LM
class _Engine:
    """DSPy's engine contract (``complete(Request) -> Response``, see ``dspy.clients.engines.base``) over an
    optimas_fast LM: DSPy renders the prompt and parses the reply; the LM layer does the call."""

    def __init__(self, backend: LM, owner: DSPyLM | None = None):
        self.backend = backend
        self.owner = owner  # the DSPyLM whose kwargs (rollout_id) apply; each copy gets its own engine

    def complete(self, request):
        validate_request(request)
        messages = []
        if request.system is not None:
            messages.append({"role": "system", "content": _text(request.system)})
        for m in request.messages:
            text = m.text
            if text is None:
                raise ValueError(
                    f"DSPyLM: a {m.role} message with non-text parts cannot go to an optimas_fast LM (text only)"
                )
            messages.append({"role": _ROLES.get(m.role, "user"), "content": text})
        cfg = request.config  # DSPy fills it from the call's config and the LM's defaults (lm.kwargs)
        temperature = float(cfg.temperature) if cfg.temperature is not None else 0.0
        seed, ctx = cfg.seed, current_run()
        if seed is None and ctx is not None:
            seed = ctx.seed  # the running step's seed: distinct rollouts sample differently
        hot = getattr(ctx, "temperature", None)  # best-of-N candidates sample at least this hot
        if hot is not None:
            temperature = max(temperature, float(hot))
        rollout = self.owner.kwargs.get("rollout_id") if self.owner is not None else None
        if rollout is not None and temperature > 0:
            # DSPy's lm.copy(rollout_id=k, temperature=1.0) asks for distinct samples: fold k into the seed
            # (our cache key holds the seed), deterministically across processes
            seed = zlib.crc32(f"{seed}:{rollout}".encode()) & 0x7FFFFFFF
        out = self.backend.generate(
            [messages],
            n=1,
            temperature=temperature,
            max_tokens=int(cfg.max_tokens or 256),
            stop=list(cfg.stop) or None,
            seed=seed,
        )
        record_usage(out)  # the running step's usage (generate itself updated the ledger)
        c = out[0][0]
        if c.finish_reason == "error":
            raise RuntimeError(f"DSPyLM: the LM call failed: {c.error}")
        return _Response(
            id=None,
            model=request.model,
            message=_Message.assistant(c.text),
            finish_reason="length" if c.finish_reason == "length" else "stop",
            usage=_Usage(input_tokens=c.usage.prompt_tokens, output_tokens=c.usage.completion_tokens),
        )

    def stream(self, request):
        return response_to_events(self.complete(request))

    def close(self) -> None:
        pass  # the backend is shared (make_lm("embedded") is one model per process): never closed here


class _AsyncEngine:
    def __init__(self, sync: _Engine):
        self.sync = sync

    async def complete(self, request):
        # to_thread copies the context: the usage scope and the run's seed follow the call
        return await asyncio.to_thread(self.sync.complete, request)

    async def stream(self, request):
        for event in self.sync.stream(request):
            yield event

    async def aclose(self) -> None:
        pass


def _text(parts: Any) -> str:
    if parts is None or isinstance(parts, str):
        return parts or ""
    return "".join(getattr(p, "text", "") or "" for p in parts)


class DSPyLM(dspy.LM):
    """A dspy LM whose calls go through an ``optimas_fast.lm.LM``: cache, usage ledger, cost, budgets.

    Args:
        lm: an ``optimas_fast.lm.LM``, or a ``make_lm`` spec (``"embedded"``, ``"openai:<model>@<url>"``,
            ``"hf:<path>"``, ``"vllm:<model>"``, or a dict with ``backend``).
        temperature, max_tokens: defaults for calls that do not set them (DSPy's ``lm.kwargs``).

    A ``dspy.LM`` (so a ``dspy.BaseLM``) with a custom engine, DSPy's public route for its own engines.
    DSPy's response cache and retries are off for it: the backend has its own (a second cache would hide
    calls from our accounting; a second retry loop would multiply attempts). A call's seed is the running
    system step's seed unless the request sets one; ``lm.copy(rollout_id=k)`` at temperature > 0 folds k into
    it (distinct samples, as DSPy means it). ``n > 1`` candidates of one call share the seed: use n = 1.
    Saving a predictor that holds a DSPyLM records its spec (one built from an LM instance cannot be saved).
    """

    def __init__(
        self, lm: LM | str | Mapping = "embedded", *, temperature: float = 0.0, max_tokens: int = 256, **kwargs: Any
    ):
        if not isinstance(lm, (LM, str, Mapping)):
            raise TypeError(
                f"DSPyLM(lm): expected an optimas_fast.lm.LM or a make_lm spec (str or dict), got {type(lm).__name__}"
            )
        self.backend = make_lm(lm)
        self.spec = None if isinstance(lm, LM) else (lm if isinstance(lm, str) else dict(lm))
        engine = _Engine(self.backend, self)
        super().__init__(
            f"optimas_fast/{self.backend.name}",
            model_type="chat",
            temperature=temperature,
            max_tokens=max_tokens,
            cache=False,
            num_retries=0,
            engine=engine,
            async_engine=_AsyncEngine(engine),
            **kwargs,
        )

    def copy(self, **kwargs: Any) -> DSPyLM:
        """``dspy.LM.copy`` with an engine of its own, so the copy's kwargs (``rollout_id``) apply to its calls."""
        if "engine" in kwargs:
            return super().copy(**kwargs)
        engine = _Engine(self.backend)
        new = super().copy(engine=engine, async_engine=_AsyncEngine(engine), **kwargs)
        engine.owner = new
        return new

    def dump_state(self) -> dict:
        if self.spec is None:
            raise TypeError(
                "DSPyLM built from an LM instance cannot be saved with the program; build it from a "
                "make_lm spec (e.g. DSPyLM('embedded')) or set the LM again after loading"
            )
        return {
            LM_CLASS_STATE_KEY: f"{type(self).__module__}.{type(self).__qualname__}",
            "lm": self.spec,
            "temperature": self.kwargs.get("temperature"),
            "max_tokens": self.kwargs.get("max_tokens"),
        }

    @classmethod
    def load_state(cls, state: dict, **_: Any) -> DSPyLM:
        state = {k: v for k, v in state.items() if k != LM_CLASS_STATE_KEY}
        if "lm" not in state:
            raise ValueError(f"DSPyLM.load_state: the state has no 'lm' spec (keys {sorted(state)})")
        return cls(state.pop("lm"), **{k: v for k, v in state.items() if v is not None})

    def __repr__(self) -> str:
        return f"DSPyLM({self.backend!r})"


class _DSPyBackedLM(LM):
    """An optimas_fast LM over any other dspy LM (e.g. ``dspy.LM("openai/gpt-4o-mini")`` from
    ``dspy.configure``), so that its calls too go through our cache, ledger and budgets. It sends DSPy's
    canonical ``dspy.lm15.Request``; token counts are the LM's reported usage, else estimated (~4 characters
    a token)."""

    def __init__(self, dspy_lm: Any):
        self.dspy_lm = dspy_lm
        self.name = f"dspy:{getattr(dspy_lm, 'model', type(dspy_lm).__name__)}"

    def _request(self, prompt: Any, params: SamplingParams):
        chat = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        system = "\n\n".join(m["content"] for m in chat if m["role"] == "system") or None
        messages = [
            _Message.assistant(m["content"]) if m["role"] == "assistant" else _Message.user(m["content"])
            for m in chat
            if m["role"] != "system"
        ]
        config = _Config(temperature=params.temperature, max_tokens=params.max_tokens, stop=tuple(params.stop))
        return _Request(model=self.dspy_lm.model, messages=tuple(messages), system=system, config=config)

    def _generate(self, requests: list[Request], params: SamplingParams) -> list[Completion | Exception]:
        out: list[Completion | Exception] = []
        for r in requests:
            try:
                response = self.dspy_lm(self._request(r.prompt, params))
                text = response.text or ""
                u = response.usage
                p_tok = u.input_tokens if u.input_tokens is not None else self.estimate_prompt_tokens(r.prompt)
                c_tok = u.output_tokens if u.output_tokens is not None else len(text) // 4 + 1
                out.append(
                    Completion(
                        text,
                        Usage(prompt_tokens=p_tok, completion_tokens=c_tok),
                        finish_reason="length" if response.finish_reason == "length" else "stop",
                    )
                )
            except Exception as exc:  # noqa: BLE001 — LM.generate accounts and raises (or records) it
                out.append(exc)
        return out


def _as_dspy_lm(lm: Any, what: str) -> DSPyLM:
    if isinstance(lm, DSPyLM):
        return lm
    if isinstance(lm, (LM, str, Mapping)):
        return DSPyLM(lm)
    if isinstance(lm, dspy.BaseLM):
        return DSPyLM(_DSPyBackedLM(lm))
    raise TypeError(
        f"OptimasOptimizer({what}): expected an optimas_fast.lm.LM, a make_lm spec (str or dict), a "
        f"DSPyLM or a dspy.BaseLM, got {type(lm).__name__}"
    )


# --------------------------------------------------------------------------------------------- the optimizer
def _loop_config(settings: Mapping[str, Any]) -> OptimasConfig:
    # a moved key (lr, ...) goes on to OptimasConfig.from_dict, which says where it lives now
    unknown = sorted(k for k in settings if k not in LOOP_SETTINGS and k not in MOVED_KEYS)
    if unknown:
        raise ConfigError(
            f"OptimasOptimizer: unknown loop setting{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))}; valid settings: {', '.join(LOOP_SETTINGS)} "
            "(plus the optimizer's own: lm, reward, proposer, run_dir, progress)"
        )
    # nested sections may come as their dataclasses (collect=CollectConfig(...)) or as dicts
    data = {
        k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) and not isinstance(v, type) else v)
        for k, v in settings.items()
    }
    return OptimasConfig.from_dict(data)


def _examples(data: Any, what: str) -> list:
    if data is None or isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Sequence):
        raise TypeError(f"compile({what}): expected a list of dspy.Example, got {type(data).__name__}")
    data = list(data)
    if not data:
        raise ValueError(f"compile({what}): is empty; the loop needs at least one example")
    for i, ex in enumerate(data):
        if not isinstance(ex, dspy.Example):
            raise TypeError(f"compile({what}[{i}]): expected a dspy.Example, got {type(ex).__name__}")
        if ex._input_keys is None:
            raise ValueError(
                f"compile({what}[{i}]): the example has no input keys; build it with "
                "dspy.Example(...).with_inputs('question', ...)"
            )
    return data


class OptimasOptimizer:
    """A DSPy optimizer (teleprompter) running the Optimas loop over a program's predictors' instructions.

    Args:
        metric: ``metric(example, prediction, trace=None) -> float | bool``, as in DSPy (higher is better).
        lm: the LM for the program's calls: a ``DSPyLM``, an ``optimas_fast.lm.LM``, a ``make_lm`` spec, or
            a ``dspy.BaseLM`` (wrapped so its calls are cached and accounted too); None uses
            ``dspy.settings.lm``. It also writes instruction proposals unless ``proposer`` is given.
        reward: the local reward model: a ``RewardModel`` (heads are added per predictor), or a backbone for
            a new one ("minilm", the offline default, or a local model directory).
        proposer: the LM that proposes instructions (same forms as ``lm``); None: ``lm``.
        run_dir: where the loop writes its run state and checkpoints (None: a fresh temporary directory).
        progress: tqdm bars on stderr.
        **loop_settings: ``OptimasConfig`` fields (``iterations``, ``batch_size``, ``seed``, ``collect={...}``,
            ``budget={"max_calls": ...}``, ...); an unknown name is a ``ConfigError`` listing the valid ones.
            ``components=[...]`` (which predictors to optimize) takes component names (the predictor's path
            without ``.predict``: ``answer``) or DSPy's paths (``answer.predict``).

    After ``compile``, ``self.result`` is the loop's ``OptimasResult`` (history, validation scores, usage).
    """

    def __init__(
        self,
        metric: Callable[..., Any],
        *,
        lm: Any = None,
        reward: Any = "minilm",
        proposer: Any = None,
        run_dir: str | None = None,
        progress: bool = False,
        **loop_settings: Any,
    ):
        if not callable(metric):
            raise TypeError(
                f"OptimasOptimizer(metric): expected a callable metric(example, prediction, trace=None), "
                f"got {type(metric).__name__}"
            )
        self.metric = metric
        self.config = _loop_config(loop_settings)  # settings fail here, before any data is touched
        self.lm = None if lm is None else _as_dspy_lm(lm, "lm")
        self.proposer = None if proposer is None else _as_dspy_lm(proposer, "proposer").backend
        if not isinstance(reward, str) and not hasattr(reward, "score"):
            raise TypeError(
                f"OptimasOptimizer(reward): expected a RewardModel or a backbone name/path, got {type(reward).__name__}"
            )
        self.reward = reward
        self.run_dir = run_dir
        self.progress = progress
        self.result: OptimasResult | None = None

    def _reward_model(self, system: ProgramSystem) -> Any:
        if not isinstance(self.reward, str):
            return self.reward
        comps = {n: c.description for n, c in system.components.items()}
        return RewardModel(self.reward, comps, config=RewardModelConfig(seed=self.config.seed))

    def compile(self, student: Any, *, trainset: Sequence, valset: Sequence | None = None) -> Any:
        """An optimized deep copy of ``student`` (which is left as it was).

        ``trainset`` / ``valset``: lists of ``dspy.Example`` with input keys (``with_inputs``). Preference
        pairs come from the trainset; the validation gate scores the valset (None: the trainset itself, which
        is fine for a first try and optimistic as a final number).
        """
        if not isinstance(student, dspy.Module):
            raise TypeError(f"compile(student): expected a dspy.Module, got {type(student).__name__}")
        if not student.named_predictors():
            raise ValueError(
                f"compile(student): {type(student).__name__} has no predictors (dspy.Predict, "
                "ChainOfThought, ...) whose instructions could be optimized"
            )
        train = _examples(trainset, "trainset")
        val = _examples(valset, "valset") if valset is not None else train
        lm = self.lm
        if lm is None:
            if dspy.settings.lm is None:
                raise ValueError(
                    "OptimasOptimizer: no LM: pass lm= (e.g. DSPyLM('embedded')) or dspy.configure(lm=...)"
                )
            lm = _as_dspy_lm(dspy.settings.lm, "lm")
        proposer = self.proposer if self.proposer is not None else lm.backend
        system = ProgramSystem(student, self.metric, lm=lm, name=type(student).__name__)
        rm = self._reward_model(system)
        config = dataclasses.replace(self.config)
        if config.components is not None:  # DSPy's predictor paths ("answer.predict") name components too
            by_path = {path: name for name, path in system.predictor_paths().items()}
            config.components = [by_path.get(n, n) for n in config.components]
        loop = Optimas(rm, proposer, config, progress=self.progress)
        self.result = loop.optimize(system, train, val, run_dir=self.run_dir)
        optimized = student.deepcopy()
        instructions = {c.dspy_name: c.variable.text for c in self.result.system.components.values()}
        for dspy_name, predictor in optimized.named_predictors():
            text = instructions.get(dspy_name)
            if text is not None and text != predictor.signature.instructions:
                predictor.signature = predictor.signature.with_instructions(text)
        optimized._compiled = True  # DSPy's mark of an optimized program (frozen when nested in another)
        log.info(
            "OptimasOptimizer: validation %.4f -> %.4f%s",
            self.result.initial_val,
            self.result.best_val,
            f" (stopped: {self.result.stopped})" if self.result.stopped else "",
        )
        return optimized
