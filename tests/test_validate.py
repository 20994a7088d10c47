"""The shared argument validators (optimas_fast/_validate.py)."""

import math
import re

import numpy as np
import pytest
import torch

from optimas_fast import ops
from optimas_fast._validate import check_bool, check_choice, check_int, check_number, is_int, is_number
from optimas_fast.best_of import BestOfN
from optimas_fast.examples.codegen import CodegenConfig, build_codegen_system
from optimas_fast.examples.data import split_examples
from optimas_fast.examples.embeddings import HashEmbedder
from optimas_fast.examples.pubmedqa import PubMedQAConfig, build_pubmedqa_system
from optimas_fast.lm import Budget, HFLocalLM, LlamaCppLM, LMCache, OpenAIClient, register_price
from optimas_fast.lm.base import check_sampling
from optimas_fast.optimize import BudgetConfig, ConfigError, OptimasConfig
from optimas_fast.optimizers import ChoiceConfig, LoRAPolicy, OptimizerBudget, PromptConfig, WeightsConfig
from optimas_fast.preference import PairStore
from optimas_fast.preference.collect import CollectConfig
from optimas_fast.reward import LoraSettings, RewardModelConfig, TemplateConfig, TrainConfig
from optimas_fast.reward.data import as_pairs
from optimas_fast.reward.distributed import shard_batches
from optimas_fast.reward.template import TokenCache
from optimas_fast.run import parse_config
from optimas_fast.sandbox import run_python
from optimas_fast.scheduler import SchedulerConfig
from optimas_fast.scheduler_reference import head_id
from optimas_fast.system import Component, System
from optimas_fast.trl import RewardConfig


class _MyError(ValueError):
    pass


@pytest.mark.parametrize(
    "v, ok",
    [
        (0, True),
        (-3, True),
        (2**70, True),
        (True, False),
        (False, False),
        (1.0, False),
        ("1", False),
        (None, False),
        (np.int64(3), False),
    ],
)
def test_is_int(v, ok):
    assert is_int(v) is ok


@pytest.mark.parametrize(
    "v, ok",
    [
        (np.int64(3), True),
        (np.int32(-1), True),
        (np.bool_(True), False),
        (True, False),
        (3, True),
        (np.float64(1.0), False),
    ],
)
def test_is_int_numpy(v, ok):
    assert is_int(v, numpy=True) is ok


@pytest.mark.parametrize(
    "v, ok, ok_finite",
    [
        (1, True, True),
        (0.5, True, True),
        (math.nan, True, False),
        (math.inf, True, False),
        (-math.inf, True, False),
        (True, False, False),
        ("1.0", False, False),
        (None, False, False),
    ],
)
def test_is_number(v, ok, ok_finite):
    assert is_number(v) is ok
    assert is_number(v, finite=True) is ok_finite


def test_check_int_returns_value_unchanged():
    assert check_int(5, "n", min=1) == 5
    assert check_int(None, "n", min=1, allow_none=True) is None
    assert check_int(16, "n_ctx", min=16) == 16  # min is inclusive
    assert check_int(4, "k", min=1, max=4) == 4  # max is inclusive


@pytest.mark.parametrize("v", [True, False, 1.0, "3", None, np.int64(3), 0, -1])
def test_check_int_rejects(v):
    with pytest.raises(ValueError, match=re.escape(f"OpenAIClient: max_concurrency must be an int >= 1, got {v!r}")):
        check_int(v, "OpenAIClient: max_concurrency", min=1)


def test_check_int_messages():
    with pytest.raises(ValueError, match=re.escape("n_threads must be an int >= 1 or None, got 0")):
        check_int(0, "n_threads", min=1, allow_none=True)
    with pytest.raises(ValueError, match=re.escape("data.train must be an int >= 1 or null, got 'x'")):
        check_int("x", "data.train", min=1, allow_none=True, none="null")
    with pytest.raises(ValueError, match=re.escape("k must be an int in [1, 4], got 5")):
        check_int(5, "k", min=1, max=4)
    with pytest.raises(ValueError, match=re.escape("k must be an int <= 4, got 5")):
        check_int(5, "k", max=4)
    with pytest.raises(ValueError, match=re.escape("seed must be an int, got True")):
        check_int(True, "seed")
    with pytest.raises(ValueError, match=re.escape("cap must be a size cap, got 0")):
        check_int(0, "cap", min=1, what="a size cap")


