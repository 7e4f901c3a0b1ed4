"""One request's state as the engine thread sees it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class LogprobRequest:
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_text: bool = False  # fill the token text slot of logprob tuples (return_text_in_logprobs)


@dataclass(eq=False)
class Sequence:
    """Prompt + generated tokens, KV pages and the output sink of one request.

    ``num_computed`` counts the tokens whose K/V are in the cache; the tokens still to run
    are ``tokens(num_computed, num_tokens)``. Preemption resets ``num_computed`` to 0 and drops the
    sequence's page references. ``pages`` may be shared with other sequences (prefix cache, forks).
    """

    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[dict[str, Any]], None]
    index: int | None = None  # position in a batch request, reported as "index" when streaming
    stream: bool = False
    logprob: LogprobRequest = field(default_factory=LogprobRequest)
    output_ids: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: SeqStatus = SeqStatus.WAITING
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None  # perf_counter when the first output token was sampled
    generator: torch.Generator | None = None
    penalties: Any = None  # the sampler's running PenaltyCounts, built on first use
    finish_reason: dict[str, Any] | None = None
    num_preemptions: int = 0
    # logprob outputs (filled only when requested)
    input_token_logprobs: list[tuple] = field(default_factory=list)
    input_top_logprobs: list[Any] = field(default_factory=list)
    output_token_logprobs: list[tuple] = field(default_factory=list)
    output_top_logprobs: list[Any] = field(default_factory=list)
    # detokenizer state lives in a separate object owned by the engine core
    detok: Any = None
    last_emitted_tokens: int = 0
    last_emitted_text: int = 0
    last_emitted_hidden: int = 0
    input_lp_pos: int = 0  # next prompt position whose input logprob is still to compute
    # overlap scheduling: tokens sampled on the device but not read yet (0-2), and the row of the newest
    # one in its step's sampled ids; a step scheduled meanwhile feeds it as the placeholder ``-(row + 1)``
    num_pending: int = 0
    pending_row: int = -1
    # prefix sharing (scheduler.py / prefix_cache.py)
    cached_tokens: int = 0  # prompt tokens whose K/V were reused at admission (meta_info["cached_tokens"])
    page_uids: list[int] = field(default_factory=list)  # prefix-cache node of each registered full page
    fork_of: "Sequence | None" = None  # n > 1: the sample whose computed prompt this one forks
    hidden: Any = None  # HiddenStates (hidden_states.py) when hidden states or an embedding are asked for
    # logits-side state (logits_pipeline.py): grammar matcher, custom processor, score labels
    grammar: Any = None
    logit_processor: Any = None
    label_ids: list[int] | None = None
    label_logprobs: list[float] | None = None
    mm: Any = None  # MultimodalInputs of a request with images (its image embeddings are cached on it)

    def release_images(self) -> None:
        """Drop the cached image embeddings (preemption, abort, end); they are recomputed if needed again."""
        if self.mm is not None:
            self.mm.embeds = None

    def tokens(self, start: int, end: int) -> list[int]:
        """Token ids ``start:end`` of prompt + output, without copying the whole sequence."""
        if self.num_pending and end > len(self.prompt_ids) + len(self.output_ids):
            # the newest token is still on the device: the runner fills the placeholder in there
            head = self.tokens(start, end - 1) if end - 1 > start else []
            return head + [-(self.pending_row + 1)]
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        if start >= p:
            return self.output_ids[start - p : end - p]
        return self.prompt_ids[start:] + self.output_ids[: end - p]

    def cacheable_tokens(self) -> int:
        """How many leading tokens have K/V computed under ids known on the host: pages within them may be
        registered in the prefix cache (not a token still on the device, under overlap)."""
        return min(self.num_computed, len(self.prompt_ids) + len(self.output_ids))

    def key_tokens(self, start: int, end: int) -> list:
        """What the prefix cache knows tokens ``start:end`` by: their ids, except that an image token is
        ``(its image's pixel hash, its offset in the image)`` — image tokens share one id whatever the image,
        so the same prompt with another image never matches, and the same image is found again."""
        ids = self.tokens(start, end)
        mm = self.mm
        if mm is None or not mm.spans:
            return ids
        for (first, count), digest in zip(mm.spans, mm.hashes):
            for pos in range(max(first, start), min(first + count, end)):
                ids[pos - start] = (digest, pos - first)
        return ids

    def reuse_limit(self) -> int:
        """How many leading tokens may take their K/V from the prefix cache: all but the last one (its logits
        are needed), and none whose input logprobs or hidden states this request still has to compute."""
        limit = self.num_tokens - 1
        lp = self.logprob
        if lp.return_logprob and not self.output_ids:
            limit = min(limit, max(max(lp.logprob_start_len, 1) - 1, self.input_lp_pos))
        if self.hidden is not None:
            limit = min(limit, self.hidden.first_needed)
        return limit

    def copy_prompt_results(self, leader: "Sequence") -> None:
        """A forked sample takes what its leader computed over their shared prompt: input logprobs, hidden states."""
        if self.logprob.return_logprob:
            self.input_token_logprobs = list(leader.input_token_logprobs)
            self.input_top_logprobs = list(leader.input_top_logprobs)
            self.input_lp_pos = leader.input_lp_pos
        if self.hidden is not None and leader.hidden is not None:
            self.hidden.fork(leader.hidden, self.num_computed)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids) + self.num_pending

    @property
    def final_token_pending(self) -> bool:
        """The token on the device is the last one ``max_new_tokens`` allows: nothing more to schedule."""
        n = self.params.max_new_tokens
        return self.num_pending > 0 and n is not None and len(self.output_ids) + self.num_pending >= n

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def is_prefilling(self) -> bool:
        """Still running the prompt (or a recompute after preemption)."""
        return self.num_uncomputed > 1

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
