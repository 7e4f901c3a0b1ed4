"""Correctness against transformers (the oracle), on the same weights in float32.

Greedy tokens must match transformers' ``generate`` token for token, whether the requests run
as one batch or one by one, with chunked prefill and with any page size; logprobs must match
``log_softmax`` of transformers' logits.
"""

from __future__ import annotations

import pytest
import torch

from nbengine.engine import Engine
from nbengine.tokenizer import Tokenizer

TINY = ("llama", "llama3", "qwen2", "qwen3")
NEW_TOKENS = 16
CHUNK = 64  # a small chunked_prefill_size, so every prompt longer than this is prefilled in chunks
# mixed lengths: single token, around page (16) and chunk (64) boundaries, past the default chunk (512)
LENGTHS = (1, 2, 3, 7, 15, 16, 17, 33, 63, 64, 65, 100, 129, 200, 257, 600)
GREEDY = {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}


def _prompts(seed: int, lengths=LENGTHS) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 49152, (n,), generator=g).tolist() for n in lengths]


def _load_hf(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    model.generation_config.eos_token_id = None  # our requests use ignore_eos
    return model


@torch.inference_mode()
def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """transformers' greedy generate, one prompt at a time, no padding."""
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0, eos_token_id=None)
    tokens = out[0, len(ids):].tolist()
    assert len(tokens) == n
    return tokens


