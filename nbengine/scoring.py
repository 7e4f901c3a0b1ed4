"""``Engine.encode`` and ``Engine.score`` (SGLang's): prompt building and result shaping.

Both run ordinary requests with ``max_new_tokens=0``: ``encode`` asks for the pooled final hidden
state of the prompt (``"last"`` token or ``"mean"`` over it), ``score`` for the next-token
log-probabilities of ``label_token_ids`` after each query + item, taken from the raw logits.
"""

from __future__ import annotations

import math
from typing import Any

from .tokenizer import Tokenizer

POOLINGS = ("last", "mean")


def check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")


def embedding_output(out: dict[str, Any]) -> dict[str, Any]:
    """SGLang's encode output: ``{"embedding": [...], "meta_info": {...}}``."""
    meta = {k: v for k, v in out["meta_info"].items() if k not in ("completion_tokens", "finish_reason")}
    return {"embedding": out["embedding"], "meta_info": meta}


def score_prompts(tokenizer: Tokenizer | None, query: str | list[int], items: list, item_first: bool
                  ) -> tuple[list[str] | None, list[list[int]] | None]:
    """The query + item prompts, as texts (query and items are strings) or token ids (lists of ids)."""
    if isinstance(items, (str, bytes)) or not isinstance(items, (list, tuple)) or not items:
        raise ValueError("items must be a non-empty list of strings (or of token-id lists when query is one).")
    if isinstance(query, str):
        if not all(isinstance(it, str) for it in items):
            raise ValueError("With a text query every item must be a string.")
        if tokenizer is None:
            raise ValueError("score with text needs the tokenizer; pass token-id lists instead.")
        return [it + query if item_first else query + it for it in items], None
    if not isinstance(query, (list, tuple)) or not all(isinstance(it, (list, tuple)) for it in items):
        raise ValueError("query must be a string or a list of token ids; items the same kind.")
    return None, [list(it) + list(query) if item_first else list(query) + list(it) for it in items]


def check_labels(label_token_ids: Any, vocab_size: int) -> list[int]:
    if not isinstance(label_token_ids, (list, tuple)) or not label_token_ids:
        raise ValueError("label_token_ids must be a non-empty list of token ids.")
    bad = [t for t in label_token_ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"label_token_ids {bad[:8]} are not token ids in [0, {vocab_size - 1}].")
    return list(label_token_ids)


def label_scores(logprobs: list[float], apply_softmax: bool) -> list[float]:
    """Probabilities of the label tokens: renormalised over the labels (``apply_softmax``) or as the model gives them."""
    probs = [math.exp(lp) for lp in logprobs]
    if apply_softmax:
        total = sum(probs)
        return [p / total for p in probs]
    return probs