def test_check_int_error_class():
    with pytest.raises(_MyError, match="iterations must be an int >= 0, got -1"):
        check_int(-1, "iterations", min=0, error=_MyError)
    with pytest.raises(TypeError, match="x must be an int, got 1.5"):
        check_int(1.5, "x", error=TypeError)


def test_check_number_accepts_and_returns_unchanged():
    assert check_number(3, "lr", gt=0) == 3 and isinstance(check_number(3, "lr", gt=0), int)
    assert check_number(2.0, "t", gt=0, max=2) == 2.0
    assert check_number(0, "w", min=0) == 0
    assert check_number(None, "m", min=0, allow_none=True) is None
    assert check_number(math.inf, "timeout", gt=0) == math.inf  # inf is a number unless finite=True


@pytest.mark.parametrize("v", [True, "1", None, 0, -1.0, math.nan])
def test_check_number_rejects(v):
    with pytest.raises(ValueError, match=re.escape(f"weights.lora_lr must be a number > 0, got {v!r}")):
        check_number(v, "weights.lora_lr", gt=0)


def test_check_number_messages():
    with pytest.raises(ValueError, match=re.escape("register_price: x must be a finite number >= 0, got inf")):
        check_number(math.inf, "register_price: x", min=0, finite=True)
    with pytest.raises(ValueError, match=re.escape("best_of_temperature must be a number in (0, 2], got 0")):
        check_number(0, "best_of_temperature", gt=0, max=2)
    with pytest.raises(ValueError, match=re.escape("best_of_temperature must be a number in (0, 2], got 2.5")):
        check_number(2.5, "best_of_temperature", gt=0, max=2)
    with pytest.raises(ValueError, match=re.escape("g must be a number in [0.5, 1), got 1")):
        check_number(1, "g", min=0.5, lt=1)
    with pytest.raises(ValueError, match=re.escape("budget.max_usd must be a finite number >= 0 or null, got nan")):
        check_number(math.nan, "budget.max_usd", min=0, finite=True, allow_none=True, none="null")
    with pytest.raises(_MyError, match=re.escape("h must be in [0, 1] or null, got 'a'")):
        check_number("a", "h", min=0, max=1, allow_none=True, error=_MyError, what="in [0, 1] or null")


def test_check_number_nan_fails_every_bound():
    for kw in ({"min": 0}, {"max": 0}, {"gt": 0}, {"lt": 0}):
        with pytest.raises(ValueError, match="got nan"):
            check_number(math.nan, "v", **kw)
    assert math.isnan(check_number(math.nan, "v"))  # no bound, not finite=True: a NaN is a float


def test_check_bool():
    assert check_bool(True, "flag") is True and check_bool(None, "flag", allow_none=True) is None
    for v in (1, 0, "true", None, np.bool_(True)):
        with pytest.raises(ValueError, match=re.escape(f"A.flag must be a bool, got {v!r}")):
            check_bool(v, "A.flag")
    with pytest.raises(TypeError, match=re.escape("bf16 must be a bool or None, got 1")):
        check_bool(1, "bf16", allow_none=True, error=TypeError)


def test_check_choice():
    assert check_choice("packed", "mode", ("padded", "packed")) == "packed"
    with pytest.raises(ValueError, match=re.escape("mode must be one of ('padded', 'packed'), got 'pad'")):
        check_choice("pad", "mode", ("padded", "packed"))
    with pytest.raises(ValueError, match=r"order must be one of .*, got \[1\]"):
        check_choice([1], "order", {"length", "arrival"})  # unhashable against a set: an error, not a crash


