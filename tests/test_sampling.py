"""Sampling: seeds, top-k/p, min-p, temperature, penalties, stop conditions and detokenization."""

from __future__ import annotations

import math

import pytest
import torch

from nbengine.detokenizer import IncrementalDetokenizer
from nbengine.engine import Engine
from nbengine.sampler import Sampler
from nbengine.sampling_params import SamplingParams
from nbengine.sequence import LogprobRequest, Sequence
from nbengine.tokenizer import Tokenizer
from nbengine.utils import stream_and_merge

EOS = 2  # the tiny models' eos_token_id (and the tokenizer's <|im_end|>)
PROMPTS = ["The weather today is", "Once upon a time", "Hello", "def main():", "1, 2, 3,", "Paris is"]


@pytest.fixture(scope="module")
def llm(tiny_llama):
    engine = Engine(str(tiny_llama), random_seed=0)
    try:
        yield engine
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def tok(tiny_llama) -> Tokenizer:
    return Tokenizer(tiny_llama)


def _greedy(n: int = 24, **extra) -> dict:
    return {"temperature": 0, "max_new_tokens": n, "ignore_eos": True, **extra}


def _texts(outs) -> list[str]:
    return [o["text"] for o in outs]


# ======================================================================= seeds
def test_same_seed_gives_the_same_text(llm):
    params = {"temperature": 1.0, "max_new_tokens": 16, "seed": 1234, "ignore_eos": True}
    first = llm.generate(PROMPTS[0], params)
    second = llm.generate(PROMPTS[0], params)
    assert first["text"] == second["text"] and first["output_ids"] == second["output_ids"]


def test_seeded_request_gives_the_same_text_alone_and_inside_a_batch(llm):
    seeded = {"temperature": 1.0, "max_new_tokens": 16, "seed": 77, "ignore_eos": True}
    alone = llm.generate(PROMPTS[1], seeded)
    others = [{"temperature": 1.0, "max_new_tokens": 20, "ignore_eos": True},
              {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 8, "seed": 5, "ignore_eos": True},
              _greedy(12)]
    batch = llm.generate([PROMPTS[2], PROMPTS[1], PROMPTS[3], PROMPTS[4]], [others[0], seeded, others[1], others[2]])
    assert batch[1]["output_ids"] == alone["output_ids"]
    assert batch[1]["text"] == alone["text"]
    # and in another position of another batch
    batch2 = llm.generate([PROMPTS[1], PROMPTS[5]], [seeded, others[0]])
    assert batch2[0]["output_ids"] == alone["output_ids"]


def test_different_seeds_give_different_text(llm):
    outs = llm.generate([PROMPTS[0]] * 4, [{"temperature": 1.0, "max_new_tokens": 16, "seed": s, "ignore_eos": True}
                                           for s in (1, 2, 3, 4)])
    assert len(set(_texts(outs))) == 4


def test_unseeded_sampling_varies(llm):
    outs = llm.generate([PROMPTS[0]] * 4, {"temperature": 1.0, "max_new_tokens": 16, "ignore_eos": True})
    assert len(set(_texts(outs))) > 1


