"""Settings of the reward engine's encoder (backbone + heads): RewardModelConfig and LoRA settings.

The lowest module of reward/ besides the plain-data ones: the encoder, the trainer, the checkpoint module and
the RewardModel facade all read a RewardModelConfig; nothing here imports them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from optimas_fast._validate import check_bool, check_choice, check_int, check_number

from .template import TemplateConfig


@dataclass
class LoraSettings:
    r: int = 8  # adapter rank
    alpha: int = 16  # LoRA scaling numerator (scale = alpha / r)
    dropout: float = 0.0  # adapter dropout (0 keeps training deterministic)
    target_modules: list[str] | None = None  # module names to adapt; None lets peft pick per architecture

    def validate(self, prefix: str = "lora.") -> None:
        """ValueError naming the bad field as ``{prefix}{field}``."""
        check_int(self.r, f"{prefix}r", min=1)
        check_number(self.alpha, f"{prefix}alpha", gt=0, finite=True)
        check_number(self.dropout, f"{prefix}dropout", min=0, lt=1)
        t = self.target_modules
        if t is not None and (not isinstance(t, list) or not t or not all(isinstance(m, str) and m for m in t)):
            raise ValueError(f"{prefix}target_modules must be a non-empty list of module names or None, got {t!r}")


@dataclass
class RewardModelConfig:
    template: TemplateConfig = field(default_factory=TemplateConfig)  # text layout + max length
    architecture: str = "auto"  # "encoder" | "decoder" | "auto" (masked-LM model types are encoders)
    pooling: str = "auto"  # "auto" | "last" | "mean" | "cls"; auto = mean for encoders, last for decoders
    prefix_sharing: bool = True  # decoders: encode a shared prefix once (KV cache); ignored for encoders
    # shared-prefix scoring and training on the CPU through attention.py's kernel: suffixes attend to each
    # prefix's keys held once (log-sum-exp merge) instead of a per-row copy of the cache. Same scores and
    # gradients (tests); False = the per-row cache. SmolLM2-135M, 1 prompt x 1024 candidates, bf16, 2-core
    # EPYC: 20.6 vs 12.7 rows/s (RESULTS.md, "Shared-prefix kernel")
    shared_prefix_kernel: bool = True
    # scheduler: most (padded) tokens per backbone call; None = by device: 16384 on CUDA, 4096 on CPU, where
    # a call's activations then stay in cache (MiniLM, 453-token rows, 2-core EPYC: 2048-4096 tokens gave
    # 33.0 / 31.5 rows/s in bf16 vs 30.9 at 16384, and 15.8 / 15.0 vs 13.5 in fp32; RESULTS.md)
    token_budget: int | None = None
    max_rows: int = 256  # scheduler: most rows per backbone call
    # training autocast: "auto" = bf16 on CUDA and on CPUs with native bf16 matmul (avx512_bf16 / AMX; see
    # cpu_has_native_bf16), fp32 elsewhere | "bf16" | "none" (fp32). Chosen by measurement: MiniLM-L6 on
    # unique 367-token pairs, 2-core EPYC: bf16 1.44x the pairs/s of fp32, held-out accuracy 0.83 both
    # (benchmarks/RESULTS.md, "Unique-pair reward training")
    amp: str = "auto"
    # inference precision for score()/evaluate(): "auto" = bf16 on CUDA and on CPUs with AMX-BF16 (see
    # cpu_has_amx_bf16), fp32 elsewhere, avx512_bf16-only CPUs included | "bf16" | "none" (fp32). Chosen per
    # CPU kind by measurement on held-out pairs: AMX Xeon, bf16 2.8x fp32 on MiniLM-L6 and SmolLM2-135M; EPYC
    # with avx512_bf16 only, bf16 +4% on MiniLM and -13% on SmolLM2 (RESULTS.md, "Pair scoring precision")
    score_amp: str = "auto"
    # how bf16 scoring runs: "cast" = a bf16 copy of the backbone, made once per weight version (re-made only
    # after training or loading changed a parameter), so no op re-casts fp32 weights or round-trips through
    # fp32; "autocast" = torch.autocast over the fp32 weights (no extra copy: for a backbone too large to hold
    # twice). MiniLM-L6, 64 x 453-token rows, 2-core EPYC: cast 13.3 rows/s vs autocast 11.7 (RESULTS.md).
    score_weights: str = "cast"
    token_cache_size: int | None = 200_000  # token cache bound (LRU, distinct texts); None = unbounded
    # training memory: a step's pairs are split into chunks of at most this many tokens (pairs of one input kept
    # together, a shared prefix counted once), each chunk encoded and backpropagated before the next, so only one
    # chunk's activations are alive at a time. Exact (the loss is a sum over pairs; each chunk's share is divided by
    # the whole batch's weight) and on every device; under DDP all but the last chunk skip the gradient all-reduce.
    # None = the whole batch at once (a GPU with memory to spare may prefer it: larger calls). A pair longer than the
    # budget is a chunk of its own. 2048 by measurement (benchmarks/RESULTS.md, "Where reward training's memory
    # goes"): MiniLM, unique 365-token pairs, batch 8, bf16, 2-core EPYC: peak RSS 2056 -> 1683 MiB (TRL 1646), a
    # step 1.20 vs 1.21-1.28 s whole-batch (same-process A/B medians); 1024 saves more (1493) but costs 10-16%
    train_chunk_tokens: int | None = 2048
    # padded batches pad each row to the batch's longest row rounded up to a bucket: a multiple of this many
    # tokens, or of the largest power of two <= 1/8 of that length when it is smaller (so padding adds at most
    # 12.5%: a 20-token suffix rounds to 22, a 400-token row to 416). Why: CPU kernels (oneDNN's primitive cache)
    # keep native memory per distinct tensor shape, and exact widths make a new shape nearly every chunk; buckets
    # make at most 8 widths per doubling of length. 32 by measurement (RESULTS.md, "Bucketed padding"): MiniLM, 80
    # unique pairs, 10 steps, bf16, 2-core Xeon: peak RSS 2099 -> 1659 MiB (TRL 1689), same held-out accuracy.
    # Padding is masked: same scores. None = the longest row exactly. Packed batches have no padding
    padding_bucket: int | None = 32
    # training memory: activation checkpointing of the backbone (transformers' own, non-reentrant): each layer keeps
    # only its input and is recomputed in the backward (one more forward of compute). TRL's RewardConfig turns it on
    # by default (MiniLM: 87 vs 825 MiB saved for backward a step of 8 pairs, RESULTS.md). With prefix sharing on a
    # decoder it runs through the shared-prefix attention kernel (the prefix's keys/values taken as the prefix call
    # makes them, each suffix layer recomputed against them: attention.capture_kv / checkpoint_contexts); the
    # per-row cache path (shared_prefix_kernel=False) cannot, a ValueError at the first step
    gradient_checkpointing: bool = False
    # training memory: "norm" = Llama / Mistral / Qwen-type RMSNorms keep their input and one scalar per token for
    # the backward instead of input + normalised output (fp32); "all" = also the SwiGLU MLPs keep their bf16 input
    # once, gate, up and product instead of two input casts, gate, silu, up and product; "none" = transformers' own
    # modules. The rest is recomputed in the backward: same outputs, gradients equal to rounding (reward/lean.py).
    # "none" by measurement (RESULTS.md, "Reward training memory"): on SmolLM2-135M through the engine, "norm" left
    # peak RSS and saved bytes unchanged (6898 vs 6898 MiB, same commit) at no speed cost; "all" saved 571 MiB at
    # peak for 5% a step (random 26M decoder, same-process A/B). Read when the model is built
    lean_activations: str = "none"
    # backbone attention kernel: "sdpa" (torch scaled_dot_product_attention; MiniLM-L6, 32 x 440-token rows,
    # CPU: 1.7x faster than "eager" in fp32, 2.1x in bf16), "eager", any name transformers accepts, or None to
    # keep what the backbone was built with. A backbone that cannot use it raises a ValueError at construction.
    attn_implementation: str | None = "sdpa"
    # padding-free packed batches (BERT-type encoders; Llama/Qwen-type decoders, with prefix sharing): rows
    # concatenated into packs of at most pack_tokens tokens, attention kept inside each row by a block mask
    # (SDPA), positions restarting per row; on decoders the rows of one prefix group share one copy of the
    # prefix inside the pack. Exact (tests). Off by default, by measurement (MiniLM-L6 fp32, 2-core EPYC, CPU
    # seconds): against the planner's length-sorted padded batches (48 rows of 40-400 words: 20% padding)
    # packing is 1.7x SLOWER (13.2-14.2 s vs 8.0-8.3 s; the dense block mask makes attention cost pack^2);
    # only against unsorted padding (24 rows, 66% padding) did a 1024-token pack win (1.74 s vs 2.24 s)
    packing: bool = False
    pack_tokens: int = 1024  # longest pack: the block-diagonal mask makes attention cost pack_tokens^2
    head_init_std: float = 0.02  # std of a new head's weights (bias starts at 0)
    disable_dropout: bool = True  # reward training is deterministic and matches the reference trainer
    lora: LoraSettings | None = None  # LoRA on the backbone via peft (optional extra `lora`)
    seed: int = 0  # seeds head initialisation and the trainer's shuffling

    def validate(self, prefix: str = "config.") -> None:
        """ValueError naming the bad field as ``{prefix}{field}`` (a run's loader passes ``"reward."``, so the message
        names the YAML key: ``reward.amp``, ``reward.template.max_length``, ``reward.lora.r``)."""
        p = prefix
        check_choice(self.architecture, f"{p}architecture", ["auto", "encoder", "decoder"])
        check_choice(self.pooling, f"{p}pooling", ["auto", "last", "mean", "cls"])
        check_choice(self.amp, f"{p}amp", ["auto", "bf16", "none"])
        check_choice(self.score_amp, f"{p}score_amp", ["auto", "bf16", "none"])
        check_choice(self.score_weights, f"{p}score_weights", ["cast", "autocast"])
        check_bool(self.prefix_sharing, f"{p}prefix_sharing")
        check_bool(self.shared_prefix_kernel, f"{p}shared_prefix_kernel")
        check_int(self.token_cache_size, f"{p}token_cache_size", min=1, allow_none=True)
        check_int(self.train_chunk_tokens, f"{p}train_chunk_tokens", min=1, allow_none=True)
        check_int(self.padding_bucket, f"{p}padding_bucket", min=1, allow_none=True)
        check_bool(self.gradient_checkpointing, f"{p}gradient_checkpointing")
        check_choice(self.lean_activations, f"{p}lean_activations", ("none", "norm", "all"))
        a = self.attn_implementation
        if a is not None and (not isinstance(a, str) or not a):
            raise ValueError(f"{p}attn_implementation must be a non-empty str or None, got {a!r}")
        check_int(self.token_budget, f"{p}token_budget", min=1, allow_none=True)
        check_int(self.max_rows, f"{p}max_rows", min=1)
        check_bool(self.packing, f"{p}packing")
        check_int(self.pack_tokens, f"{p}pack_tokens", min=1)
        check_number(self.head_init_std, f"{p}head_init_std", min=0, finite=True)
        check_bool(self.disable_dropout, f"{p}disable_dropout")
        check_int(self.seed, f"{p}seed")
        self.template.validate(f"{p}template.")
        if self.lora is not None:
            self.lora.validate(f"{p}lora.")


def reward_config_to_dict(c: RewardModelConfig) -> dict:
    return asdict(c)


def reward_config_from_dict(d: dict) -> RewardModelConfig:
    d = dict(d)
    d["template"] = TemplateConfig(**d["template"])
    if d.get("lora") is not None:
        d["lora"] = LoraSettings(**d["lora"])
    return RewardModelConfig(**d)
