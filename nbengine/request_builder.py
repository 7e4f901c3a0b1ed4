"""Turning ``generate(...)`` arguments into validated request specs, on the caller's thread.

Everything a user can get wrong is checked here, before anything reaches the engine thread,
so a bad call raises and leaves the engine untouched.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Mapping

from .sampling_params import SamplingParams
from .sequence import LogprobRequest
from .tokenizer import Tokenizer

logger = logging.getLogger("nbengine")


@dataclass
class RequestSpec:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    logprob: LogprobRequest
    hidden_states: bool = False  # return the final hidden states (meta_info["hidden_states"])
    grammar: Any = None  # the compiled json_schema / regex / ebnf constraint (xgrammar), if any
    logit_processor: Any = None  # the loaded custom logit processor, if any
    pooling: str | None = None  # encode(): "last" / "mean" pooled final hidden state of the prompt
    label_ids: list[int] | None = None  # score(): report these tokens' next-token logprobs
    fork_of: int | None = None  # n > 1: the index of the prompt's first sample, whose computed prompt this one shares
    mm: Any = None  # MultimodalInputs of a request with images


@dataclass
class Limits:
    """What the engine allows: the numbers every request is checked against."""

    vocab_size: int
    context_length: int
    kv_capacity: int  # tokens the KV pool holds
    allow_auto_truncate: bool
    skip_tokenizer_init: bool
    enable_return_hidden_states: bool
    sampling_defaults: dict[str, Any] = dataclasses.field(default_factory=dict)  # under each request's params
    grammar: Any = None  # GrammarBackend (grammar.py): compiles json_schema / regex / ebnf
    enable_custom_logit_processor: bool = False

    @property
    def max_request_tokens(self) -> int:
        """Prompt + output of one request: the context length, or less when the KV pool is smaller
        (a request must be able to finish running alone)."""
        return min(self.context_length, self.kv_capacity)

    def describe_limit(self) -> str:
        if self.kv_capacity < self.context_length:
            return (f"the KV pool's capacity of {self.kv_capacity} tokens (max_total_tokens; the model's context "
                    f"length is {self.context_length})")
        return f"the model's maximum context length of {self.context_length} tokens"


def build_requests(
    tokenizer: Tokenizer | None,
    limits: Limits,
    prompt: str | list[str] | None,
    sampling_params: dict | list[dict] | None,
    input_ids: list[int] | list[list[int]] | None,
    image_data: Any,
    return_logprob: bool | list[bool],
    logprob_start_len: int | list[int] | None,
    top_logprobs_num: int | list[int] | None,
    return_hidden_states: bool | list[bool],
    rid: str | list[str] | None,
    return_text_in_logprobs: bool = False,
    custom_logit_processor: str | list[str | None] | None = None,
    processor: Any = None,
) -> tuple[list[RequestSpec], bool]:
    """Returns the specs (prompt-major, ``i * n + j``) and whether the call was a single prompt.

    ``processor``: the model's multimodal input processor (None for a text-only model)."""
    if image_data is not None and processor is None:
        raise ValueError("image_data was given, but this model has no vision encoder; pass text or input_ids only "
                         "(or load a vision-language model such as Qwen2.5-VL).")
    if _any(return_hidden_states, "return_hidden_states") and not limits.enable_return_hidden_states:
        raise ValueError("The engine is not configured to return the hidden states. "
                         "Create it with Engine(..., enable_return_hidden_states=True).")
    if not isinstance(return_text_in_logprobs, bool):
        raise TypeError(f"return_text_in_logprobs must be True or False, got {return_text_in_logprobs!r}.")
    if return_text_in_logprobs and tokenizer is None:
        raise ValueError("return_text_in_logprobs needs the tokenizer; create the engine without "
                         "skip_tokenizer_init=True.")
    if prompt is None and input_ids is None:
        raise ValueError("Either text, input_ids or input_embeds should be provided.")
    if prompt is not None and input_ids is not None:
        raise ValueError("Pass either prompt or input_ids, not both.")

    if prompt is not None:
        if limits.skip_tokenizer_init or tokenizer is None:
            raise ValueError("This engine was created with skip_tokenizer_init=True; pass input_ids instead of prompt.")
        single = isinstance(prompt, str)
        if not single and not isinstance(prompt, (list, tuple)):
            raise TypeError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}.")
        prompts = [prompt] if single else list(prompt)
        ids_list = [_encode(tokenizer, p, i if not single else None) for i, p in enumerate(prompts)]
    else:
        ids_list, single = _parse_input_ids(input_ids)
    if not ids_list:
        raise ValueError("The prompt list is empty.")
    for i, ids in enumerate(ids_list):
        if not ids:
            raise ValueError("input_ids cannot be empty." if len(ids_list) == 1 else f"input_ids {i} cannot be empty.")
        bad = [t for t in ids if t < 0 or t >= limits.vocab_size]
        if bad:
            raise ValueError(f"The input_ids {bad[:8]} contain values outside the vocab size ({limits.vocab_size}): "
                             f"token ids must be in [0, {limits.vocab_size - 1}].")

    num = len(ids_list)
    mms: list[Any] = [None] * num
    if processor is not None:
        images = _images_per_prompt(image_data, num, single)
        for i in range(num):
            where = "the prompt" if single else f"prompt {i}"
            ids_list[i], mms[i] = processor.process(ids_list[i], images[i], where)
    params = _per_prompt(sampling_params, num, "sampling_params")
    sps = [SamplingParams.from_dict(_with_defaults(p, limits.sampling_defaults)) for p in params]
    grammars = []
    for sp in sps:
        sp.verify(vocab_size=limits.vocab_size)
        grammars.append(_compile_constraint(sp, limits))
    n = sps[0].n
    if any(sp.n != n for sp in sps):
        raise ValueError("With a list of sampling_params, every n must be equal.")
    if n > 1:
        single = False

    want_lp = [_flag(v, "return_logprob") for v in _per_prompt(return_logprob, num, "return_logprob")]
    starts = [_optional_int(v, "logprob_start_len") for v in _per_prompt(logprob_start_len, num, "logprob_start_len")]
    tops = [_optional_int(v, "top_logprobs_num") for v in _per_prompt(top_logprobs_num, num, "top_logprobs_num")]
    hidden = [_flag(v, "return_hidden_states") for v in
              _per_prompt(return_hidden_states, num, "return_hidden_states")]
    procs = _load_processors(custom_logit_processor, num, limits)
    for sp, proc in zip(sps, procs):
        if sp.custom_params is not None and proc is None:
            raise ValueError("custom_params is only read by a custom logit processor: pass custom_logit_processor "
                             "too, or drop custom_params.")
    total = num * n
    rids = _rids(rid, total)

    specs: list[RequestSpec] = []
    for i, (ids, sp) in enumerate(zip(ids_list, sps)):
        ids, sp = _fit_context(ids, sp, limits, i if num > 1 else None)
        if mms[i] is not None and len(ids) < mms[i].end:
            raise ValueError(f"The input{'' if num == 1 else f' (prompt {i})'} was truncated into its image tokens; "
                             "use smaller or fewer images, or a shorter prompt.")
        start = starts[i]
        if start is None or start < 0:
            start = len(ids) - 1
        if start >= len(ids):
            raise ValueError(f"logprob_start_len ({start}) must be less than the prompt length ({len(ids)}).")
        top_k = tops[i] or 0
        if not 0 <= top_k <= limits.vocab_size:
            raise ValueError(f"top_logprobs_num must be in [0, {limits.vocab_size}] (the vocab size), got {top_k}.")
        lp = LogprobRequest(bool(want_lp[i]), start, int(top_k), return_text_in_logprobs)
        for j in range(n):
            spj = sp
            if n > 1:
                spj = dataclasses.replace(sp, n=1, seed=None if sp.seed is None else sp.seed + j)
            mm = dataclasses.replace(mms[i]) if mms[i] is not None else None  # own embeddings cache
            specs.append(RequestSpec(rids[i * n + j], list(ids), spj, lp, hidden[i], grammars[i], procs[i],
                                     fork_of=i * n if j else None, mm=mm))
    return specs, single