# ====================================================== filters equal to greedy
@pytest.mark.parametrize("params", [{"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}, {"top_k": 1, "top_p": 0.5}],
                         ids=["top_k=1", "top_p=1e-6", "min_p=1", "top_k=1+top_p"])
def test_degenerate_filters_equal_greedy(llm, params):
    greedy = llm.generate(PROMPTS, _greedy(16))
    sampled = llm.generate(PROMPTS, {"temperature": 1.0, "max_new_tokens": 16, "ignore_eos": True, **params})
    assert [o["output_ids"] for o in sampled] == [o["output_ids"] for o in greedy]


# ========================================================= Sampler, hand-made
V = 6


def _fake(params: dict | None = None, prompt: list[int] | None = None, output: list[int] | None = None,
          logprob: bool = False) -> Sequence:
    seq = Sequence(rid="x", prompt_ids=list(prompt or [0]), params=SamplingParams.from_dict(params or {}),
                   emit=lambda out: None, logprob=LogprobRequest(logprob, 0, 0))
    seq.output_ids = list(output or [])
    return seq


def _draw(logits_row: list[float], params: dict, n: int = 4000, seed: int = 0) -> torch.Tensor:
    """Sample ``n`` times from one hand-made distribution; returns the counts per token."""
    sampler = Sampler(len(logits_row), [EOS], torch.device("cpu"), seed)
    logits = torch.tensor([logits_row] * n, dtype=torch.float32)
    tokens = sampler(logits, [_fake(params) for _ in range(n)]).tokens
    return torch.bincount(torch.tensor(tokens), minlength=len(logits_row)).float()


def _assert_frequencies(counts: torch.Tensor, probs: list[float]) -> None:
    n = counts.sum().item()
    for c, p in zip(counts.tolist(), probs):
        sigma = math.sqrt(max(n * p * (1 - p), 1.0))
        assert abs(c - n * p) <= 5 * sigma, (counts.tolist(), probs)


PROBS = [0.5, 0.3, 0.15, 0.05]
LOGITS = [math.log(p) for p in PROBS]


def test_temperature_one_samples_the_softmax_distribution():
    _assert_frequencies(_draw(LOGITS, {"temperature": 1.0}), PROBS)


def test_temperature_sharpens_and_flattens_the_distribution():
    for t in (0.5, 2.0):
        w = [p ** (1 / t) for p in PROBS]
        _assert_frequencies(_draw(LOGITS, {"temperature": t}), [x / sum(w) for x in w])


def test_top_k_never_emits_tokens_outside_the_k_best():
    counts = _draw(LOGITS, {"temperature": 1.0, "top_k": 2})
    assert counts[2:].sum() == 0
    _assert_frequencies(counts, [0.5 / 0.8, 0.3 / 0.8, 0, 0])


def test_top_p_keeps_the_smallest_set_whose_mass_reaches_p():
    counts = _draw(LOGITS, {"temperature": 1.0, "top_p": 0.7})  # 0.5 < 0.7 <= 0.5 + 0.3
    assert counts[2:].sum() == 0
    _assert_frequencies(counts, [0.5 / 0.8, 0.3 / 0.8, 0, 0])
    counts = _draw(LOGITS, {"temperature": 1.0, "top_p": 0.9})  # needs the third token too
    assert counts[3] == 0 and counts[2] > 0
    _assert_frequencies(counts, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0])
    counts = _draw(LOGITS, {"temperature": 1.0, "top_p": 0.4})  # the top token alone reaches 0.4
    assert counts[0] == counts.sum()


def test_min_p_drops_tokens_below_min_p_times_the_top_probability():
    counts = _draw(LOGITS, {"temperature": 1.0, "min_p": 0.5})  # threshold 0.25: keeps 0.5 and 0.3
    assert counts[2:].sum() == 0
    _assert_frequencies(counts, [0.5 / 0.8, 0.3 / 0.8, 0, 0])
    counts = _draw(LOGITS, {"temperature": 1.0, "min_p": 0.2})  # threshold 0.1: keeps three
    assert counts[3] == 0
    _assert_frequencies(counts, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0])


def test_greedy_rows_stay_greedy_in_a_mixed_batch():
    sampler = Sampler(4, [EOS], torch.device("cpu"), 0)
    n = 200
    logits = torch.tensor([LOGITS] * n)
    seqs = [_fake({"temperature": 0.0} if i % 2 else {"temperature": 1.0}) for i in range(n)]
    tokens = sampler(logits, seqs).tokens
    assert all(t == 0 for t in tokens[1::2])
    assert len(set(tokens[0::2])) > 1


