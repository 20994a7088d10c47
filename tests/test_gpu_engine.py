"""The reward engine on CUDA, through the public RewardModel API only: scores, training and prefix sharing
equal to the same model on CPU (tiny random Llama and BERT configs, float32 on both sides), bf16 on CUDA
agrees with fp32, training under an NCCL process group (world size 1, file:// rendezvous) equals training
without one, and the vLLM engine's greedy generation equals the transformers engine's (only when vllm
imports: marked `vllm` too, so that benchmarks/gpu_check.sh runs it only where vllm is installed and never
counts its skip as a pass). Packing on CUDA: SDPA with the block mask, and flash-attn's varlen kernel (marked
`flash`, the same way)."""

from __future__ import annotations

import gc
import os
import random

import pytest
import torch
import torch.multiprocessing as mp

from optimas_fast.reward import PreferencePair, RewardModel, RewardModelConfig, init_distributed, spearman
from optimas_fast.reward.testing import wordpiece_tokenizer

pytestmark = pytest.mark.gpu

WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
    "upsilon phi chi psi omega river stone cloud lamp"
).split()
COMPONENTS = {"a": "component a answers", "b": "component b explains"}


def _tokenizer():
    return wordpiece_tokenizer([*WORDS, "input", "component", "answers", "explains"])


@pytest.fixture(scope="module")
def tokenizer():
    return _tokenizer()


def _backbone(kind: str, vocab: int, seed: int):
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    if kind == "decoder":
        return LlamaModel(
            LlamaConfig(
                vocab_size=vocab,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=512,
            )
        )
    return BertModel(
        BertConfig(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=512,
        )
    )


def build(kind: str, tok, seed: int, device: str, **cfg) -> RewardModel:
    """The same weights on any device: built on CPU from the seed, then moved by RewardModel."""
    cfg.setdefault("score_amp", "none")  # fp32 on both sides unless a test asks for bf16
    cfg.setdefault("amp", "none")
    return RewardModel(
        _backbone(kind, tok.vocab_size, seed),
        COMPONENTS,
        tokenizer=tok,
        config=RewardModelConfig(seed=seed, **cfg),
        device=device,
    )


def words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def requests(rng: random.Random, n_inputs: int, n_cands: int):
    rows = []
    for i in range(n_inputs):
        comp, inp = rng.choice("ab"), f"input {i}: " + words(rng, 3, 30)
        rows += [(comp, inp, words(rng, 1, 9)) for _ in range(n_cands)]
    rng.shuffle(rows)
    return rows


def pairs(rng: random.Random, n: int):
    return [
        PreferencePair(
            rng.choice("ab"), f"input {i % 3}: " + words(rng, 2, 12), words(rng, 1, 6), words(rng, 1, 6), rng.random()
        )
        for i in range(n)
    ]


def close_scores(got: torch.Tensor, want: torch.Tensor, rel: float):
    """Scores agree within `rel` of their spread (float32 kernels differ between devices in summation order)."""
    scale = max(float(want.std()), float(want.abs().max()) * 0.1, 1e-6)
    torch.testing.assert_close(got.cpu().float(), want.cpu().float(), rtol=0, atol=rel * scale)


# ------------------------------------------------------------------------------------------------ scoring
@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_cuda_scores_equal_cpu(kind, tokenizer, seed):
    rng = random.Random(seed)
    reqs = requests(rng, 5, 4)
    on_cpu = build(kind, tokenizer, seed, "cpu").score(reqs)
    rm = build(kind, tokenizer, seed, "cuda")
    on_gpu, report = rm.score_with_report(reqs)
    assert on_gpu.shape == (len(reqs),) and on_gpu.dtype == torch.float32
    assert on_cpu.std() > 0  # distinct scores: the comparison can fail
    close_scores(on_gpu, on_cpu, 1e-3)
    assert report.n_requests == len(reqs)