def _images_per_prompt(image_data: Any, num: int, single: bool) -> list[list[Any]]:
    """``image_data`` as SGLang takes it -> a list of images per prompt. One prompt: an image or a list
    of images. Several prompts: a list with one entry per prompt (None, an image, or a list of images)."""
    def as_list(item: Any) -> list[Any]:
        return [] if item is None else list(item) if isinstance(item, (list, tuple)) else [item]

    if single:
        return [as_list(image_data)]
    if image_data is None:
        return [[] for _ in range(num)]
    if not isinstance(image_data, (list, tuple)) or len(image_data) != num:
        got = f"{len(image_data)} entries" if isinstance(image_data, (list, tuple)) else type(image_data).__name__
        raise ValueError(f"With {num} prompts, image_data must be a list of {num} entries (None, an image or a list "
                         f"of images per prompt); got {got}.")
    return [as_list(item) for item in image_data]


def _load_processors(value: Any, num: int, limits: Limits) -> list[Any]:
    """Each prompt's custom logit processor, loaded once per distinct string (the engine batches by processor)."""
    per = _per_prompt(value, num, "custom_logit_processor")
    if all(p is None for p in per):
        return per
    if not limits.enable_custom_logit_processor:
        raise ValueError("The engine does not allow custom logit processors. Create it with "
                         "Engine(..., enable_custom_logit_processor=True) (a processor runs the caller's code).")
    from .logit_processor import CustomLogitProcessor

    loaded: dict[str, Any] = {}
    for p in per:
        if p is not None and p not in loaded:
            if not isinstance(p, str):
                raise TypeError(f"custom_logit_processor must be the string YourProcessor.to_str(), got {p!r}.")
            loaded[p] = CustomLogitProcessor.from_str(p)
    return [None if p is None else loaded[p] for p in per]