def test_seeded_rows_do_not_depend_on_the_rest_of_the_batch():
    def run(batch_size: int, position: int) -> list[int]:
        sampler = Sampler(V, [EOS], torch.device("cpu"), batch_size)
        got = []
        seqs = [_fake({"temperature": 1.0}) for _ in range(batch_size)]
        seqs[position] = _fake({"temperature": 1.0, "seed": 42})
        seqs[position].generator = torch.Generator().manual_seed(42)
        logits = torch.zeros(batch_size, V)
        for _ in range(20):
            got.append(sampler(logits.clone(), seqs).tokens[position])
        return got

    assert run(1, 0) == run(5, 3) == run(3, 0)


# -------------------------------------------------------------- penalties
def _reference(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """HF repetition penalty on prompt + output; OpenAI frequency/presence on output; bias; bans."""
    from transformers import RepetitionPenaltyLogitsProcessor

    p = seq.params
    out = logits.clone()
    if p.logit_bias:
        for t, b in p.logit_bias.items():
            out[t] += b
    if len(seq.output_ids) < p.min_new_tokens:
        for t in list(p.stop_token_ids) + ([] if p.ignore_eos else [EOS]):
            out[t] = float("-inf")
    if p.repetition_penalty != 1.0:
        proc = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)
        out = proc(torch.tensor([seq.prompt_ids + seq.output_ids]), out[None])[0]
    counts = torch.bincount(torch.tensor(seq.output_ids, dtype=torch.long), minlength=len(out)).float() \
        if seq.output_ids else torch.zeros(len(out))
    out = out - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
    return out


def _random_cases(n: int, make_params, seed: int) -> tuple[torch.Tensor, list[Sequence]]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, V, generator=g) * 2
    seqs = []
    for i in range(n):
        prompt = torch.randint(0, V, (int(torch.randint(1, 5, (), generator=g)),), generator=g).tolist()
        output = torch.randint(0, V, (int(torch.randint(0, 6, (), generator=g)),), generator=g).tolist()
        seqs.append(_fake(make_params(g), prompt, output))
    return logits, seqs


