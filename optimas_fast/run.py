"""Run assembly: the one place that turns a run configuration into a run (system, data splits, LMs, reward
model, loop) and runs it. ``optimas-fast run / eval / resume / demo`` parse their arguments and call this
module; benchmarks and your own scripts call it the same way::

    from optimas_fast.run import load_config, build, run_config

    cfg = load_config("my-run.yaml")
    system, split, reward_model, proposer = build(cfg)   # or run the whole loop:
    run_config(cfg, "runs/my-run")

A run config (YAML) has these top-level keys (all optional except ``system``):

    system: amazon            # a built-in example (pubmedqa, hotpotqa, amazon; synthetic: a tiny test system, no LM)
                              # or your own pipeline: "package.module:factory", a callable returning a System
                              # (imported from the current directory or sys.path; called with lm= and/or lms=
                              # when it declares those parameters)
    system_config: {max_items: 8}   # a built-in example's settings (AmazonConfig, PubMedQAConfig, ... fields)
    data: {dir: null, seed: null, train: null, val: null, test: null}   # split seed (null: loop.seed) and size caps, or
                              # JSONL files {train: FILE, val: FILE, test: FILE} (one example dict a line: the
                              # system's input fields plus what the metric reads; paths relative to this file)
    lm: embedded              # make_lm spec of the components' LM ("embedded", "openai:<model>@<url>", "hf:<path>")
                              # or {factory: "package.module:callable"} returning an optimas_fast.lm.LM
    lms: null                 # or several named LMs {name: spec}: components use the first, model choices range
                              # over all
    proposer: null            # LM writing prompt proposals (default: the components' LM)
    reward:                   # the LRF (local reward function)
      backbone: minilm        # minilm, a local HF directory, or tiny-random (tests)
      max_length: 256         # short for template.max_length; also any optimas_fast.reward.RewardModelConfig field
                              # (template: {...}, amp, pooling, lora: {...}, ...); the seed is loop.seed
      train: {lr: 5e-5}       # how the LRF trains: optimas_fast.reward.TrainConfig fields (lr, head_lr, batch_pairs,
                              # schedule, warmup_steps, replay_size, ...), for its initial training and adaptation
    loop: {...}               # optimas_fast.optimize.OptimasConfig fields (iterations, batch_size, budget, ...)
    output: runs/my-run       # run directory (run_state.json, LRF checkpoint, report.json/png, system_state.json)

A bad key or value stops with a message naming the key and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from optimas_fast._io import JSONLineError, iter_jsonl
from optimas_fast._validate import check_int
from optimas_fast.backbones import MINILM
from optimas_fast.examples import EXAMPLES, AmazonConfig, CodegenConfig, HotpotQAConfig, PubMedQAConfig, load_example
from optimas_fast.lm import LM, make_lm
from optimas_fast.optimize import ConfigError, Optimas, OptimasConfig
from optimas_fast.optimize.config import from_dict
from optimas_fast.optimize.testing import build_synthetic, tiny_reward_model
from optimas_fast.report import bootstrap_ci, write_report
from optimas_fast.reward import LoraSettings, RewardModel, RewardModelConfig, TemplateConfig, TrainConfig
from optimas_fast.system import System

log = logging.getLogger("optimas_fast.run")

SYSTEMS = (*EXAMPLES, "synthetic")  # the built-in examples (optimas_fast.examples) and the loop's test system
# "package.module:factory" (the attribute may be dotted: "module:Class.build")
FACTORY_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
TOP_KEYS = ("system", "system_config", "data", "lm", "lms", "proposer", "reward", "loop", "output")
# system_config: the settings class of each built-in example (load_example(name, config=...))
EXAMPLE_CONFIGS = {
    "pubmedqa": PubMedQAConfig,
    "hotpotqa": HotpotQAConfig,
    "amazon": AmazonConfig,
    "codegen": CodegenConfig,
}
DATA_KEYS = ("dir", "seed", "train", "val", "test")
# reward: the backbone, max_length (short for template.max_length), train (the TrainConfig) and every
# RewardModelConfig field but its seed, which is loop.seed: one seed drives the run (the split's too, unless data.seed
# is given; TrainConfig has none: the model's data order and replay draws follow the model's seed)
REWARD_KEYS = (
    "backbone",
    "max_length",
    "train",
    *sorted(f.name for f in fields(RewardModelConfig) if f.name != "seed"),
)
CONFIG_NAME = "config.yaml"  # the config as given, copied into the run directory (what `resume` reads)


# ----------------------------------------------------------------------------------------------- config
@dataclass
class RunConfig:
    system: str  # a built-in system name, or "package.module:factory"
    # system_config: a built-in example's own settings (run.EXAMPLE_CONFIGS: AmazonConfig, ...); None: its defaults
    system_config: Any
    data: dict  # dir, seed, train/val/test caps (ints) or absolute JSONL paths (str)
    lm: Any  # make_lm spec of the components' LM
    lms: dict | None  # several named LM specs
    proposer: Any  # make_lm spec of the proposer (None: the components' LM)
    backbone: str  # reward.backbone: "minilm", a local model directory, or "tiny-random" (tests)
    reward: RewardModelConfig  # the rest of reward: (the engine's settings; its seed is loop.seed)
    train: TrainConfig  # reward.train: how the reward model trains (learning rates, pairs per step, schedule, replay)
    loop: OptimasConfig  # the loop settings
    output: str | None  # run directory
    raw: dict  # the config as given (copied into the run directory)


def _check_keys(d: Any, allowed: tuple, where: str) -> dict:
    if d is None:
        return {}
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(d).__name__}")
    bad = sorted(k for k in d if k not in allowed)
    if bad:
        raise ConfigError(
            f"unknown key {', '.join(repr(f'{where}.{k}' if where else k) for k in bad)}; "
            f"allowed keys{' under ' + where if where else ''}: {list(allowed)}"
        )
    return dict(d)


def is_factory_spec(system: Any) -> bool:
    """True for a ``"package.module:factory"`` system (or LM) spec."""
    return isinstance(system, str) and FACTORY_RE.match(system) is not None


def _parse_data(data: dict, system: str, base_dir: Path) -> dict:
    """Size caps (ints) or JSONL files (str, resolved against ``base_dir`` to absolute paths)."""
    files = {k: data[k] for k in ("train", "val", "test") if isinstance(data.get(k), str)}
    if not files:
        for k in ("train", "val", "test"):
            check_int(
                data.get(k),
                f"data.{k}",
                min=1,
                allow_none=True,
                error=ConfigError,
                what="an int >= 1 (a size cap), a JSONL file path or null",
            )
        if is_factory_spec(system):
            raise ConfigError(
                f"system {system!r} (your own pipeline) needs its data as JSONL files: "
                f"data: {{train: FILE, val: FILE, test: FILE}}"
            )
        return data
    for k in ("train", "val", "test"):
        v = data.get(k)
        if v is not None and not isinstance(v, str):
            raise ConfigError(
                f"data.{k}: give every split as a JSONL file path (or leave test out), not a mix of "
                f"files and size caps; got {v!r}"
            )
    missing = [k for k in ("train", "val") if k not in files]
    if missing:
        raise ConfigError(
            f"data.{missing[0]}: a JSONL file is required when the data are files "
            f"(data: {{train: FILE, val: FILE, test: FILE}})"
        )
    if data.get("dir") is not None:
        raise ConfigError("data.dir is the built-in examples' data folder; it cannot be combined with JSONL files")
    out = dict(data)
    for k, v in files.items():
        path = (base_dir / v).resolve()
        if not path.is_file():
            raise ConfigError(f"data.{k}: file {path} not found")
        out[k] = str(path)
    return out


def parse_config(raw: Any, base_dir: str | os.PathLike | None = None) -> RunConfig:
    """Validates a config dict (see the module docstring); ConfigError names the bad key. Relative data file
    paths are resolved against ``base_dir`` (the config file's folder; default the current directory), and
    the returned ``raw`` holds them absolute, so the copy in the run directory works from anywhere."""
    raw = _check_keys(raw, TOP_KEYS, "")
    system = raw.get("system")
    if system not in SYSTEMS and not is_factory_spec(system):
        raise ConfigError(
            f"system must be one of {list(SYSTEMS)} or 'package.module:factory' (a callable returning "
            f"a System), got {system!r}"
        )
    data = _parse_data(
        _check_keys(raw.get("data"), DATA_KEYS, "data"), system, Path(base_dir) if base_dir is not None else Path.cwd()
    )
    if data.get("train") is not None and isinstance(data["train"], str):
        raw = dict(raw, data=data)  # the absolute paths travel with the config
    check_int(data.get("seed"), "data.seed", allow_none=True, error=ConfigError, what="an int or null (loop.seed)")
    backbone, reward, train = _parse_reward(raw.get("reward"))
    system_config = _parse_system_config(raw.get("system_config"), system)
    lms = raw.get("lms")
    if lms is not None and (not isinstance(lms, Mapping) or not lms):
        raise ConfigError(f"lms must be a non-empty mapping name -> LM spec, got {lms!r}")
    for k in ("lm", "proposer"):
        v = raw.get(k)
        if v is not None and not isinstance(v, (str, Mapping)):
            raise ConfigError(
                f"{k} must be an LM spec string (e.g. 'embedded', 'openai:<model>@<url>') or a mapping, got {v!r}"
            )
    for where, v in [("lm", raw.get("lm")), ("proposer", raw.get("proposer"))] + [
        (f"lms.{n}", v) for n, v in (lms or {}).items()
    ]:
        if isinstance(v, Mapping) and "factory" in v and (set(v) != {"factory"} or not is_factory_spec(v["factory"])):
            raise ConfigError(
                f"{where}: an LM factory is {{factory: 'package.module:callable'}} and nothing else, got {dict(v)!r}"
            )
    loop = OptimasConfig.from_dict(raw.get("loop") or {}, prefix="loop.")
    out = raw.get("output")
    if out is not None and not isinstance(out, str):
        raise ConfigError(f"output must be a directory path, got {out!r}")
    if data.get("seed") is None:
        data = dict(data, seed=loop.seed)  # one seed: the split follows loop.seed unless data.seed is given
    reward.seed = loop.seed
    return RunConfig(
        system,
        system_config,
        data,
        raw.get("lm", "embedded"),
        dict(lms) if lms else None,
        raw.get("proposer"),
        backbone,
        reward,
        train,
        loop,
        out,
        raw,
    )


def _parse_system_config(section: Any, system: str) -> Any:
    """``system_config:``: the built-in example's settings dataclass (strict keys and types), or None."""
    if section is None:
        return None
    if system not in EXAMPLE_CONFIGS:
        raise ConfigError(
            f"system_config: only the built-in examples {sorted(EXAMPLE_CONFIGS)} take settings here; system "
            f"{system!r} takes none (your own factory's settings are its own code's)"
        )
    cfg = from_dict(EXAMPLE_CONFIGS[system], section, "system_config.")
    return _validated(cfg, "system_config.") if hasattr(cfg, "validate") else cfg


def _parse_reward(section: Any) -> tuple[str, RewardModelConfig, TrainConfig]:
    """(backbone, engine config, training settings) from the ``reward:`` section: strict keys, every value checked
    by the engine's own validation, errors naming the key path (``reward.template.max_length``,
    ``reward.train.lr``)."""
    if isinstance(section, Mapping) and "seed" in section:
        raise ConfigError("reward.seed: the reward model's seed is loop.seed (one seed drives the run)")
    section = _check_keys(section, REWARD_KEYS, "reward")
    backbone = section.pop("backbone", MINILM)
    if not isinstance(backbone, str) or not (backbone in (MINILM, "tiny-random") or os.path.isdir(backbone)):
        raise ConfigError(
            f"reward.backbone must be {MINILM!r}, 'tiny-random' or an existing model directory, got {backbone!r}"
        )
    if "max_length" in section:
        template = section.get("template") or {}
        if isinstance(template, Mapping) and "max_length" in template:
            raise ConfigError("reward.max_length is short for reward.template.max_length: give one of them")
        max_length = section.pop("max_length")
        # checked as written (the template's own check with the prefix "reward.": it names reward.max_length)
        _validated(from_dict(TemplateConfig, {"max_length": max_length}, "reward."), "reward.")
        section["template"] = {**(template if isinstance(template, Mapping) else {}), "max_length": max_length}
    lora = section.pop("lora", None)
    train = _parse_train(section.pop("train", None))
    cfg = from_dict(RewardModelConfig, section, "reward.")
    if lora is not None:
        cfg.lora = from_dict(LoraSettings, lora, "reward.lora.")
    return backbone, _validated(cfg, "reward."), train


def _validated(cfg: Any, prefix: str) -> Any:
    """``cfg`` after its own ``validate(prefix)``: the engine's dataclasses raise ValueError (they know nothing of
    configuration files) naming ``{prefix}{field}``; here it becomes a ConfigError with the same message."""
    try:
        cfg.validate(prefix)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return cfg


def _parse_train(section: Any) -> TrainConfig:
    """``reward.train:``: TrainConfig's fields, strict keys and types, then TrainConfig's own checks (the prefix is
    passed down, so every message names ``reward.train.<field>``)."""
    if isinstance(section, Mapping) and "seed" in section:
        raise ConfigError("reward.train.seed: the reward model's training follows loop.seed (one seed drives the run)")
    return _validated(from_dict(TrainConfig, section if section is not None else {}, "reward.train."), "reward.train.")


class YamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-4`` as a float. PyYAML follows YAML 1.1, whose floats need a dot
    (``1.0e-4``), so ``lr: 1e-4``, the way everyone writes a learning rate, would arrive as the string "1e-4";
    YAML 1.2 (and JSON) read it as a number, and so does this loader."""


YamlLoader.add_implicit_resolver(  # copies SafeLoader's resolvers first: yaml.safe_load is unchanged
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def read_yaml(stream: Any) -> Any:
    """A YAML document (a file object or a string) with ``YamlLoader``: what run configs and ``reward train
    --config`` files are read with."""
    return yaml.load(stream, Loader=YamlLoader)  # safe: YamlLoader is a SafeLoader


def load_config(path: str | os.PathLike) -> RunConfig:
    try:
        with open(path, encoding="utf-8") as f:
            raw = read_yaml(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    return parse_config(raw, base_dir=Path(path).resolve().parent)


# ----------------------------------------------------------------------------------------------- your own
def resolve_factory(spec: str, where: str = "system") -> Any:
    """The object named by ``"package.module:attr"``, imported from the current directory or ``sys.path``;
    ConfigError naming the spec when the module does not import or has no such attribute."""
    if not is_factory_spec(spec):
        raise ConfigError(f"{where}: {spec!r} is not 'package.module:callable'")
    module_name, _, attr = spec.partition(":")
    importlib.invalidate_caches()  # a module written since the last import (e.g. by a test) must be found
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:  # console scripts do not put the current directory on the path
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ConfigError(
                f"{where}: cannot import module {module_name!r} of {spec!r}: no module {exc.name!r} "
                f"in the current directory ({cwd}) or on sys.path"
            ) from None
        raise ConfigError(f"{where}: importing module {module_name!r} of {spec!r} failed: {exc}") from None
    except Exception as exc:  # noqa: BLE001 — the user's module raised while importing: say so in one line
        raise ConfigError(
            f"{where}: importing module {module_name!r} of {spec!r} failed: {type(exc).__name__}: {exc}"
        ) from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(
                f"{where}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no attribute {attr!r}"
            )
        obj = getattr(obj, part)
    return obj


def build_own_system(spec: str, make_lms) -> Any:
    """Calls the factory ``spec`` (see the module docstring). ``make_lms()`` builds the configured LMs and is
    only called when the factory declares an ``lm`` or ``lms`` parameter (LMs can be slow to load).
    Returns (system, lms or None)."""
    factory = resolve_factory(spec)
    if not callable(factory):
        raise ConfigError(f"system: {spec!r} is a {type(factory).__name__}, not a callable returning a System")
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    wants = [n for n in ("lm", "lms") if n in params]
    required = [
        n
        for n, p in params.items()
        if n not in ("lm", "lms")
        and p.default is p.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    if required:
        raise ConfigError(
            f"system: factory {spec!r} has required parameters {required}; it is called with lm= "
            f"and/or lms= only (give the others defaults)"
        )
    lms = make_lms() if wants else None
    kwargs = {}
    if "lm" in wants:
        kwargs["lm"] = next(iter(lms.values()))
    if "lms" in wants:
        kwargs["lms"] = lms
    try:
        system = factory(**kwargs)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 — one clear line; the traceback goes to the debug log
        log.debug("factory %s failed", spec, exc_info=True)
        raise ConfigError(f"system: factory {spec!r} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(system, System):
        raise ConfigError(
            f"system: factory {spec!r} returned a {type(system).__name__}, not an optimas_fast.system.System"
        )
    return system, lms


def make_lm_spec(spec: Any, where: str):
    """``make_lm`` plus the ``{factory: "package.module:callable"}`` form (a callable returning an LM, or an
    LM object)."""
    if isinstance(spec, Mapping) and "factory" in spec:
        obj = resolve_factory(spec["factory"], where)
        lm = obj() if callable(obj) and not isinstance(obj, LM) else obj
        if not isinstance(lm, LM):
            raise ConfigError(
                f"{where}: factory {spec['factory']!r} gave a {type(lm).__name__}, not an optimas_fast.lm.LM"
            )
        return lm
    try:
        return make_lm(spec)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def load_jsonl(path: str | os.PathLike, *, required: tuple = (), where: str = "") -> list[dict]:
    """Examples from a JSONL file: one JSON object a line (blank lines skipped). ConfigError naming the file
    and line for a line that is not JSON, not an object, or lacks a ``required`` field."""
    label = f"{where}: " if where else ""
    rows = []
    try:
        for i, row in iter_jsonl(path):
            if not isinstance(row, dict):
                raise ConfigError(
                    f"{label}{path} line {i}: expected a JSON object (one example), got {type(row).__name__}"
                )
            missing = [k for k in required if k not in row]
            if missing:
                raise ConfigError(
                    f"{label}{path} line {i}: missing field(s) {missing} that the system reads "
                    f"(its inputs: {list(required)})"
                )
            rows.append(row)
    except JSONLineError as exc:
        raise ConfigError(f"{label}{exc}") from None
    except OSError as exc:
        raise ConfigError(f"{label}cannot read {path}: {exc.strerror or exc}") from None
    if not rows:
        raise ConfigError(f"{label}{path} has no examples")
    return rows


# ----------------------------------------------------------------------------------------------- building
def build(cfg: RunConfig):
    """(system, split, reward model, proposer LM) for a config."""
    files = isinstance(cfg.data.get("train"), str)
    first = None

    def make_lms():
        if cfg.lms:
            return {name: make_lm_spec(spec, f"lms.{name}") for name, spec in cfg.lms.items()}
        lm = make_lm_spec(cfg.lm, "lm")
        return {getattr(lm, "name", "lm"): lm}

    if cfg.system == "synthetic":
        system, _, train, val = build_synthetic(cfg.data.get("seed", 0))
        split = Split(train, val, val)
        proposer = None
    elif is_factory_spec(cfg.system):
        system, lms = build_own_system(cfg.system, make_lms)
        split = None
        if lms:
            first = next(iter(lms.values()))
        elif "lm" in cfg.raw or cfg.lms:
            # the factory brings its own LMs; an LM in the config is the proposer's
            first = next(iter(make_lms().values()))
        proposer = make_lm_spec(cfg.proposer, "proposer") if cfg.proposer is not None else first
    else:
        lms = make_lms()
        lms = lms if cfg.lms else next(iter(lms.values()))
        system, split = load_example(
            cfg.system,
            lms,
            data_dir=cfg.data.get("dir"),
            seed=cfg.data.get("seed", 0),
            config=copy.deepcopy(cfg.system_config),
        )
        first = next(iter(lms.values())) if isinstance(lms, dict) else lms
        proposer = make_lm_spec(cfg.proposer, "proposer") if cfg.proposer is not None else first
    if files:
        split = Split(
            *(
                load_jsonl(cfg.data[k], required=system.inputs, where=f"data.{k}") if cfg.data.get(k) else []
                for k in ("train", "val", "test")
            )
        )
    else:
        split = Split(
            *(
                getattr(split, k)[: cfg.data[k]] if cfg.data.get(k) else getattr(split, k)
                for k in ("train", "val", "test")
            )
        )
    comps = {n: system.components[n].description or n for n in system.order if system.components[n].variables()}
    if not comps:
        raise ConfigError(f"system {cfg.system!r}: no component has a variable to optimize")
    targets = cfg.loop.components or list(comps)
    prompts = [
        a
        for n in targets
        if n in system.components
        for a, v in system.components[n].variables().items()
        if v.kind == "prompt"
    ]
    if prompts and proposer is None and cfg.system != "synthetic":
        raise ConfigError(
            f"system {cfg.system!r} optimizes Prompt variables {prompts}: give 'proposer:' (an LM spec) "
            f"or 'lm:', or a factory that takes lm="
        )
    train = copy.deepcopy(cfg.train)  # the parsed config stays as parsed
    if cfg.backbone == "tiny-random":
        rm = tiny_reward_model(comps, cfg.loop.seed, train=train)
    else:
        # one seed: the model's is loop.seed, read here, so a config whose loop.seed is replaced (a comparison's
        # seeds) re-seeds the model's heads, data order and replay draws too
        reward = dataclasses.replace(copy.deepcopy(cfg.reward), seed=cfg.loop.seed)
        rm = RewardModel(cfg.backbone, comps, config=reward, train_config=train)
    return system, split, rm, proposer


@dataclass
class Split:
    train: list
    val: list
    test: list


def evaluate_with_bar(
    system,
    examples,
    *,
    desc: str,
    workers: int,
    seed: int,
    progress: bool = True,
    stats: dict | None = None,
    **eval_kwargs,
):
    """``system.evaluate`` in chunks, with a tqdm bar (ETA) over examples; returns the list of scores.
    ``system`` is a System or anything with its ``evaluate`` (e.g. ``optimas_fast.best_of.BestOfN``);
    ``eval_kwargs`` go to ``evaluate``; ``stats``, when given, receives the LM calls and tokens the traces
    recorded and the wall seconds."""
    scores = []
    calls = tokens = 0
    t0 = time.perf_counter()
    chunk = max(1, workers)  # one LM batch per chunk; the bar moves (and estimates) per chunk
    with tqdm(total=len(examples), desc=desc, unit="ex", disable=not progress, dynamic_ncols=True) as bar:
        for i in range(0, len(examples), chunk):
            res = system.evaluate(examples[i : i + chunk], workers=workers, seed=seed, **eval_kwargs)
            scores += res.scores
            for t in res.traces:
                u = t.usage
                calls += u.calls
                tokens += u.prompt_tokens + u.completion_tokens
            bar.update(len(res.scores))
    if stats is not None:
        stats.update(lm_calls=calls, lm_tokens=tokens, seconds=time.perf_counter() - t0)
    return scores


def format_ci(ci: Mapping) -> str:
    """``0.612 (95% CI 0.540-0.680, n=50)`` for a ``report.bootstrap_ci`` dict."""
    return f"{ci['mean']:.3f} (95% CI {ci['lo']:.3f}-{ci['hi']:.3f}, n={ci['n']})"


# ----------------------------------------------------------------------------------------------- commands
def run_config(
    cfg: RunConfig,
    out: str | None,
    resume: bool = False,
    progress: bool = True,
    test_before: bool = True,
    echo: Callable[[str], None] = log.info,
) -> dict:
    """Runs (or resumes) the loop of ``cfg`` in ``out``, evaluates on the test split before and after, writes
    the report, and returns its test section. ``echo`` receives the result lines (test scores before and after,
    the validation gain, where the output went): the log by default, the terminal under the CLI."""
    out_dir = Path(out or cfg.output or f"optimas-run-{time.strftime('%Y%m%d-%H%M%S')}")
    t0 = time.perf_counter()
    system, split, rm, proposer = build(cfg)  # first: a config that cannot build leaves no run directory behind
    if not split.train or not split.val:
        raise ConfigError(
            f"the train and val splits must not be empty (got {len(split.train)} and {len(split.val)} examples)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        (out_dir / CONFIG_NAME).write_text(yaml.safe_dump(cfg.raw, sort_keys=False), encoding="utf-8")
    workers = cfg.loop.val_workers
    extra: dict[str, Any] = {
        "system": cfg.system,
        "split_sizes": {"train": len(split.train), "val": len(split.val), "test": len(split.test)},
    }
    before_file = out_dir / "test_before.json"
    if test_before and split.test:
        if before_file.exists():  # measured by the interrupted session already
            before = json.loads(before_file.read_text())
        else:
            before = evaluate_with_bar(
                system, split.test, desc="test (before)", workers=workers, seed=cfg.loop.seed, progress=progress
            )
            before_file.write_text(json.dumps(before))
        extra["test_before"] = bootstrap_ci(before, seed=cfg.loop.seed)
        echo(f"test score before: {format_ci(extra['test_before'])}")
    loop = Optimas(rm, proposer, cfg.loop, progress=progress)
    res = loop.optimize(system, split.train, split.val, run_dir=out_dir, resume_from=out_dir if resume else None)
    if split.test:
        after = evaluate_with_bar(
            res.system, split.test, desc="test (after)", workers=workers, seed=cfg.loop.seed, progress=progress
        )
        extra["test_after"] = bootstrap_ci(after, seed=cfg.loop.seed)
        echo(f"test score after:  {format_ci(extra['test_after'])}")
    extra["total_wall_seconds"] = time.perf_counter() - t0
    write_report(out_dir, extra=extra)
    echo(
        f"validation: {res.initial_val:.3f} -> {res.best_val:.3f}"
        f"{'' if res.stopped is None else f' (stopped: {res.stopped})'}"
    )
    echo(
        f"output: {out_dir}/ (report.json, report.png, system_state.json, {CONFIG_NAME}, run_state.json, LRF "
        f"checkpoint)"
    )
    return extra