def _compile_constraint(sp: SamplingParams, limits: Limits) -> Any:
    """The compiled json_schema / regex / ebnf of one request (None when unconstrained); raises ValueError here,
    on the caller's thread, when it is malformed."""
    for kind in ("json_schema", "regex", "ebnf"):
        spec = getattr(sp, kind)
        if spec is not None:
            if limits.grammar is None:
                raise ValueError("Structured output (json_schema / regex / ebnf) needs the engine's tokenizer.")
            return limits.grammar.compile(kind, spec)
    return None


def _fit_context(ids: list[int], sp: SamplingParams, limits: Limits, idx: int | None) -> tuple[list[int], SamplingParams]:
    """Cap or reject so that prompt + output fit in ``limits.max_request_tokens``; ``max_new_tokens=None``
    means "as many as fit"."""
    limit = limits.max_request_tokens
    where = "" if idx is None else f" (prompt {idx})"
    if len(ids) >= limit:
        if not limits.allow_auto_truncate:
            what = (f"the model's context length ({limit} tokens)" if limit == limits.context_length
                    else limits.describe_limit())
            raise ValueError(f"The input ({len(ids)} tokens){where} is longer than {what}. Shorten the prompt or "
                             "create the engine with allow_auto_truncate=True.")
        logger.warning("truncating a %d-token prompt to %d tokens", len(ids), limit - 1)
        ids = ids[: limit - 1]
    if sp.max_new_tokens is None:
        return ids, dataclasses.replace(sp, max_new_tokens=limit - len(ids))
    if len(ids) + sp.max_new_tokens > limit:
        if not limits.allow_auto_truncate:
            raise ValueError(
                f"Requested token count exceeds {limits.describe_limit()}{where}. You requested a total of "
                f"{len(ids) + sp.max_new_tokens} tokens: {len(ids)} tokens from the input messages and "
                f"{sp.max_new_tokens} tokens for the completion. Reduce the length of the input or max_new_tokens.")
        sp = dataclasses.replace(sp, max_new_tokens=limit - len(ids))
    return ids, sp