def test_prefix_sharing_on_cuda_is_exact(tokenizer, seed):
    rng = random.Random(seed)
    reqs = requests(rng, 4, 7)
    rm = build("decoder", tokenizer, seed, "cuda")
    shared, rep = rm.score_with_report(reqs)
    rm.encoder.config.prefix_sharing = False
    independent, rep_off = rm.score_with_report(reqs)
    assert rep.prefix_sharing == "on" and rep_off.prefix_sharing.startswith("off")
    assert rep.tokens_encoded < rep_off.tokens_encoded  # each prefix went through the backbone once
    close_scores(shared, independent, 1e-3)
    close_scores(shared, build("decoder", tokenizer, seed, "cpu").score(reqs), 1e-3)


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_bf16_on_cuda_agrees_with_fp32(kind, tokenizer, seed):
    rng = random.Random(seed)
    reqs = requests(rng, 6, 8)
    fp32 = build(kind, tokenizer, seed, "cuda").score(reqs)
    rm = build(kind, tokenizer, seed, "cuda", score_amp="bf16")
    bf16, rep = rm.score_with_report(reqs)
    assert rep.amp == "bf16"
    # bf16 rounds the residual stream: measured on CPU up to 3% of the score spread (tests/test_reward.py)
    close_scores(bf16, fp32, 0.1)
    assert spearman(bf16.tolist(), fp32.tolist()) > 0.95


# ------------------------------------------------------------------------------------------------ packing
@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_packed_batches_on_cuda_equal_padded(kind, tokenizer, seed):
    """Packing on CUDA with SDPA and the explicit block mask (decoders: prefix sharing inside the pack)."""
    rng = random.Random(seed)
    reqs = requests(rng, 5, 4)
    padded = build(kind, tokenizer, seed, "cuda").score(reqs)
    packed = build(kind, tokenizer, seed, "cuda", packing=True, pack_tokens=256).score(reqs)
    close_scores(packed, padded, 1e-3)


@pytest.mark.flash
def test_flash_attention_varlen_packing_equals_padded(tokenizer, seed):
    """A decoder on transformers' flash-attention-2 path: packs go as position ids alone and flash-attn's varlen
    kernel runs the rows as segments, against padded SDPA batches, both scoring in bf16 (flash-attn takes fp16 /
    bf16 only). Marked `flash`: gpu_check.sh runs it where flash-attn imports (it tries `pip install flash-attn`)."""
    pytest.importorskip("flash_attn", reason="flash-attn is not installed")
    rng = random.Random(seed)
    reqs = requests(rng, 6, 3)
    ref = build("decoder", tokenizer, seed, "cuda", score_amp="bf16").score(reqs)
    rm = build(
        "decoder",
        tokenizer,
        seed,
        "cuda",
        score_amp="bf16",
        packing=True,
        pack_tokens=256,
        attn_implementation="flash_attention_2",
    )
    assert rm.encoder.packs_by_positions()
    got = rm.score(reqs)
    close_scores(got, ref, 0.1)
    assert spearman(got.tolist(), ref.tolist()) > 0.95


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_cuda_training_equals_cpu(kind, tokenizer, seed):
    rng = random.Random(seed)
    train = pairs(rng, 8)
    probe = requests(rng, 3, 4)
    runs = {}
    for dev in ("cpu", "cuda"):
        rm = build(kind, tokenizer, seed, dev)
        hist = rm.train(train, epochs=2, lr=1e-3, batch_pairs=4)
        runs[dev] = ([h["loss"] for h in hist], rm.score(probe))
    (loss_cpu, s_cpu), (loss_gpu, s_gpu) = runs["cpu"], runs["cuda"]
    assert len(loss_cpu) == len(loss_gpu) == 4
    torch.testing.assert_close(torch.tensor(loss_gpu), torch.tensor(loss_cpu), rtol=1e-3, atol=1e-4)
    # Adam normalises each gradient element: float32 summation-order differences on near-zero gradients
    # move weights by up to lr per step, so trained scores agree less tightly than forward passes
    close_scores(s_gpu, s_cpu, 2e-2)


