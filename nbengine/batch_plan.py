"""BatchPlan: one step's inputs as host lists, built from the scheduled items.

The runner turns a plan into device tensors in one of two ways: :meth:`BatchPlan.to_tensors`
(the torch path: a few small tensors) or ``BatchBuffers.load`` (the Triton path: one copy from
pinned memory into a static device buffer). Building the plan touches no device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .forward_batch import ForwardBatch
from .scheduler import ScheduledSeq


@dataclass
class BatchPlan:
    page_size: int
    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)  # KV slot each new token is written to
    seq_lens: list[int] = field(default_factory=list)
    q_lens: list[int] = field(default_factory=list)
    q_starts: list[int] = field(default_factory=list)  # [B + 1]
    tables: list[list[int]] = field(default_factory=list)  # each sequence's pages (not copied)
    logits_rows: list[int] = field(default_factory=list)
    # per item: its row in the logits if it samples, else -1; and (first logits row, count, first
    # prompt position) of its input-logprob rows
    sample_rows: list[int] = field(default_factory=list)
    input_rows: list[tuple[int, int, int]] = field(default_factory=list)
    # rows whose final hidden states requests asked for, and per item (first row in them, count, first position)
    hidden_rows: list[int] = field(default_factory=list)
    hidden_at: list[tuple[int, int, int]] = field(default_factory=list)
    num_decodes: int = 0
    has_pending: bool = False  # some ids are placeholders for tokens still being sampled (overlap)
    # vision models: (first row, [3, n] M-RoPE positions) of chunks holding image tokens, and
    # (MultimodalInputs, first row, first embedding, count) of each run of image tokens
    mrope: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    images: list[tuple[object, int, int, int]] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens)

    @property
    def is_plain_decode(self) -> bool:
        """One new token per sequence, each sampled, no other logits, no hidden states asked for: a CUDA
        graph can run it (a step that returns hidden states runs eagerly)."""
        b = len(self.seq_lens)
        return self.num_decodes == b and len(self.logits_rows) == b and not self.hidden_rows

    @classmethod
    def build(cls, items: list[ScheduledSeq], page_size: int) -> "BatchPlan":
        """Items must be ordered decodes first (one new token each)."""
        plan = cls(page_size)
        n_logits = 0
        ids, positions, slots, q_starts, q_lens = plan.ids, plan.positions, plan.slots, plan.q_starts, plan.q_lens
        for it in items:
            seq, start, n = it.seq, it.start, it.num_tokens
            row0 = len(ids)
            q_starts.append(row0)
            p, n_out = len(seq.prompt_ids), len(seq.output_ids)
            if (n == 1 and start + 1 == p + n_out + seq.num_pending and not seq.logprob.return_logprob
                    and seq.mm is None and seq.hidden is None):
                # the common case, a decode (or a one-token last chunk), without the general path's lists
                if seq.num_pending and start == p + n_out:
                    ids.append(-(seq.pending_row + 1))
                    plan.has_pending = True
                else:
                    ids.append(seq.prompt_ids[start] if start < p else seq.output_ids[start - p])
                positions.append(start)
                slots.append(seq.pages[start // page_size] * page_size + start % page_size)
                q_lens.append(1)
                plan.seq_lens.append(start + 1)
                plan.tables.append(seq.pages)
                plan.input_rows.append((n_logits, 0, 0))
                plan.hidden_at.append((0, 0, 0))
                plan.logits_rows.append(row0)
                plan.sample_rows.append(n_logits)  # the sequence's last token: it samples
                n_logits += 1
                continue
            ids.extend(seq.tokens(start, start + n))
            plan.has_pending |= seq.num_pending > 0
            if seq.mm is None:
                positions.extend(range(start, start + n))
            else:
                plan.add_multimodal(seq.mm, row0, start, n)
            _extend_slots(slots, seq.pages, start, n, page_size)
            q_lens.append(n)
            plan.seq_lens.append(start + n)
            plan.tables.append(seq.pages)
            # prompt positions whose logits score the next prompt token (input logprobs)
            lo, hi = _input_logprob_positions(it)
            plan.input_rows.append((n_logits, hi - lo, lo))
            plan.logits_rows.extend(range(row0 + lo - start, row0 + hi - start))
            n_logits += hi - lo
            if seq.hidden is not None:
                h_lo, h_hi = seq.hidden.rows(start, n)
                plan.hidden_at.append((len(plan.hidden_rows), h_hi - h_lo, h_lo))
                plan.hidden_rows.extend(range(row0 + h_lo - start, row0 + h_hi - start))
            else:
                plan.hidden_at.append((0, 0, 0))
            if it.samples:
                plan.logits_rows.append(row0 + n - 1)
                plan.sample_rows.append(n_logits)
                n_logits += 1
            else:
                plan.sample_rows.append(-1)
        plan.q_starts.append(len(plan.ids))
        plan.num_decodes = sum(1 for n in plan.q_lens if n == 1)
        return plan

    def add_multimodal(self, mm, row0: int, start: int, n: int) -> None:
        """Positions (M-RoPE) and image-token runs of ``n`` tokens from ``start`` of a request with images."""
        flat, rows = mm.positions(start, n)
        self.positions.extend(flat)
        if rows is not None:
            self.mrope.append((row0, rows))
        self.images.extend((mm, row0 + off, emb, count) for off, emb, count in mm.pieces(start, n))

    def attach_multimodal(self, fb: ForwardBatch, device: torch.device) -> ForwardBatch:
        """Put the step's M-RoPE positions and image embeddings (already encoded) on ``fb``."""
        if self.mrope:
            rows = torch.tensor(self.positions, dtype=torch.long).expand(3, -1).clone()
            for row0, r in self.mrope:
                rows[:, row0:row0 + r.shape[1]] = r
            fb.mrope_positions = rows.to(device, non_blocking=True)
        if self.images:
            fb.mm_rows = torch.cat([torch.arange(r, r + c) for _, r, _, c in self.images]).to(device)
            fb.mm_embeds = torch.cat([mm.embeds[e:e + c] for mm, _, e, c in self.images])
        return fb

    def to_tensors(self, device: torch.device, dtype: torch.dtype) -> ForwardBatch:
        """The torch path's ForwardBatch: int64 tensors, the page table padded with page 0."""
        width = max(len(t) for t in self.tables)
        page_table = torch.tensor([t + [0] * (width - len(t)) for t in self.tables], dtype=torch.int32, device=device)
        return ForwardBatch(
            input_ids=torch.tensor(self.ids, dtype=torch.long, device=device),
            positions=torch.tensor(self.positions, dtype=torch.long, device=device),
            out_slots=torch.tensor(self.slots, dtype=torch.long, device=device),
            page_table=page_table,
            seq_lens=torch.tensor(self.seq_lens, dtype=torch.long, device=device),
            q_starts=torch.tensor(self.q_starts, dtype=torch.long, device=device),
            logits_rows=torch.tensor(self.logits_rows, dtype=torch.long, device=device),
            page_size=self.page_size, num_decodes=self.num_decodes, dtype=dtype,
            seq_lens_host=self.seq_lens, q_lens_host=self.q_lens, q_starts_host=self.q_starts[:-1])


def _extend_slots(out: list[int], pages: list[int], start: int, n: int, page_size: int) -> None:
    """Append the KV slots of positions ``start .. start+n-1``, a page run at a time."""
    p, end = start, start + n
    while p < end:
        page, off = divmod(p, page_size)
        take = min(page_size - off, end - p)
        base = pages[page] * page_size + off
        out.extend(range(base, base + take))
        p += take


def _input_logprob_positions(it: ScheduledSeq) -> tuple[int, int]:
    """Positions ``p`` in this chunk whose logits give the logprob of prompt token ``p + 1``.

    Only for requests asking for logprobs, only once (not again after a preemption), and only
    for prompt tokens from ``logprob_start_len`` on; the final prompt position is the sampling row.
    """
    seq = it.seq
    if not seq.logprob.return_logprob or seq.output_ids:
        return 0, 0
    first = max(seq.logprob.logprob_start_len, 1) - 1  # token 0 has no logprob
    lo = max(it.start, first, seq.input_lp_pos)
    hi = min(it.start + it.num_tokens, len(seq.prompt_ids) - 1)
    return (lo, hi) if hi > lo else (0, 0)