def _with_defaults(params: Any, defaults: dict[str, Any]) -> Any:
    """A request's sampling params dict over the model's defaults (a key set to None takes the default)."""
    if not defaults or not (params is None or isinstance(params, Mapping)):
        return params
    merged = dict(defaults)
    merged.update({k: v for k, v in (params or {}).items() if not (v is None and k in defaults)})
    return merged


def _encode(tokenizer: Tokenizer, prompt: Any, idx: int | None) -> list[int]:
    name = "prompt" if idx is None else f"prompt {idx}"
    if not isinstance(prompt, str):
        raise ValueError(f"{name} must be a string (a list of prompts holds strings), got {type(prompt).__name__}.")
    if prompt == "":
        raise ValueError(f"{name} is empty; give at least one character.")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} is not valid text: {e.reason} at position {e.start} (a lone surrogate); "
                         "pass text that encodes to UTF-8.") from None
    return tokenizer.encode(prompt)


def _parse_input_ids(input_ids: Any) -> tuple[list[list[int]], bool]:
    """A flat id list (one prompt) or a list of flat id lists; numpy / torch arrays accepted."""
    if hasattr(input_ids, "tolist"):
        input_ids = input_ids.tolist()
    if isinstance(input_ids, (str, bytes)) or not isinstance(input_ids, (list, tuple)):
        raise TypeError(f"input_ids must be a list of token ids or a list of such lists, "
                        f"got {type(input_ids).__name__}.")
    if len(input_ids) == 0:
        raise ValueError("input_ids cannot be empty.")
    if not any(isinstance(x, (list, tuple)) or hasattr(x, "tolist") and getattr(x, "ndim", 0) > 0
               for x in input_ids):
        return [_as_ids(input_ids, None)], True
    return [_as_ids(x, i) for i, x in enumerate(input_ids)], False


def _as_ids(ids: Any, idx: int | None) -> list[int]:
    """A flat list of Python ints (numpy / torch integers accepted; floats, bools and deeper nesting refused)."""
    name = "input_ids" if idx is None else f"input_ids {idx}"
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"{name} must be a list of token ids, got {ids!r}.")
    out = []
    for t in ids:
        if isinstance(t, bool) or not hasattr(t, "__index__"):
            raise ValueError(f"{name} must hold integers (one list of token ids per prompt), got {t!r} in "
                             f"{list(ids)[:8]!r}.")
        out.append(int(t.__index__()))
    return out


def _any(value: Any, name: str) -> bool:
    values = value if isinstance(value, (list, tuple)) else [value]
    return any(_flag(v, name) for v in values)


def _flag(value: Any, name: str) -> bool:
    if value is None or isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{name} must be True or False (or a list of them, one per prompt), got {value!r}.")


def _optional_int(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer or None (or a list of them, one per prompt), got {value!r}.")
    return value


def _per_prompt(value: Any, num: int, name: str) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != num:
            raise ValueError(f"{name} has {len(value)} entries but there are {num} prompts.")
        return list(value)
    return [value] * num


def _rids(rid: Any, total: int) -> list[str]:
    if rid is None:
        return [uuid.uuid4().hex for _ in range(total)]
    if isinstance(rid, str):
        return [rid] if total == 1 else [f"{rid}_{i}" for i in range(total)]
    if not isinstance(rid, (list, tuple)) or not all(isinstance(r, str) for r in rid):
        raise TypeError(f"rid must be a string or a list of strings, got {rid!r}.")
    rids = list(rid)
    if len(rids) != total:
        raise ValueError(f"rid has {len(rids)} entries but the call makes {total} requests.")
    if len(set(rids)) != len(rids):
        raise ValueError("rid entries must be unique.")
    return rids
