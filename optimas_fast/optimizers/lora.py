"""LoRA on a Hugging Face causal LM as a component's ``Weights``, optimized against the LRF.

Pieces:

- ``LoRAPolicy(model, tokenizer, r=..., alpha=...)``: the causal LM wrapped by peft with a LoRA adapter. The
  base weights never change; only the adapter tensors do. It generates (greedy or seeded sampling) and
  computes completion log-probabilities with whatever adapter it is handed.
- ``LoRAAdapter``: an ``nn.Module`` that holds *only* the adapter tensors (a few hundred KB for a 135M
  model at r=8). It is the value of the component's ``Weights`` variable, so the run state, the validation
  gate and ``system_state.json`` carry the adapter and nothing else.
- ``LoRAComponent``: a component whose single output is the policy's generation for a prompt built from
  its inputs; its variable is ``Weights(LoRAAdapter)``.

Optimization (documented choice: **best-of-N sampling + DPO**, not PPO/GRPO). The LRF scores *text*, so its
reward is not differentiable in the adapter; a policy-gradient method would need many LRF calls per
update and a value/baseline estimate, which is noisy at the handful of stored inputs an Optimas iteration
has. DPO (Rafailov et al., 2023) needs only preference pairs, which the LRF gives directly:

    for each stored input x: sample N completions from the current adapter (temperature T, seeded),
        score them with the component's LRF head (one batched score call, rows aligned with inputs);
        pair the best with the worst when their scores differ
    reference log-probs: the current adapter (frozen), computed once
    S steps of Adam on the adapter only:
        loss = -mean log sigmoid(beta * [(log pi(y+|x) - log ref(y+|x)) - (log pi(y-|x) - log ref(y-|x))])
    best-of: the incumbent and the trained adapter both decode greedily (the component's own decoding) on
        the same inputs and are scored by the LRF; the higher mean wins (a tie keeps the incumbent)

The validation gate then decides on the global metric, as for every other proposal.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from optimas_fast import ops
from optimas_fast._validate import check_int
from optimas_fast.lm.hf_local import GumbelSampler, left_pad
from optimas_fast.optimizers.base import mean, override_for, run_batch, score_matrix
from optimas_fast.system import Component, Weights

__all__ = ["LoRAPolicy", "LoRAAdapter", "LoRAComponent", "optimize_lora"]


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys may not contain dots


class LoRAAdapter(torch.nn.Module):
    """The adapter tensors of a ``LoRAPolicy`` (parameter name -> tensor), detached from the model."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        super().__init__()
        self.tensors = torch.nn.ParameterDict(
            {_key(n): torch.nn.Parameter(t.detach().clone().float(), requires_grad=False) for n, t in tensors.items()}
        )

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[_key(name)]


class LoRAPolicy:
    """A causal LM with a peft LoRA adapter; thread-safe (one lock around every use of the shared model)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        r: int = 8,
        alpha: int = 16,
        target_modules: Sequence[str] | None = None,
        init_seed: int = 0,
    ):
        try:
            import peft
        except ImportError as exc:  # pragma: no cover - exercised only without the extra
            raise ImportError("LoRAPolicy needs peft: pip install 'optimas-fast[lora]'") from exc
        check_int(r, "LoRAPolicy: r", min=1)
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
            raise ValueError("LoRAPolicy: the tokenizer has neither a pad nor an eos token")
        cfg = peft.LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
            target_modules=list(target_modules) if target_modules else None,
        )
        fork = torch.random.fork_rng(devices=[])  # peft draws its init from the global RNG: keep ours untouched
        with fork:
            torch.manual_seed(init_seed)
            self.model = peft.get_peft_model(model, cfg)
        self.model.eval()
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]  # adapter tensors only
        if not self.names:
            raise ValueError("LoRAPolicy: peft added no trainable tensor (check target_modules)")
        self.lock = threading.RLock()
        self.device = next(self.model.parameters()).device

    def adapter(self) -> LoRAAdapter:
        """The adapter currently loaded (a fresh copy)."""
        params = dict(self.model.named_parameters())
        return LoRAAdapter({n: params[n] for n in self.names})

    def load(self, adapter: LoRAAdapter) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n in self.names:
                try:
                    src = adapter.get(n)
                except KeyError:
                    raise ValueError(f"LoRA adapter lacks tensor {n!r}: it belongs to another policy") from None
                if src.shape != params[n].shape:
                    raise ValueError(
                        f"LoRA adapter tensor {n!r} has shape {tuple(src.shape)}, the policy "
                        f"expects {tuple(params[n].shape)}"
                    )
                params[n].copy_(src)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(
        self,
        prompts: Sequence[str],
        adapter: LoRAAdapter,
        *,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        n: int = 1,
        seed: int | None = None,
    ) -> list[list[str]]:
        """``n`` completions per prompt (greedy when temperature is 0; else Gumbel sampling with one generator
        per row, drawn in row order from ``seed``: the same call with the same seed gives the same samples,
        and the global RNG is never touched)."""
        from transformers import LogitsProcessorList

        rows = [p for p in prompts for _ in range(n)]
        input_ids, mask = left_pad([self._encode(p) for p in rows], self.pad_id)  # (B, T) each
        width = input_ids.shape[1]
        kw: dict[str, Any] = dict(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_id,
            temperature=None,
            top_p=None,
            top_k=None,
        )
        if temperature > 0:
            base = random.Random(f"lora-sample:{seed}")
            gens = [torch.Generator().manual_seed(base.randrange(2**31)) for _ in rows]
            kw["logits_processor"] = LogitsProcessorList([GumbelSampler(gens, temperature)])
        with self.lock, torch.inference_mode():
            self.load(adapter)
            out = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device), **kw)
        texts = []
        for row in out[:, width:].tolist():
            if self.eos_id is not None and self.eos_id in row:
                row = row[: row.index(self.eos_id)]
            texts.append(self.tokenizer.decode([t for t in row if t != self.pad_id], skip_special_tokens=True).strip())
        return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]

    def logprobs(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """Summed log-probability (B,) of each completion given its prompt under the *loaded* adapter
        (differentiable when grad is enabled; callers hold ``lock``)."""
        seqs, starts = [], []
        for p, c in zip(prompts, completions):
            pi, ci = self._encode(p), self._encode(" " + c if c and not c.startswith(" ") else c)
            if self.eos_id is not None:
                ci = ci + [self.eos_id]  # the completion ends: its stop is part of what is preferred
            seqs.append(pi + ci)
            starts.append(len(pi))
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)  # (B, T) right-padded
        mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T): real tokens
        target = torch.zeros((len(seqs), width), dtype=torch.bool)  # (B, T): completion positions
        for i, (s, st) in enumerate(zip(seqs, starts)):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
            target[i, st : len(s)] = True
        ids, target = ids.to(self.device), target.to(self.device)
        logits = self.model(input_ids=ids, attention_mask=mask.to(self.device)).logits  # (B, T, V)
        logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V): token t+1 given tokens <= t
        tok = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
        return (tok * target[:, 1:]).sum(-1)  # (B,)


class LoRAComponent(Component):
    """A component whose output ``output`` is the LoRA policy's completion of ``prompt_fn(inputs)``."""

    def __init__(
        self,
        name: str,
        policy: LoRAPolicy,
        inputs: Sequence[str],
        output: str,
        prompt_fn: Callable[[Mapping[str, Any]], str],
        *,
        description: str = "",
        max_new_tokens: int = 32,
    ):
        super().__init__(
            name=name,
            inputs=list(inputs),
            outputs=[output],
            variable=Weights(policy.adapter()),
            description=description,
        )
        self.policy, self.output, self.prompt_fn, self.max_new_tokens = policy, output, prompt_fn, max_new_tokens

    def forward_batch(self, batch: Sequence[Mapping[str, Any]], variable: Weights) -> list[dict]:
        adapter = _adapter_of(variable)
        texts = self.policy.generate([self.prompt_fn(b) for b in batch], adapter, max_new_tokens=self.max_new_tokens)
        return [{self.output: t[0]} for t in texts]

    def forward(self, variable: Weights = None, **inputs) -> dict:
        return self.forward_batch([inputs], variable)[0]


