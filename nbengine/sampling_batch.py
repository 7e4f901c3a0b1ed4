"""SamplingBatch: one batch's sampling parameters as device tensors, rebuilt only when the batch changes.

Building a tensor from a Python list on a CUDA device (``torch.tensor(xs, device=...)``) copies
from pageable memory and waits for the stream, so a sampler that did that every step would
stall the host on the GPU. Here the parameters of the batch (temperature, greedy flags, top-k /
top-p / min-p, logit bias) are packed into one pinned host tensor and sent with one
non-blocking copy, and the result is kept while the same sequences sample in the same order —
in a steady decode that is most steps. The host-side facts the sampler branches on (is every
row greedy? which rows filter?) are plain Python values computed at the same time.
"""

from __future__ import annotations

import weakref

import torch

from .sequence import Sequence


class SamplingBatch:
    def __init__(self, seqs: list[Sequence], vocab_size: int, device: torch.device) -> None:
        # weak references: the cache must not keep finished requests (and their tensors) alive, and a dead
        # reference never matches, so a recycled object id can't pass for the old sequence
        self._refs = [weakref.ref(s) for s in seqs]
        b, v = len(seqs), vocab_size
        params = [s.params for s in seqs]
        self.greedy = [p.is_greedy for p in params]
        self.all_greedy = all(self.greedy)
        self.any_greedy = any(self.greedy)
        top_k = [min(p.effective_top_k, v) for p in params]
        # rows that filter by top-k / top-p (greedy rows never do: they take the argmax)
        self.filter_rows = [i for i, p in enumerate(params)
                            if not self.greedy[i] and (top_k[i] < v or p.top_p < 1.0)]
        self.filter_needs_sort = any(params[i].top_p < 1.0 for i in self.filter_rows)
        self.filter_k_max = max((top_k[i] for i in self.filter_rows), default=0)
        self.uses_min_p = any(p.min_p > 0 for p in params)
        self.seeded = [i for i, s in enumerate(seqs) if not self.greedy[i] and s.generator is not None]
        self.shared = [i for i, s in enumerate(seqs) if not self.greedy[i] and s.generator is None]
        bias = [(i, int(t), float(x)) for i, p in enumerate(params) for t, x in (p.logit_bias or {}).items()]
        nf, nb = len(self.filter_rows), len(bias)

        # one float32 host tensor, one copy: temps[b] min_p[b] greedy[b] filter_rows[nf] top_k[nf] top_p[nf]
        # shared_rows[ns] bias_rows[nb] bias_tokens[nb] bias_values[nb] (ids below 2**24 are exact in float32)
        ns = len(self.shared)
        host = torch.empty(3 * b + 3 * nf + ns + 3 * nb, dtype=torch.float32,
                           pin_memory=device.type == "cuda")
        at = 0

        def put(values: list[float]) -> slice:
            nonlocal at
            host[at:at + len(values)] = torch.tensor(values, dtype=torch.float32)
            at += len(values)
            return slice(at - len(values), at)

        s_temp = put([1.0 if g else p.temperature for p, g in zip(params, self.greedy)])
        s_minp = put([p.min_p for p in params])
        s_greedy = put([float(g) for g in self.greedy])
        s_frows = put([float(i) for i in self.filter_rows])
        s_topk = put([float(top_k[i]) for i in self.filter_rows])
        s_topp = put([params[i].top_p for i in self.filter_rows])
        s_shared = put([float(i) for i in self.shared])
        s_brow = put([float(i) for i, _, _ in bias])
        s_btok = put([float(t) for _, t, _ in bias])
        s_bval = put([x for _, _, x in bias])
        dev = host.to(device, non_blocking=True)
        self.temperature = dev[s_temp].view(-1, 1)
        self.min_p = dev[s_minp].view(-1, 1)
        self.greedy_mask = dev[s_greedy] > 0.5
        self.filter_idx = dev[s_frows].long()
        self.top_k = dev[s_topk].long().view(-1, 1)
        self.top_p = dev[s_topp].view(-1, 1)
        self.shared_idx = dev[s_shared].long()
        self.bias_rows, self.bias_tokens, self.bias_values = dev[s_brow].long(), dev[s_btok].long(), dev[s_bval]
        self.has_bias = nb > 0

    def matches(self, seqs: list[Sequence]) -> bool:
        """The same sequences in the same order (their parameters never change while they run)."""
        return len(seqs) == len(self._refs) and all(r() is s for r, s in zip(self._refs, seqs))
