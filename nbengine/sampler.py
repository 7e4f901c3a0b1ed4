"""Vectorized sampling over the batch: penalties, bias, temperature, top-k/p, min-p, seeds.

Random draws use the exponential race (``argmax(p / E)``, ``E ~ Exp(1)``, which picks ``i``
with probability ``p_i``). A seeded request draws its noise from its own generator, so it
produces the same text whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sequence import Sequence


@dataclass
class SampleResult:
    tokens: list[int]
    logprobs: list[float] | None  # raw-model logprob of each chosen token (when requested)
    top: list[list[tuple[float, int]]] | None


class Sampler:
    def __init__(self, vocab_size: int, eos_ids: list[int], device: torch.device, seed: int) -> None:
        self.vocab_size = vocab_size
        self.eos_ids = eos_ids
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        """``logits``: ``[B, V]`` float32 (may be modified in place); one row per sequence."""
        b, v = logits.shape
        if v > self.vocab_size:  # padded LM heads
            logits = logits[:, : self.vocab_size]
        self._apply_bias_and_penalties(logits, seqs)

        want_lp = [s.logprob.return_logprob for s in seqs]
        logprobs = torch.log_softmax(logits, dim=-1) if any(want_lp) else None

        greedy = [s.params.is_greedy for s in seqs]
        if all(greedy):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._sample(logits, seqs, greedy)
        token_list = tokens.tolist()

        lp_out = top_out = None
        if logprobs is not None:
            lp_out = logprobs.gather(1, tokens.view(-1, 1)).view(-1).tolist()
            k = max(s.logprob.top_logprobs_num for s in seqs)
            if k > 0:
                vals, idx = logprobs.topk(k, dim=-1)
                vals, idx = vals.tolist(), idx.tolist()
                top_out = [list(zip(vals[i][: s.logprob.top_logprobs_num], idx[i][: s.logprob.top_logprobs_num]))
                           for i, s in enumerate(seqs)]
        return SampleResult(token_list, lp_out, top_out)

    # ------------------------------------------------------------------ steps
    def _apply_bias_and_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        for i, s in enumerate(seqs):
            p = s.params
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias), device=logits.device)
                logits[i].index_add_(0, ids, torch.tensor(list(p.logit_bias.values()), device=logits.device))
            if len(s.output_ids) < p.min_new_tokens:
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else self.eos_ids)
                if banned:
                    logits[i, banned] = float("-inf")
        rows = [i for i, s in enumerate(seqs) if s.params.has_penalties]
        if not rows:
            return
        v = logits.shape[1]
        counts = torch.zeros(len(rows), v, device=logits.device)
        seen = torch.zeros(len(rows), v, dtype=torch.bool, device=logits.device)
        for j, i in enumerate(rows):
            s = seqs[i]
            if s.output_ids:
                out = torch.tensor(s.output_ids, device=logits.device)
                counts[j].index_add_(0, out, torch.ones(len(s.output_ids), device=logits.device))
            seen[j, torch.tensor(s.prompt_ids + s.output_ids, device=logits.device)] = True
        idx = torch.tensor(rows, device=logits.device)
        sub = logits.index_select(0, idx)
        rep = torch.tensor([seqs[i].params.repetition_penalty for i in rows], device=logits.device)[:, None]
        freq = torch.tensor([seqs[i].params.frequency_penalty for i in rows], device=logits.device)[:, None]
        pres = torch.tensor([seqs[i].params.presence_penalty for i in rows], device=logits.device)[:, None]
        # repetition (HF/vLLM): on prompt + output tokens; frequency/presence (OpenAI): output only
        penalized = torch.where(sub > 0, sub / rep, sub * rep)
        sub = torch.where(seen, penalized, sub)
        sub = sub - freq * counts - pres * (counts > 0).float()
        logits.index_copy_(0, idx, sub)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], greedy: list[bool]) -> torch.Tensor:
        dev = logits.device
        temp = torch.tensor([1.0 if g else s.params.temperature for s, g in zip(seqs, greedy)], device=dev)
        probs = torch.softmax(logits / temp[:, None], dim=-1)
        v = probs.shape[1]
        top_k = [min(s.params.effective_top_k, v) for s in seqs]
        top_p = [s.params.top_p for s in seqs]
        if any(k < v for k in top_k) or any(p < 1.0 for p in top_p):
            sorted_p, order = probs.sort(dim=-1, descending=True)
            ranks = torch.arange(v, device=dev)[None, :]
            drop = ranks >= torch.tensor(top_k, device=dev)[:, None]
            before = sorted_p.cumsum(dim=-1) - sorted_p  # mass strictly above each candidate
            drop |= before > torch.tensor(top_p, device=dev)[:, None]
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(1, order, sorted_p)
        min_p = [s.params.min_p for s in seqs]
        if any(m > 0 for m in min_p):
            thresh = probs.max(dim=-1, keepdim=True).values * torch.tensor(min_p, device=dev)[:, None]
            probs = probs.masked_fill(probs < thresh, 0.0)

        noise = torch.empty_like(probs)
        unseeded = [i for i, s in enumerate(seqs) if s.generator is None]
        if len(unseeded) == len(seqs):
            noise.exponential_(generator=self.generator)
        else:
            for i, s in enumerate(seqs):
                noise[i].exponential_(generator=s.generator if s.generator is not None else self.generator)
        sampled = (probs / noise).argmax(dim=-1)
        if any(greedy):
            g = torch.tensor(greedy, device=dev)
            sampled = torch.where(g, logits.argmax(dim=-1), sampled)
        return sampled
