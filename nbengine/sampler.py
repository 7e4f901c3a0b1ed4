"""Vectorized sampling over the batch: penalties, bias, temperature, top-k/p, min-p, seeds.

Random draws use the exponential race (``argmax(p / E)``, ``E ~ Exp(1)``, which picks ``i``
with probability ``p_i``). A seeded request draws its noise from its own generator, so it
produces the same text whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling_batch import SamplingBatch
from .sequence import Sequence


@dataclass
class SampleResult:
    tokens: list[int]
    logprobs: list[float | None] | None  # raw-model logprob of each chosen token; None for rows that did not ask
    top: list[list[tuple[float, int]] | None] | None


class PenaltyCounts:
    """One request's running penalty state, updated with each new token instead of rebuilt each step.

    ``counts[t]``: how often ``t`` is in the output (frequency / presence penalties);
    ``seen[t]``: whether ``t`` is in the prompt or the output (repetition penalty).
    Built once from prompt + output (also right after a preemption, which keeps the output).
    """

    def __init__(self, seq: Sequence, vocab_size: int, device: torch.device) -> None:
        self.counts = torch.zeros(vocab_size, device=device)
        self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        if seq.output_ids:
            out = torch.tensor(seq.output_ids, device=device)
            self.counts.index_add_(0, out, torch.ones(len(seq.output_ids), device=device))
            self.seen[out] = True
        self.seen[torch.tensor(seq.prompt_ids, device=device)] = True

    def add(self, token: int) -> None:
        self.counts[token] += 1
        self.seen[token] = True


class Sampler:
    def __init__(self, vocab_size: int, eos_ids: list[int], device: torch.device, seed: int) -> None:
        self.vocab_size = vocab_size
        self.eos_ids = eos_ids
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self._batch: SamplingBatch | None = None  # the latest batch's parameters on the device

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        """``logits``: ``[B, V]`` float32 (may be modified in place); one row per sequence."""
        tokens = self.sample(logits, seqs)
        token_list = tokens.tolist()
        lp_out, top_out = self._logprobs(logits[:, : self.vocab_size], tokens, seqs)
        self.record(seqs, token_list)
        return SampleResult(token_list, lp_out, top_out)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """The sampled ids ``[B]`` as a device tensor. Without penalties and ``min_new_tokens`` (whose
        inputs change every step) the host never waits on the device here: the batch's parameters are
        device tensors, rebuilt only when the batch changes."""
        b, v = logits.shape
        if v > self.vocab_size:  # padded LM heads
            logits = logits[:, : self.vocab_size]
        params = self._params(seqs)
        self._apply_bias_and_penalties(logits, seqs, params)
        if params.all_greedy:
            return logits.argmax(dim=-1)
        return self._sample(logits, seqs, params)

    def record(self, seqs: list[Sequence], tokens: list[int]) -> None:
        """The running penalty counts take each sampled token."""
        for s, t in zip(seqs, tokens):
            if s.penalties is not None:
                s.penalties.add(t)

    def _params(self, seqs: list[Sequence]) -> SamplingBatch:
        if self._batch is None or not self._batch.matches(seqs):
            self._batch = SamplingBatch(seqs, self.vocab_size, self.device)
        return self._batch

    # ------------------------------------------------------------------ steps
    def _logprobs(self, logits: torch.Tensor, tokens: torch.Tensor, seqs: list[Sequence]
                  ) -> tuple[list[float | None] | None, list[list[tuple[float, int]] | None] | None]:
        """Logprobs of the chosen tokens (and the top ones), only for the rows that asked for them."""
        rows = [i for i, s in enumerate(seqs) if s.logprob.return_logprob]
        if not rows:
            return None, None
        idx = torch.tensor(rows, device=logits.device)
        logprobs = torch.log_softmax(logits.index_select(0, idx), dim=-1)
        chosen = logprobs.gather(1, tokens.index_select(0, idx).view(-1, 1)).view(-1).tolist()
        lp_out: list[float | None] = [None] * len(seqs)
        top_out: list[list[tuple[float, int]] | None] = [None] * len(seqs)
        k = max(seqs[i].logprob.top_logprobs_num for i in rows)
        if k > 0:
            vals, ids = logprobs.topk(k, dim=-1)
            vals, ids = vals.tolist(), ids.tolist()
        for j, i in enumerate(rows):
            lp_out[i] = chosen[j]
            n = seqs[i].logprob.top_logprobs_num
            if n > 0:
                top_out[i] = list(zip(vals[j][:n], ids[j][:n]))
        return lp_out, top_out

    def _apply_bias_and_penalties(self, logits: torch.Tensor, seqs: list[Sequence], params: SamplingBatch) -> None:
        if params.has_bias:
            logits.index_put_((params.bias_rows, params.bias_tokens), params.bias_values, accumulate=True)
        for i, s in enumerate(seqs):
            p = s.params
            if p.min_new_tokens and len(s.output_ids) < p.min_new_tokens:
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else self.eos_ids)
                if banned:
                    logits[i, banned] = float("-inf")
        rows = [i for i, s in enumerate(seqs) if s.params.has_penalties]
        if not rows:
            return
        for i in rows:
            if seqs[i].penalties is None:
                seqs[i].penalties = PenaltyCounts(seqs[i], logits.shape[1], logits.device)
        counts = torch.stack([seqs[i].penalties.counts for i in rows])
        seen = torch.stack([seqs[i].penalties.seen for i in rows])
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

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], params: SamplingBatch) -> torch.Tensor:
        """Draw one token per row; rows that are greedy come out as the argmax. Filtering (top-k/p) and
        noise only touch the rows that need them."""
        dev = logits.device
        probs = torch.softmax(logits / params.temperature, dim=-1)
        v = probs.shape[1]
        if params.filter_rows:
            idx = params.filter_idx
            sub = probs.index_select(0, idx)
            # top-k alone needs only the k best; top-p needs the whole sorted row
            k_max = v if params.filter_needs_sort else params.filter_k_max
            sorted_p, order = sub.topk(k_max, dim=-1) if k_max < v else sub.sort(dim=-1, descending=True)
            ranks = torch.arange(sorted_p.shape[1], device=dev)[None, :]
            drop = ranks >= params.top_k
            before = sorted_p.cumsum(dim=-1) - sorted_p  # mass strictly above each candidate
            drop |= before > params.top_p
            kept = torch.zeros_like(sub).scatter_(1, order, sorted_p.masked_fill(drop, 0.0))
            probs.index_copy_(0, idx, kept)
        if params.uses_min_p:
            thresh = probs.max(dim=-1, keepdim=True).values * params.min_p
            probs = probs.masked_fill(probs < thresh, 0.0)

        noise = torch.ones_like(probs)
        if len(params.shared) == len(seqs):
            noise.exponential_(generator=self.generator)
        elif params.shared:
            noise.index_copy_(0, params.shared_idx,
                              torch.empty(len(params.shared), v, device=dev).exponential_(generator=self.generator))
        for i in params.seeded:  # a seeded request draws from its own generator: same text in any batch
            noise[i].exponential_(generator=seqs[i].generator)
        sampled = (probs / noise).argmax(dim=-1)
        if params.any_greedy:
            sampled = torch.where(params.greedy_mask, logits.argmax(dim=-1), sampled)
        return sampled


def add_input_logprobs(seq: Sequence, lo: int, logits: torch.Tensor) -> None:
    """Record on ``seq`` its input logprobs: the logits of prompt positions ``lo, lo+1, ...``
    score prompt tokens ``lo+1, lo+2, ...``."""
    lps = torch.log_softmax(logits.float(), dim=-1)
    targets = torch.tensor(seq.prompt_ids[lo + 1 : lo + 1 + logits.shape[0]], device=lps.device)
    chosen = lps.gather(1, targets.view(-1, 1)).view(-1).tolist()
    k = seq.logprob.top_logprobs_num
    tops = lps.topk(k, dim=-1) if k > 0 else None
    for j, tok in enumerate(targets.tolist()):
        seq.input_token_logprobs.append((chosen[j], tok, None))
        if k > 0:
            seq.input_top_logprobs.append([(v, t, None) for v, t in zip(tops.values[j].tolist(), tops.indices[j].tolist())])
    seq.input_lp_pos = lo + logits.shape[0]