# ------------------------------------------------------------------------------------------------
# Call sites that moved onto the validators keep their exception types and messages (a bool is never an int)


def _raises(fn, exc, pattern):
    with pytest.raises(exc, match=pattern) as info:
        fn()
    assert type(info.value) is exc  # the same class as before the move, not merely a subclass


def test_ops_and_scheduler_sites():
    _raises(
        lambda: ops.bt_loss(torch.zeros(2), torch.zeros(2), center=True),
        TypeError,
        "center: expected a float, got bool",
    )
    _raises(lambda: SchedulerConfig(True, 2), TypeError, "token_budget: expected an int, got bool")
    _raises(lambda: SchedulerConfig(8, 2.0), TypeError, "max_rows: expected an int, got float")
    assert SchedulerConfig(np.int64(8), 2).token_budget == 8  # numpy ints stay accepted
    _raises(lambda: head_id(np.bool_(True), 3), TypeError, r"requests\[3\]: head_id must be an int, got bool")
    assert head_id(np.int64(3), 0) == 3


def test_lm_sites():
    _raises(lambda: check_sampling(True, 0.0, 8, None, None), ValueError, "n must be an int >= 1, got True")
    _raises(lambda: check_sampling(1, True, 8, None, None), TypeError, "temperature must be a number, got bool")
    _raises(lambda: check_sampling(1, 0.0, 0, None, None), ValueError, "max_tokens must be an int >= 1, got 0")
    _raises(lambda: check_sampling(1, 0.0, 8, None, False), TypeError, "seed must be an int or None, got bool")
    assert check_sampling(2, 1, 8, "x", 3).temperature == 1.0
    _raises(
        lambda: register_price("m", True, 1.0),
        ValueError,
        "register_price: input_per_mtok must be a finite number >= 0, got True",
    )
    _raises(lambda: Budget(max_calls=True), TypeError, "Budget: max_calls must be an integer or None, got True")
    _raises(
        lambda: LMCache(":memory:", memory_entries=False),
        ValueError,
        "LMCache: memory_entries must be an int >= 0, got False",
    )
    url = "http://127.0.0.1:9/v1"
    _raises(
        lambda: OpenAIClient(url, "m", max_concurrency=True),
        ValueError,
        "OpenAIClient: max_concurrency must be an int >= 1, got True",
    )
    _raises(
        lambda: OpenAIClient(url, "m", max_retries=-1),
        ValueError,
        "OpenAIClient: max_retries must be an int >= 0, got -1",
    )
    _raises(
        lambda: OpenAIClient(url, "m", backoff_max=True),
        ValueError,
        "OpenAIClient: backoff_max must be a number > 0, got True",
    )
    _raises(lambda: LlamaCppLM(n_ctx=True), ValueError, "LlamaCppLM: n_ctx must be an int >= 16, got True")
    _raises(lambda: LlamaCppLM(n_threads=0), ValueError, "LlamaCppLM: n_threads must be an int >= 1 or None, got 0")
    _raises(
        lambda: HFLocalLM("unused", batch_size=True), ValueError, "HFLocalLM: batch_size must be an int >= 1, got True"
    )
    _raises(
        lambda: HFLocalLM("unused", batch_wait_ms=math.nan),
        ValueError,
        "HFLocalLM: batch_wait_ms must be a number >= 0, got nan",
    )


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"per_device_train_batch_size": True}, "per_device_train_batch_size must be an int >= 1, got True"),
        ({"learning_rate": math.nan}, "learning_rate must be a positive finite number, got nan"),
        ({"weight_decay": True}, "weight_decay must be a finite number >= 0, got True"),
        ({"max_length": False}, "max_length must be None or an int >= 4, got False"),
        ({"seed": 1.0}, "seed must be an int, got 1.0"),
    ],
)
def test_reward_training_arguments_sites(kw, msg):
    _raises(lambda: RewardConfig(**kw), ValueError, re.escape(f"RewardConfig.{msg}"))