def _u(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


PENALTY_CASES = {
    "repetition": lambda g: {"temperature": 0, "repetition_penalty": _u(g, 0.3, 2.0)},
    "frequency": lambda g: {"temperature": 0, "frequency_penalty": _u(g, -2.0, 2.0)},
    "presence": lambda g: {"temperature": 0, "presence_penalty": _u(g, -2.0, 2.0)},
    "logit_bias": lambda g: {"temperature": 0,
                             "logit_bias": {str(int(torch.randint(0, V, (), generator=g))): _u(g, -5, 5),
                                            "3": _u(g, -5, 5)}},
    "all": lambda g: {"temperature": 0, "repetition_penalty": _u(g, 0.5, 2.0), "frequency_penalty": _u(g, -1, 1),
                      "presence_penalty": _u(g, -1, 1), "logit_bias": {"1": _u(g, -3, 3)}},
}


@pytest.mark.parametrize("kind", list(PENALTY_CASES))
def test_penalties_and_bias_match_a_torch_reference(kind):
    n = 400
    logits, seqs = _random_cases(n, PENALTY_CASES[kind], seed=len(kind))
    want = torch.stack([_reference(logits[i], s) for i, s in enumerate(seqs)]).argmax(dim=-1).tolist()
    plain = logits.argmax(dim=-1).tolist()
    got = Sampler(V, [EOS], torch.device("cpu"), 0)(logits.clone(), seqs).tokens
    assert got == want
    assert sum(a != b for a, b in zip(want, plain)) > n // 20, "the penalties should change some choices"


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    sampler = Sampler(V, [EOS], torch.device("cpu"), 0)
    params = {"temperature": 0, "repetition_penalty": 2.0}
    # positive: 2.0 (a prompt token) -> 1.0, below the unseen 1.8
    logits = torch.tensor([[2.0, -1.0, 1.8, 0.0, 0.5, -0.2]])
    assert sampler(logits.clone(), [_fake(params, prompt=[0])]).tokens == [2]
    # negative: -1.0 (an output token) -> -2.0, below the unseen -1.5
    logits = torch.full((1, V), -9.0)
    logits[0, 0], logits[0, 1] = -1.0, -1.5
    assert sampler(logits.clone(), [_fake(params, prompt=[3], output=[0])]).tokens == [1]


def test_frequency_and_presence_penalties_count_output_tokens_only():
    sampler = Sampler(V, [EOS], torch.device("cpu"), 0)
    logits = torch.tensor([[3.0, 2.5, 0.0, 0.0, 0.0, 0.0]])
    # token 0 twice in the output: 3.0 - 2 * 0.4 = 2.2 < 2.5
    seq = _fake({"temperature": 0, "frequency_penalty": 0.4}, prompt=[1, 1, 1], output=[0, 0])
    assert sampler(logits.clone(), [seq]).tokens == [1]
    # once: 3.0 - 0.4 = 2.6 > 2.5; the prompt's token 1 is not penalized
    seq = _fake({"temperature": 0, "frequency_penalty": 0.4}, prompt=[1, 1, 1], output=[0])
    assert sampler(logits.clone(), [seq]).tokens == [0]
    # presence does not grow with the count: 3.0 - 0.4 = 2.6 > 2.5 even after three times
    seq = _fake({"temperature": 0, "presence_penalty": 0.4}, prompt=[1], output=[0, 0, 0])
    assert sampler(logits.clone(), [seq]).tokens == [0]


def test_logit_bias_can_force_and_forbid_tokens():
    sampler = Sampler(V, [EOS], torch.device("cpu"), 0)
    logits = torch.tensor([[3.0, 2.5, 0.0, 0.0, 0.0, 0.0]] * 2)
    seqs = [_fake({"temperature": 0, "logit_bias": {"5": 10.0}}),
            _fake({"temperature": 1.0, "logit_bias": {0: -100, 1: -100}})]
    for _ in range(20):
        got = sampler(logits.clone(), seqs).tokens
        assert got[0] == 5 and got[1] not in (0, 1)


@pytest.mark.parametrize("bias", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logit_bias_is_rejected(bias):
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams.from_dict({"logit_bias": {"5": bias}})


def test_min_new_tokens_bans_eos_and_stop_token_ids_until_reached():
    sampler = Sampler(V, [EOS], torch.device("cpu"), 0)
    logits = torch.tensor([[0.0, 0.0, 9.0, 0.0, 8.0, 1.0]])  # EOS (2) best, then 4
    params = {"temperature": 0, "min_new_tokens": 3, "stop_token_ids": [4]}
    assert sampler(logits.clone(), [_fake(params, output=[0, 0])]).tokens == [5]  # 2 and 4 banned
    assert sampler(logits.clone(), [_fake(params, output=[0, 0, 0])]).tokens == [2]  # allowed again
    # with ignore_eos the EOS is not a stop, so it is not banned; stop ids still are
    params = {"temperature": 0, "min_new_tokens": 3, "stop_token_ids": [4], "ignore_eos": True}
    assert sampler(logits.clone(), [_fake(params, output=[])]).tokens == [2]
    logits[0, 2] = -5.0
    assert sampler(logits.clone(), [_fake(params, output=[])]).tokens == [5]
    # sampling (not greedy) never draws a banned token either
    params = {"temperature": 1.0, "min_new_tokens": 3}
    seqs = [_fake(params, output=[0]) for _ in range(300)]
    assert EOS not in sampler(torch.tensor([[0.0, 0.0, 3.0, 0.0, 0.0, 0.0]] * 300), seqs).tokens


# ====================================================== stop conditions (engine)
def _offsets(tok: Tokenizer, ids: list[int], text: str) -> list[int]:
    """Character offset in ``text`` where each generated token's text starts (plus the end)."""
    offs = []
    for i in range(len(ids) + 1):
        prefix = tok.decode(ids[:i])
        assert text.startswith(prefix), "greedy text is not the concatenation of its tokens"
        offs.append(len(prefix))
    return offs


@pytest.fixture(scope="module")
def greedy_runs(llm, tok):
    """(prompt, output_ids, text, offsets) of plain greedy runs (24 tokens, no stop)."""
    outs = llm.generate(PROMPTS, _greedy(24))
    return [(p, o["output_ids"], o["text"], _offsets(tok, o["output_ids"], o["text"])) for p, o in zip(PROMPTS, outs)]


def _whole_token_stop(greedy_runs):
    """A stop string equal to one later token's text, first occurring where that token starts."""
    for prompt, ids, text, offs in greedy_runs:
        for k in range(2, len(ids) - 2):
            s = text[offs[k] : offs[k + 1]]
            if len(s.strip()) >= 2 and text.find(s) == offs[k]:
                return prompt, ids, text, offs, k, s
    pytest.fail("no greedy output has a usable stop string")


def _spanning_stop(greedy_runs):
    """A stop string made of the end of token k-1 and the start of token k, first occurring there."""
    for prompt, ids, text, offs in greedy_runs:
        for k in range(2, len(ids) - 2):
            left, right = text[offs[k - 1] : offs[k]], text[offs[k] : offs[k + 1]]
            if len(left) < 2 or len(right) < 2:
                continue
            s = left[-1:] + right[:2]
            if text.find(s) == offs[k] - 1:
                return prompt, ids, text, offs, k, s
    pytest.fail("no greedy output has a usable token-spanning stop string")


def test_stop_string_ends_the_text_right_before_it(llm, greedy_runs):
    prompt, ids, text, offs, k, s = _whole_token_stop(greedy_runs)
    out = llm.generate(prompt, _greedy(24, stop=[s, "never-appears-xyz"]))
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": s}
    assert out["text"] == text[: offs[k]]
    assert out["output_ids"] == ids[: k + 1]  # the token that completed the stop string is kept


def test_no_stop_trim_keeps_the_stop_string(llm, greedy_runs):
    prompt, ids, text, offs, k, s = _whole_token_stop(greedy_runs)
    out = llm.generate(prompt, _greedy(24, stop=s, no_stop_trim=True))
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": s}
    assert out["text"] == text[: offs[k]] + s


def test_stop_string_spanning_a_token_boundary(llm, greedy_runs):
    prompt, ids, text, offs, k, s = _spanning_stop(greedy_runs)
    out = llm.generate(prompt, _greedy(24, stop=[s]))
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": s}
    assert out["text"] == text[: offs[k] - 1]
    assert out["output_ids"] == ids[: k + 1]
    kept = llm.generate(prompt, _greedy(24, stop=[s], no_stop_trim=True))
    assert kept["text"] == text[: offs[k] - 1] + s


@pytest.mark.parametrize("which", ["whole", "spanning"])
def test_streaming_never_shows_text_past_the_stop_string(llm, greedy_runs, which):
    prompt, ids, text, offs, k, s = (_whole_token_stop if which == "whole" else _spanning_stop)(greedy_runs)
    params = _greedy(24, stop=[s])
    final = llm.generate(prompt, params)["text"]
    chunks = list(llm.generate(prompt, params, stream=True))
    assert len(chunks) > 1
    for c in chunks:
        assert final.startswith(c["text"]), (c["text"], final)
        assert s not in c["text"]
    assert chunks[-1]["text"] == final
    assert chunks[-1]["meta_info"]["finish_reason"] == {"type": "stop", "matched": s}
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    assert stream_and_merge(llm, prompt, params) == final


def test_stop_token_id_finishes_keeps_the_id_and_drops_its_text(llm, greedy_runs):
    prompt, ids, text, offs = greedy_runs[0]
    j = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])
    out = llm.generate(prompt, _greedy(24, stop_token_ids=[ids[j]]))
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": ids[j]}
    assert out["output_ids"] == ids[: j + 1]
    assert out["text"] == text[: offs[j]]
    assert out["meta_info"]["completion_tokens"] == j + 1
    # with no_stop_trim the token's text stays
    kept = llm.generate(prompt, _greedy(24, stop_token_ids=[ids[j]], no_stop_trim=True))
    assert kept["text"] == text[: offs[j + 1]]