def test_bf16_training_on_cuda_runs_and_learns(tokenizer, seed):
    rng = random.Random(seed)
    train = pairs(rng, 12)
    rm = build("decoder", tokenizer, seed, "cuda", amp="bf16")
    hist = rm.train(train, epochs=3, lr=3e-3, batch_pairs=4)
    losses = [h["loss"] for h in hist]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3])  # 3 epochs on 12 pairs: the loss goes down


# ------------------------------------------------------------------------------------------------ NCCL
def _nccl_worker(rank: int, init_file: str, seed: int, out: str) -> None:
    from optimas_fast.reward import cleanup_distributed

    info = init_distributed("nccl", init_method=f"file://{init_file}", rank=rank, world_size=1)
    try:
        assert info.backend == "nccl" and info.device.type == "cuda", info
        t = torch.full((4,), 2.0, device=info.device)
        torch.distributed.all_reduce(t)  # the NCCL communicator really works (world 1: the identity)
        rng = random.Random(seed)
        train, probe = pairs(rng, 8), requests(rng, 3, 4)
        rm = build("decoder", _tokenizer(), seed, str(info.device))
        hist = rm.train(train, epochs=2, lr=1e-3, batch_pairs=4)
        torch.save({"loss": [h["loss"] for h in hist], "scores": rm.score(probe), "reduced": t.cpu()}, out)
        del rm
        gc.collect()
    finally:
        cleanup_distributed()


def test_nccl_world_one_trains_like_a_single_process(tokenizer, seed, tmp_path):
    assert torch.distributed.is_available() and torch.distributed.is_nccl_available()
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_nccl_worker, args=(str(tmp_path / "pg_init"), seed, out), nprocs=1, join=True)
    got = torch.load(out)
    rng = random.Random(seed)
    train, probe = pairs(rng, 8), requests(rng, 3, 4)
    rm = build("decoder", tokenizer, seed, "cuda")
    hist = rm.train(train, epochs=2, lr=1e-3, batch_pairs=4)
    assert torch.equal(got["reduced"], torch.full((4,), 2.0))
    torch.testing.assert_close(torch.tensor(got["loss"]), torch.tensor([h["loss"] for h in hist]), rtol=1e-4, atol=1e-5)
    close_scores(got["scores"], rm.score(probe), 1e-3)