# The config, system and optimizer layers. "now refused": a bool that was accepted before as 1 / 0.


def test_reward_sites():
    _raises(
        lambda: RewardModelConfig(token_cache_size=True).validate(),
        ValueError,
        re.escape("config.token_cache_size must be an int >= 1 or None, got True"),
    )
    _raises(
        lambda: RewardModelConfig(token_budget=True).validate(),
        ValueError,
        "config.token_budget must be an int >= 1 or None, got True",
    )
    _raises(
        lambda: RewardModelConfig(pack_tokens=False).validate(),
        ValueError,
        "config.pack_tokens must be an int >= 1, got False",
    )
    _raises(lambda: as_pairs([("c", "in", "a", "b", True)]), TypeError, r"\[0\]\.margin must be a real number")
    _raises(
        lambda: TrainConfig(batch_pairs=True).validate(),
        ValueError,  # now refused
        "batch_pairs must be an int >= 1, got True",
    )
    _raises(lambda: TrainConfig(replay_size=-1).validate(), ValueError, "replay_size must be an int >= 0, got -1")
    _raises(
        lambda: LoraSettings(target_modules="query").validate(),
        ValueError,
        "lora.target_modules must be a non-empty list of module names or None, got 'query'",
    )
    _raises(lambda: LoraSettings(alpha=0).validate(), ValueError, "lora.alpha must be a finite number > 0, got 0")
    # the prefix is passed down to the nested settings: the YAML's key path, or config.<field> in Python
    _raises(
        lambda: RewardModelConfig(lora=LoraSettings(r=0)).validate("reward."),
        ValueError,
        "reward.lora.r must be an int >= 1, got 0",
    )
    _raises(
        lambda: RewardModelConfig(template=TemplateConfig(min_prefix_tokens=-1)).validate(),
        ValueError,
        "config.template.min_prefix_tokens must be an int >= 0, got -1",
    )
    _raises(lambda: RewardModelConfig(head_init_std=math.nan).validate(), ValueError, "config.head_init_std must be")
    _raises(
        lambda: TemplateConfig(max_length=True).validate(),
        ValueError,  # now refused
        "TemplateConfig.max_length must be an int >= 4, got True",
    )
    _raises(
        lambda: TokenCache(None, TemplateConfig(), True, max_entries=True),
        ValueError,
        "token cache max_entries must be an int >= 1 or None, got True",
    )
    _raises(lambda: shard_batches(np.array([3, 2]), True), ValueError, "world_size must be an int >= 1, got True")
    _raises(lambda: shard_batches(np.array([3, 2]), True), ValueError, "world_size must be an int >= 1, got True")


def test_system_sites():
    echo = Component("echo", inputs=["q"], outputs=["out"], description="copies", fn=lambda q, variable: {"out": q})
    system = System([echo], lambda ex, pred: 1.0, ["out"], inputs=["q"])
    _raises(
        lambda: system.evaluate([{"q": "x"}], workers=True),
        ValueError,  # now refused
        re.escape("evaluate(workers): expected an int >= 1, got True"),
    )
    _raises(
        lambda: BestOfN(system, None, {"echo": True}),
        ValueError,
        re.escape("best_of['echo'] must be an int >= 1, got True"),
    )
    _raises(
        lambda: BestOfN(system, _Scorer(), {"echo": 2}, temperature=True),
        ValueError,
        re.escape("temperature must be a number in (0, 2], got True"),
    )


class _Scorer:
    def score(self, rows):
        return torch.zeros(len(list(rows)))