def test_eos_stops_generation_unless_ignore_eos(llm):
    forced = {"temperature": 0, "max_new_tokens": 6, "logit_bias": {str(EOS): 1000.0}}
    out = llm.generate(PROMPTS[0], forced)
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": EOS}
    assert out["output_ids"] == [EOS] and out["text"] == ""
    out = llm.generate(PROMPTS[0], {**forced, "ignore_eos": True})
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 6}
    assert out["output_ids"] == [EOS] * 6


def test_min_new_tokens_delays_eos(llm):
    out = llm.generate(PROMPTS[0], {"temperature": 0, "max_new_tokens": 10, "min_new_tokens": 4,
                                    "logit_bias": {str(EOS): 1000.0}})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": EOS}
    assert len(out["output_ids"]) == 5 and EOS not in out["output_ids"][:4] and out["output_ids"][4] == EOS


def test_max_new_tokens_finishes_with_length(llm):
    outs = llm.generate(PROMPTS[:3], [_greedy(n) for n in (1, 5, 13)])
    for n, out in zip((1, 5, 13), outs):
        assert out["meta_info"]["finish_reason"] == {"type": "length", "length": n}
        assert len(out["output_ids"]) == n == out["meta_info"]["completion_tokens"]


def test_max_new_tokens_zero_generates_nothing(llm):
    out = llm.generate(PROMPTS[0], {"max_new_tokens": 0})
    assert out["output_ids"] == [] and out["text"] == ""
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    assert out["meta_info"]["completion_tokens"] == 0
    assert llm.get_server_info()["kv_pages_used"] == 0