def _adapter_of(variable: Weights) -> LoRAAdapter:
    if not isinstance(variable, Weights) or not isinstance(variable.module, LoRAAdapter):
        raise TypeError(f"a LoRA component's variable must be Weights(LoRAAdapter), got {variable!r}")
    return variable.module


def optimize_lora(
    component: LoRAComponent,
    xs: Sequence[Mapping[str, Any]],
    key: str | None,
    current: Weights,
    reward_model: Any,
    cfg: Any,
    rng: random.Random,
) -> tuple[list[Weights], list[float], dict]:
    """Best-of-N + DPO (module docstring); ``cfg`` is the ``WeightsConfig`` (its ``lora_*`` fields).

    Returns (candidates [incumbent, trained], their mean LRF scores, info); scoring goes through the shared
    run/score helpers so rows stay aligned with their inputs."""
    policy, incumbent = component.policy, _adapter_of(current)
    prompts = [component.prompt_fn(x) for x in xs]
    samples = policy.generate(
        prompts,
        incumbent,
        max_new_tokens=component.max_new_tokens,
        temperature=cfg.lora_temperature,
        n=cfg.lora_samples,
        seed=rng.randrange(2**31),
    )
    outs = [[{component.output: samples[i][j]} for i in range(len(xs))] for j in range(cfg.lora_samples)]
    mat = score_matrix(component, reward_model, xs, outs)  # (samples, inputs)
    chosen, rejected, ps = [], [], []
    for i in range(len(xs)):
        col = [mat[j][i] for j in range(cfg.lora_samples)]
        hi, lo = max(range(cfg.lora_samples), key=col.__getitem__), min(range(cfg.lora_samples), key=col.__getitem__)
        if col[hi] > col[lo] and samples[i][hi] != samples[i][lo]:
            ps.append(prompts[i])
            chosen.append(samples[i][hi])
            rejected.append(samples[i][lo])
    info: dict[str, Any] = {"method": "best-of-N + DPO", "pairs": len(ps), "samples": cfg.lora_samples}
    trained = current
    if ps:
        with policy.lock:
            params = dict(policy.model.named_parameters())
            with torch.no_grad():
                policy.load(incumbent)
                ref_c, ref_r = policy.logprobs(ps, chosen), policy.logprobs(ps, rejected)  # (P,) each
            opt = torch.optim.Adam([params[n] for n in policy.names], lr=cfg.lora_lr)
            losses = []
            policy.model.train()
            try:
                for _ in range(cfg.lora_steps):
                    pi_c, pi_r = policy.logprobs(ps, chosen), policy.logprobs(ps, rejected)
                    # DPO's loss is the Bradley-Terry loss of the implicit rewards beta * log(pi / ref); the
                    # formula lives in ops alone
                    loss = ops.bt_loss(cfg.lora_beta * (pi_c - ref_c), cfg.lora_beta * (pi_r - ref_r))
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    losses.append(float(loss.detach()))
            finally:
                policy.model.eval()
            trained = Weights(policy.adapter())
        info["dpo_loss"] = [losses[0], losses[-1]]
    cands = [current] + ([trained] if trained is not current else [])
    greedy = [run_batch(component, xs, override_for(key, c)) for c in cands]
    scores = [mean(row) for row in score_matrix(component, reward_model, xs, greedy)]
    return cands, scores, info