def test_optimizer_sites():
    _raises(lambda: ChoiceConfig(max_inputs=True).validate(), ValueError, "choice.max_inputs must be an int >= 1")
    _raises(
        lambda: OptimizerBudget(max_rows=False).validate(),
        ValueError,
        "OptimizerBudget.max_rows must be an int >= 1 or None, got False",
    )
    _raises(lambda: PromptConfig(max_chars=True).validate(), ValueError, "prompt.max_chars must be an int >= 1")
    _raises(lambda: WeightsConfig(steps=True).validate(), ValueError, "weights.steps must be an int >= 1, got True")
    _raises(lambda: WeightsConfig(lora_samples=1).validate(), ValueError, "weights.lora_samples must be an int >= 2")
    _raises(
        lambda: WeightsConfig(lora_lr=True).validate(), ValueError, "weights.lora_lr must be a number > 0, got True"
    )
    _raises(
        lambda: LoRAPolicy(torch.nn.Linear(1, 1), None, r=True),
        ValueError,
        "LoRAPolicy: r must be an int >= 1, got True",
    )


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"iterations": True}, "iterations must be an int >= 0, got True"),
        ({"cooldown": -1}, "cooldown must be an int >= 0, got -1"),
        ({"seed": False}, "seed must be an int, got False"),
        ({"initial_examples": 0}, "initial_examples must be an int >= 1, got 0"),
        ({"selection_temperature": math.inf}, "selection_temperature must be a finite number > 0, got inf"),
        ({"gap_ema": True}, re.escape("gap_ema must be a number in (0, 1], got True")),  # now refused
        ({"alignment_threshold": 2}, re.escape("alignment_threshold must be a number in [0, 1], got 2")),
        ({"gate_confidence": 1.0}, re.escape("gate_confidence must be a number in [0.5, 1) or null, got 1.0")),
        ({"min_spearman": True}, re.escape("min_spearman must be a number in [-1, 1] or null, got True")),
        ({"holdout_fraction": math.nan}, re.escape("holdout_fraction must be a number in [0, 1), got nan")),
    ],
)
def test_optimas_config_sites(kw, match):
    _raises(lambda: OptimasConfig(**kw).validate(), ConfigError, match)


def test_optimas_config_budget_and_types():
    _raises(
        lambda: OptimasConfig(budget=BudgetConfig(max_usd=math.nan)).validate(),
        ConfigError,
        "budget.max_usd must be a finite number >= 0 or null, got nan",
    )
    _raises(lambda: OptimasConfig.from_dict({"batch_size": True}), ConfigError, "batch_size")
    assert OptimasConfig.from_dict({"selection_temperature": 1, "gate_confidence": 0.9}).selection_temperature == 1
    # the prefix names the full key, the sections' fields included
    _raises(lambda: OptimasConfig(iterations=-1).validate("loop."), ConfigError, "loop.iterations must be")
    _raises(lambda: OptimasConfig(cooldown=-1).validate("loop."), ConfigError, "loop.cooldown must be")
    _raises(
        lambda: OptimasConfig(budget=BudgetConfig(max_calls=-1)).validate("loop."),
        ConfigError,
        "loop.budget.max_calls must be",
    )
    _raises(
        lambda: OptimasConfig.from_dict({"collect": {"num_candidates": 1}}, prefix="loop."),
        ConfigError,
        "loop.collect.num_candidates must be an int >= 2, got 1",
    )
    # the reward model's training knobs live in TrainConfig only: the loop's old keys say where they went
    for key in ("lr", "head_lr", "batch_pairs"):
        _raises(lambda key=key: OptimasConfig.from_dict({key: 1}), ConfigError, f"{key} moved to reward.train.{key}")
        _raises(lambda key=key: OptimasConfig(**{key: 1}), TypeError, key)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"lr": math.inf}, "lr must be a finite number > 0, got inf"),
        ({"lr": True}, "lr must be a finite number > 0, got True"),  # now refused
        ({"head_lr": 0}, re.escape("head_lr must be a finite number > 0 or None, got 0")),
        ({"schedule": "cosin"}, re.escape("schedule must be one of ['constant', 'linear', 'cosine'], got 'cosin'")),
        ({"weighting": "none"}, re.escape("weighting must be one of ['margin', 'uniform'], got 'none'")),
        ({"min_lr_ratio": 2}, re.escape("min_lr_ratio must be a number in [0, 1], got 2")),
        ({"margin_floor": 0}, re.escape("margin_floor must be a finite number > 0 (else zero-margin pairs")),
        ({"margin_scale": math.nan}, "margin_scale must be a finite number, got nan"),
        ({"subtract_margin": 1}, "subtract_margin must be a bool, got 1"),
        ({"group_by_input": None}, "group_by_input must be a bool, got None"),
        ({"center": -1}, "center must be a finite number >= 0, got -1"),
        ({"weight_decay": True}, "weight_decay must be a finite number >= 0, got True"),
        ({"grad_clip": 0}, re.escape("grad_clip must be a finite number > 0 or None, got 0")),
        ({"warmup_steps": 1.5}, "warmup_steps must be an int >= 0, got 1.5"),
        ({"replay_fraction": 1.0}, re.escape("replay_fraction must be a number in [0, 1), got 1.0")),
    ],
)
def test_train_config_sites(kw, match):
    _raises(lambda: TrainConfig(**kw).validate(), ValueError, match)
    # the prefix is passed down, never pasted on afterwards: a run's loader gets the YAML key
    _raises(lambda: TrainConfig(**kw).validate("reward.train."), ValueError, "reward.train." + match)