# ============================================================== detokenizer
MULTIBYTE = "Hi 😀 世界 🎉 café naïve 𝄞 Ω≈ç ok 👍🏽 done"


@pytest.fixture(scope="module")
def real_tok(default_model_dir) -> Tokenizer:
    return Tokenizer(default_model_dir)


def test_incremental_text_never_ends_in_half_a_utf8_character(real_tok):
    ids = real_tok.encode(MULTIBYTE, add_special_tokens=False)
    # the test is only meaningful if some tokens are fragments of a character
    assert any(real_tok.decode([i]) == "\ufffd" for i in ids)
    detok = IncrementalDetokenizer(real_tok, real_tok.encode("Say:"), SamplingParams())
    final = real_tok.decode(ids)
    assert final == MULTIBYTE
    lagged = False
    for n, i in enumerate(ids, 1):
        detok.add(i)
        assert "\ufffd" not in detok.text
        assert "\ufffd" not in detok.visible
        assert final.startswith(detok.text)
        lagged |= detok.text != real_tok.decode(ids[:n])
    assert lagged  # some step held back a partial character
    detok.flush()
    assert detok.text == final


def test_engine_stream_never_shows_half_a_character(default_model_dir, real_tok):
    # the default model answers this with emoji, each made of several byte-fragment tokens
    ids = real_tok.apply_chat_template([{"role": "user", "content": "Write three emojis about the sun."}], tokenize=True)
    params = {"temperature": 0, "max_new_tokens": 24}
    with Engine(str(default_model_dir), random_seed=0) as engine:
        final = engine.generate(input_ids=ids, sampling_params=params)
        chunks = list(engine.generate(input_ids=ids, sampling_params=params, stream=True))
    ids = final["output_ids"]
    assert sum(real_tok.decode([i]) == "\ufffd" for i in ids) >= 4, "the answer has no multi-token characters"
    assert final["text"] == real_tok.decode(ids)
    assert chunks[-1]["text"] == final["text"] and chunks[-1]["output_ids"] == ids
    for c in chunks[:-1]:  # while running, text only grows by whole characters
        assert "\ufffd" not in c["text"]
        assert final["text"].startswith(c["text"])
    # some chunk must have held back a partial character (its ids decode to a trailing U+FFFD)
    assert any(real_tok.decode(c["output_ids"]).endswith("\ufffd") for c in chunks[:-1])