@torch.inference_mode()
def _hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits on ``ids``: row p scores token p + 1."""
    return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


class Case:
    def __init__(self, name, path, hf, engine, prompts, expected):
        self.name, self.path, self.hf, self.engine = name, path, hf, engine
        self.prompts, self.expected = prompts, expected


@pytest.fixture(scope="module", params=TINY)
def case(request, tiny_models):
    name = request.param
    path = tiny_models[name]
    hf = _load_hf(path)
    prompts = _prompts(TINY.index(name))
    expected = [_hf_greedy(hf, p, NEW_TOKENS) for p in prompts]
    engine = Engine(str(path), random_seed=0, chunked_prefill_size=CHUNK)
    try:
        yield Case(name, path, hf, engine, prompts, expected)
    finally:
        engine.shutdown()


# ------------------------------------------------------------------ greedy tokens
def test_batch_greedy_equals_transformers(case):
    outs = case.engine.generate(input_ids=case.prompts, sampling_params=GREEDY)
    assert len(outs) == len(case.prompts)
    for i, (out, want) in enumerate(zip(outs, case.expected)):
        assert out["output_ids"] == want, f"{case.name}: prompt {i} ({len(case.prompts[i])} tokens)"
        assert out["meta_info"]["finish_reason"] == {"type": "length", "length": NEW_TOKENS}
        assert out["meta_info"]["prompt_tokens"] == len(case.prompts[i])
        assert out["meta_info"]["completion_tokens"] == NEW_TOKENS


def test_one_by_one_greedy_equals_transformers(case):
    for i, (ids, want) in enumerate(zip(case.prompts, case.expected)):
        out = case.engine.generate(input_ids=ids, sampling_params=GREEDY)
        assert out["output_ids"] == want, f"{case.name}: prompt {i} ({len(ids)} tokens)"


def test_engine_pages_are_all_free_after_the_requests(case):
    case.engine.generate(input_ids=case.prompts[:4], sampling_params=GREEDY)
    info = case.engine.get_server_info()
    assert info["kv_pages_used"] == 0
    assert info["num_running_reqs"] == 0 and info["num_waiting_reqs"] == 0


# ------------------------------------------------------------------ logprobs
def _check_pair(entry, lps_row: torch.Tensor, token: int) -> None:
    lp, tok, text = entry
    assert tok == token and text is None
    assert lp == pytest.approx(lps_row[token].item(), abs=1e-3)


def _check_top(top, lps_row: torch.Tensor, k: int, must_contain: int | None) -> None:
    assert len(top) == k
    values = [v for v, _, _ in top]
    assert values == sorted(values, reverse=True)
    ref = lps_row.topk(k).values.tolist()
    assert values == pytest.approx(ref, abs=1e-3)
    for v, t, _ in top:
        assert v == pytest.approx(lps_row[t].item(), abs=1e-3)
    if must_contain is not None:
        assert must_contain in [t for _, t, _ in top]


@pytest.mark.parametrize("logprob_start_len", [0, 5])
def test_logprobs_match_transformers_log_softmax(case, logprob_start_len):
    # 2 is the shortest prompt with a scored input token; 100 and 257 are prefilled in several chunks
    picks = [i for i, n in enumerate(LENGTHS) if n in ((2, 7, 100, 257) if logprob_start_len == 0 else (7, 100, 257))]
    prompts = [case.prompts[i] for i in picks]
    params = {**GREEDY, "max_new_tokens": 8}
    outs = case.engine.generate(input_ids=prompts, sampling_params=params, return_logprob=True,
                                top_logprobs_num=5, logprob_start_len=logprob_start_len)
    for ids, out in zip(prompts, outs):
        meta = out["meta_info"]
        gen = out["output_ids"]
        assert len(gen) == 8
        lps = _hf_logprobs(case.hf, ids + gen)
        n = len(ids)
        # output tokens: the logprob of each greedy token, and it tops the top-5
        assert len(meta["output_token_logprobs"]) == 8
        assert len(meta["output_top_logprobs"]) == 8
        for i, (entry, top) in enumerate(zip(meta["output_token_logprobs"], meta["output_top_logprobs"])):
            _check_pair(entry, lps[n + i - 1], gen[i])
            _check_top(top, lps[n + i - 1], 5, gen[i])
            assert top[0][1] == gen[i]
        # input tokens from logprob_start_len on
        inp, inp_top = meta["input_token_logprobs"], meta["input_top_logprobs"]
        assert len(inp) == n - logprob_start_len, f"prompt of {n} tokens"
        assert len(inp_top) == n - logprob_start_len
        for j, p in enumerate(range(logprob_start_len, n)):
            if p == 0:
                assert inp[j] == (None, ids[0], None)
                assert inp_top[j] is None
                continue
            _check_pair(inp[j], lps[p - 1], ids[p])
            _check_top(inp_top[j], lps[p - 1], 5, None)


def test_default_logprob_start_len_gives_one_input_entry(case):
    ids = case.prompts[LENGTHS.index(33)]
    out = case.engine.generate(input_ids=ids, sampling_params={**GREEDY, "max_new_tokens": 3}, return_logprob=True)
    meta = out["meta_info"]
    assert len(meta["input_token_logprobs"]) == 1
    assert len(meta["output_token_logprobs"]) == 3
    lps = _hf_logprobs(case.hf, ids + out["output_ids"])
    _check_pair(meta["input_token_logprobs"][0], lps[len(ids) - 2], ids[-1])


def test_single_token_prompt_logprobs_have_the_leading_none_entry(case):
    out = case.engine.generate(input_ids=case.prompts[0], sampling_params={**GREEDY, "max_new_tokens": 2},
                               return_logprob=True, logprob_start_len=0)
    assert out["meta_info"]["input_token_logprobs"] == [(None, case.prompts[0][0], None)]


# ------------------------------------------------------------------ page sizes
@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_greedy_output_is_the_same_for_every_page_size(tiny_models, page_size):
    name = "qwen2"
    prompts = _prompts(TINY.index(name))
    picks = [0, 3, 5, 6, 9, 10, 12, 15]  # lengths 1, 7, 16, 17, 64, 65, 129, 600
    with Engine(str(tiny_models[name]), random_seed=0, page_size=page_size, chunked_prefill_size=CHUNK) as llm:
        assert llm.get_server_info()["page_size"] == page_size
        outs = llm.generate(input_ids=[prompts[i] for i in picks], sampling_params=GREEDY)
    got = [o["output_ids"] for o in outs]
    # all page sizes must agree with one another and with transformers
    expected = _page_size_reference(tiny_models[name], [prompts[i] for i in picks])
    assert got == expected


_REF_CACHE: dict = {}


def _page_size_reference(path, prompts):
    key = str(path)
    if key not in _REF_CACHE:
        hf = _load_hf(path)
        _REF_CACHE[key] = [_hf_greedy(hf, p, NEW_TOKENS) for p in prompts]
    return _REF_CACHE[key]


# ------------------------------------------------------------------ the default model
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "What is 17 times 23?",
    "Name three primary colors.",
    "How do I reverse a list in Python?",
    "Who wrote Romeo and Juliet?",
    "Give me a synonym for happy.",
    "What does CPU stand for?",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
    "Tell me a fun fact about octopuses.",
    "What is the boiling point of water in Fahrenheit?",
    "Suggest a name for a pet turtle.",
    "What is a prime number?",
    "Describe a cat in five words.",
]


def test_default_model_chat_greedy_batch_equals_one_by_one_equals_transformers(default_model_dir):
    tok = Tokenizer(default_model_dir)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True) for q in QUESTIONS]
    n = 24
    params = {"temperature": 0, "max_new_tokens": n, "ignore_eos": True}
    hf = _load_hf(default_model_dir)
    expected = [_hf_greedy(hf, p, n) for p in prompts]
    del hf
    with Engine(str(default_model_dir), random_seed=0, quantization=None) as llm:  # the exact float32 path
        batch = [o["output_ids"] for o in llm.generate(input_ids=prompts, sampling_params=params)]
        single = [llm.generate(input_ids=p, sampling_params=params)["output_ids"] for p in prompts]
        texts = [o["text"] for o in llm.generate(input_ids=prompts[:2], sampling_params=params)]
    for i in range(len(prompts)):
        assert batch[i] == expected[i], f"batch, question {i}: {QUESTIONS[i]!r}"
        assert single[i] == expected[i], f"one by one, question {i}: {QUESTIONS[i]!r}"
    assert texts == [tok.decode(e) for e in expected[:2]]