def test_preference_sites():
    _raises(
        lambda: CollectConfig(num_candidates=True).validate(),
        ValueError,  # now refused
        "num_candidates must be an int >= 2, got True",
    )
    _raises(lambda: CollectConfig(rollouts=True).validate(), ValueError, "rollouts must be an int >= 1, got True")
    _raises(lambda: CollectConfig(workers=0).validate(), ValueError, "workers must be an int >= 1, got 0")
    _raises(lambda: PairStore(max_groups=True), ValueError, "PairStore.max_groups must be an int >= 1, got True")


def test_example_sites():
    _raises(
        lambda: build_pubmedqa_system("embedded", config=PubMedQAConfig(solver_max_tokens=(8, True))),
        ValueError,
        "PubMedQAConfig.solver_max_tokens must be a non-empty tuple of ints >= 1",
    )
    _raises(
        lambda: build_codegen_system("embedded", config=CodegenConfig(num_tests=(3, False))),
        ValueError,
        "CodegenConfig.num_tests must be a non-empty tuple of ints >= 1",
    )
    _raises(lambda: HashEmbedder(dim=True), ValueError, re.escape("HashEmbedder(dim): expected an int >= 2, got True"))
    _raises(lambda: HashEmbedder(cache_size=True), ValueError, "cache_size: expected an int >= 0, got True")
    _raises(lambda: split_examples([1, 2, 3], seed=True), TypeError, re.escape("split_examples(seed): expected an int"))


# sandbox.py keeps its own check: its supervisor runs the file as a script, where optimas_fast is not importable
@pytest.mark.parametrize(
    "kw, name",
    [
        ({"timeout_s": True}, "timeout_s"),
        ({"memory_mb": 1.5}, "memory_mb"),
        ({"max_procs": True}, "max_procs"),
        ({"cpu_s": 0}, "cpu_s"),
    ],
)
def test_sandbox_checks(kw, name):
    _raises(lambda: run_python("pass", **kw), ValueError, re.escape(f"run_python({name}): expected a positive number"))


@pytest.mark.parametrize(
    "data, reward, match",
    [
        ({"train": True}, {}, "data.train must be an int >= 1 (a size cap), a JSONL file path or null, got True"),
        ({"seed": True}, {}, "data.seed must be an int or null (loop.seed), got True"),  # now refused
        ({}, {"max_length": True}, "reward.max_length must be of type int, got True"),
        ({}, {"max_length": 3}, "reward.max_length must be an int >= 4, got 3"),  # the engine's own bound
    ],
)
def test_cli_sites(data, reward, match):
    _raises(
        lambda: parse_config({"system": "synthetic", "data": data, "reward": reward}), ConfigError, re.escape(match)
    )
