"""Structured output: ``json_schema`` / ``regex`` / ``ebnf`` constraints through xgrammar.

:class:`GrammarBackend` compiles a request's constraint on the caller's thread (a malformed one
raises ``ValueError`` before anything is enqueued; compiled grammars are cached by xgrammar's
compiler, keyed by the spec) and gives each sequence its own matcher. On the engine thread
:class:`MaskJob` fills the token bitmasks of a step's constrained rows on a helper thread while
the model's forward runs, and :func:`apply_masks` applies them to the sampling logits.

The bitmask spans the model's vocabulary: ids the tokenizer does not know (padding rows of the
LM head) are never allowed; ids the model lacks are never sampled anyway.
xgrammar is an optional dependency (``pip install 'nbengine[structured]'``).
"""

from __future__ import annotations

import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .sequence import Sequence
    from .tokenizer import Tokenizer

KINDS = ("json_schema", "regex", "ebnf")


def _xgr():
    try:
        import xgrammar
    except ImportError:
        raise ValueError("Structured output (json_schema / regex / ebnf) needs xgrammar: "
                         "pip install 'nbengine[structured]'.") from None
    return xgrammar


class GrammarBackend:
    """The tokenizer's xgrammar view and compiler, built on first use (it costs a second or two)."""

    def __init__(self, tokenizer: "Tokenizer | None", vocab_size: int, stop_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_ids = list(stop_ids)
        self._compiler = None
        self._lock = threading.Lock()

    def compile(self, kind: str, spec: str) -> Any:
        """The compiled grammar of one constraint; ``ValueError`` naming the parameter when it is malformed."""
        xgr = _xgr()
        compiler = self._get_compiler(xgr)
        try:
            if kind == "json_schema":
                return compiler.compile_json_schema(spec, any_whitespace=False)
            if kind == "regex":
                return compiler.compile_regex(spec)
            return compiler.compile_grammar(spec)
        except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError with the parser's message
            detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            detail = re.sub(r"^(\[[^]]*\]\s*)?\S+\.cc:\d+:\s*", "", detail)  # xgrammar's "[time] file.cc:line:"
            detail = re.sub(r"^Check failed: .*? is false:\s*", "", detail).rstrip(". ")
            raise ValueError(f"Invalid {kind}: {detail}. Fix the {kind} sampling parameter.") from None

    def matcher(self, compiled: Any) -> Any:
        return _xgr().GrammarMatcher(compiled)

    def _get_compiler(self, xgr) -> Any:
        with self._lock:
            if self._compiler is None:
                if self.tokenizer is None:
                    raise ValueError("Structured output needs the tokenizer; create the engine without "
                                     "skip_tokenizer_init=True.")
                self._compiler = xgr.GrammarCompiler(self._tokenizer_info(xgr))
            return self._compiler

    def _tokenizer_info(self, xgr) -> Any:
        tok = self.tokenizer
        size = max(self.vocab_size, tok.vocab_size)
        if tok._hf is not None:  # a transformers tokenizer: xgrammar reads it itself
            return xgr.TokenizerInfo.from_huggingface(tok._hf, vocab_size=size, stop_token_ids=self.stop_ids)
        backend = tok._tok
        meta = xgr.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
        vocab = [""] * tok.vocab_size
        for text, i in backend.get_vocab(with_added_tokens=True).items():
            if i < len(vocab):
                vocab[i] = text
        return xgr.TokenizerInfo(vocab, meta["vocab_type"], vocab_size=size, stop_token_ids=self.stop_ids,
                                 add_prefix_space=meta["add_prefix_space"])


class MaskJob:
    """The bitmasks of one step's constrained sampling rows, filled on a helper thread (while the forward runs)."""

    _pool: ThreadPoolExecutor | None = None

    def __init__(self, seqs: list["Sequence"], vocab_size: int) -> None:
        self.row = {seq: i for i, seq in enumerate(seqs)}
        self._future: Future | None = None
        if seqs:
            if MaskJob._pool is None:
                MaskJob._pool = ThreadPoolExecutor(1, thread_name_prefix="nbengine-grammar")
            self._future = MaskJob._pool.submit(_fill, seqs, vocab_size)

    def result(self) -> tuple[torch.Tensor, dict] | None:
        """The bitmask (one row per constrained sequence) and the error of each sequence whose mask failed."""
        return self._future.result() if self._future is not None else None


def _fill(seqs: list["Sequence"], vocab_size: int) -> tuple[torch.Tensor, dict]:
    bitmask = _xgr().allocate_token_bitmask(len(seqs), vocab_size)
    errors = {}
    for i, seq in enumerate(seqs):
        try:
            seq.grammar.fill_next_token_bitmask(bitmask, i)
        except Exception as e:  # noqa: BLE001 - that request fails when it samples, not the others
            errors[seq] = e
    return bitmask, errors


def apply_masks(logits: torch.Tensor, seqs: list["Sequence"], job: MaskJob | None) -> None:
    """Mask, in place, the rows of ``logits`` (one per ``seqs``) whose sequence is constrained."""
    done = job.result() if job is not None else None
    if done is None:
        return
    bitmask, errors = done
    for s in seqs:
        if s in errors:
            raise errors[s]
    rows = [(i, job.row[s]) for i, s in enumerate(seqs) if s in job.row]
    if not rows:
        return
    full = torch.full((logits.shape[0], bitmask.shape[1]), -1, dtype=bitmask.dtype)  # -1: every token allowed
    full[[i for i, _ in rows]] = bitmask[[j for _, j in rows]]
    _xgr().apply_token_bitmask_inplace(logits, full.to(logits.device, non_blocking=True),
                                       vocab_size=logits.shape[-1], indices=[i for i, _ in rows])