# ------------------------------------------------------------------------------------------------ vLLM
@pytest.mark.vllm
def test_vllm_generation_equals_transformers(tmp_path, seed):
    pytest.importorskip("vllm", reason="vllm is not installed (pip install optimas-fast[vllm])")
    import string

    import tokenizers
    import transformers

    from optimas_fast.lm import HFLocalLM, UsageLedger
    from optimas_fast.lm.vllm_engine import VLLMEngine

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
    chars = list(string.ascii_letters + string.digits + " .,?!:;'-\n")
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex("."), behavior="isolated")
    tk.decoder = tokenizers.decoders.Fuse()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    torch.manual_seed(seed)
    # head_dim 64 (every vLLM attention backend takes it); large init: peaky logits, no greedy near-ties
    cfg = transformers.LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=1,
        pad_token_id=0,
        bos_token_id=None,
        initializer_range=0.3,
    )
    path = str(tmp_path / "tiny-llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    rng = random.Random(seed)
    prompts = ["".join(rng.choices(chars[:62], k=rng.randrange(4, 30))) for _ in range(6)]
    ledger = UsageLedger()
    engine = VLLMEngine(
        path,
        use_chat_template=False,
        cache=False,
        ledger=ledger,
        dtype="bfloat16",
        gpu_memory_utilization=0.3,
        enforce_eager=True,
        max_model_len=256,
        seed=0,
    )
    hf = HFLocalLM(
        path, dtype="bfloat16", device="cuda", use_chat_template=False, cache=False, ledger=UsageLedger(), name="tiny"
    )
    got = engine.generate(prompts, max_tokens=12)
    want = hf.generate(prompts, max_tokens=12)
    same = sum(g[0].text == w[0].text for g, w in zip(got, want, strict=True))
    # bf16 on both sides, different kernels: all first tokens agree, whole greedy strings in most prompts
    assert all(g[0].text[:1] == w[0].text[:1] for g, w in zip(got, want, strict=True)), (got, want)
    assert same >= len(prompts) - 1, (got, want)
    for p, g in zip(prompts, got, strict=True):
        assert g[0].usage.prompt_tokens == len(tok(p)["input_ids"]) and 0 < g[0].usage.completion_tokens <= 12
    assert engine.generate(prompts, max_tokens=12) == got  # greedy is deterministic
    seeded = [engine.generate(prompts[:2], temperature=1.0, max_tokens=8, seed=7, n=2) for _ in range(2)]
    assert seeded[0] == seeded[1]  # seeded sampling repeats


# ------------------------------------------------------------------------------------------------ sharded scoring
def _sharded_worker(rank: int, init_file: str, seed: int, out_dir: str) -> None:
    from optimas_fast.reward import cleanup_distributed

    # gloo between the ranks, models on the one GPU: two NCCL ranks may not share a device, and the scores are
    # gathered as objects anyway (distributed.gather_row_scores); what runs on CUDA is each rank's share
    init_distributed("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        reqs = requests(random.Random(seed), 6, 5)
        rm = build("decoder", _tokenizer(), seed, "cuda", token_budget=96, max_rows=4)
        scores, rep = rm.score_with_report(reqs)  # sharded: this rank's batches on CUDA, all N scores back
        torch.save(
            {
                "scores": scores,
                "rank": rep.rank,
                "world": rep.world_size,
                "batches": rep.n_batches,
                "total": rep.n_batches_total,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
        del rm
        gc.collect()
    finally:
        cleanup_distributed()


def test_sharded_scoring_on_cuda_equals_one_process(tokenizer, seed, tmp_path):
    """Two ranks (init_distributed, file:// rendezvous) split one pool's planned batches, each scoring its share on
    the GPU; both return all N scores, equal to one process's on CUDA."""
    mp.spawn(_sharded_worker, args=(str(tmp_path / "pg_init"), seed, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    reqs = requests(random.Random(seed), 6, 5)
    ref = build("decoder", tokenizer, seed, "cuda", token_budget=96, max_rows=4).score(reqs)
    assert ref.std() > 0
    for r, got in enumerate(ranks):
        assert (got["rank"], got["world"]) == (r, 2) and got["batches"] >= 1
        close_scores(got["scores"], ref, 1e-4)
    assert ranks[0]["batches"] + ranks[1]["batches"] == ranks[0]["total"]  # every batch on exactly one rank


# ------------------------------------------------------------------------------------------------ CUDA defaults
def test_cuda_defaults(tokenizer, seed):
    """What "auto" means on CUDA: bf16 scoring and training, the 16,384-token budget, the engine's SDPA kernel,
    fused AdamW (CUDA parameters), and the shared-prefix kernel on for a Llama decoder."""
    rm = RewardModel(
        _backbone("decoder", tokenizer.vocab_size, seed),
        COMPONENTS,
        tokenizer=tokenizer,
        config=RewardModelConfig(seed=seed),
        device="cuda",
    )
    enc = rm.encoder
    assert enc.device.type == "cuda" and enc.precision.uses_bf16(True) and enc.precision.uses_bf16(False)
    assert enc.token_budget == 16384 and enc.attention_name() == "sdpa" and enc._shared_prefix_kernel()
    reqs = requests(random.Random(seed), 3, 4)
    scores, rep = rm.score_with_report(reqs)
    assert rep.amp == "bf16" and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    rm.train(pairs(random.Random(seed), 4), epochs=1, lr=1e-3, batch_pairs=4)
    opt = rm.trainer.optimizer
    assert opt.defaults.get("fused") is True, opt.defaults
