"""Tokenization on two vocabularies: SmolLM2's (adds no special tokens) and a Llama-3-style one built
in conftest (adds BOS by itself, other special tokens, a header-style chat template)."""

from __future__ import annotations

import pytest

from nbengine import cli
from nbengine.detokenizer import IncrementalDetokenizer
from nbengine.engine import Engine
from nbengine.sampling_params import SamplingParams
from nbengine.tokenizer import Tokenizer

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
MULTIBYTE = "Café 😀 日本語 naïve 👍🏽 done"
GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}


@pytest.fixture(scope="module", params=["smollm2", "llama3-style"])
def model_dir(request, tiny_llama, llama3_tok_model):
    return tiny_llama if request.param == "smollm2" else llama3_tok_model


@pytest.fixture(scope="module")
def llm(model_dir):
    with Engine(str(model_dir), random_seed=0) as engine:
        yield engine


# ------------------------------------------------------------------------- double BOS
def test_the_llama3_style_tokenizer_adds_bos_by_itself(llama3_tok_model):
    tok = Tokenizer(llama3_tok_model)
    bos = tok.token_to_id("<|begin_of_text|>")
    assert tok.encode("hello")[0] == bos
    assert tok.encode("hello", add_special_tokens=False)[0] != bos
    assert tok.apply_chat_template(MESSAGES).startswith("<|begin_of_text|>")  # the template writes BOS too


def test_chat_template_ids_carry_exactly_one_bos(llama3_tok_model):
    tok = Tokenizer(llama3_tok_model)
    bos = tok.token_to_id("<|begin_of_text|>")
    ids = tok.apply_chat_template(MESSAGES, tokenize=True)
    assert ids[0] == bos and ids.count(bos) == 1
    assert tok.decode(ids, skip_special_tokens=False) == tok.apply_chat_template(MESSAGES)


def test_cli_sends_the_templated_prompt_with_one_bos(llama3_tok_model, capsys):
    tok = Tokenizer(llama3_tok_model)
    expected = tok.apply_chat_template(MESSAGES, tokenize=True)
    assert cli.main(["generate", MESSAGES[0]["content"], "--model", str(llama3_tok_model),
                     "--max-new-tokens", "2", "--stats"]) == 0
    stats = capsys.readouterr().err
    assert f"[{len(expected)} prompt + " in stats, stats  # two BOS would make it one more


def test_cli_prompt_ids_use_the_one_chat_helper(llama3_tok_model):
    tok = Tokenizer(llama3_tok_model)
    assert cli.prompt_ids(tok, "hi", raw=False, system="Be brief.") == tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], tokenize=True)
    assert cli.prompt_ids(tok, "hi", raw=True, system=None) is None


# ------------------------------------------------------------------------- both vocabularies
def test_prompt_tokens_and_text_follow_the_tokenizer(llm):
    tok = llm.tokenizer
    for prompt in ("Hello there!", MULTIBYTE):
        out = llm.generate(prompt, GREEDY)
        assert out["meta_info"]["prompt_tokens"] == len(tok.encode(prompt))
        assert out["text"] == tok.decode(out["output_ids"])


def test_input_ids_from_the_chat_template_match_the_templated_text(llm):
    tok = llm.tokenizer
    ids = tok.apply_chat_template(MESSAGES, tokenize=True)
    assert tok.decode(ids, skip_special_tokens=False) == tok.apply_chat_template(MESSAGES)
    out = llm.generate(input_ids=ids, sampling_params=GREEDY)
    assert out["meta_info"]["prompt_tokens"] == len(ids)


def test_eos_of_the_vocabulary_stops_generation(llm):
    eos = llm.tokenizer.eos_token_id
    out = llm.generate("Hello", {"temperature": 0, "max_new_tokens": 5, "logit_bias": {str(eos): 1000.0}})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": eos}
    assert out["text"] == ""


def test_streamed_text_never_ends_in_half_a_character(model_dir):
    tok = Tokenizer(model_dir)
    ids = tok.encode(MULTIBYTE, add_special_tokens=False)
    assert any(tok.decode([i]) == "\ufffd" for i in ids), "the text should split characters across tokens"
    detok = IncrementalDetokenizer(tok, tok.encode("Say:"), SamplingParams())
    for i in ids:
        detok.add(i)
        assert "\ufffd" not in detok.visible and MULTIBYTE.startswith(detok.text)
    detok.flush()
    assert detok.text == MULTIBYTE


def test_stop_string_is_held_back_on_both_vocabularies(model_dir):
    tok = Tokenizer(model_dir)
    detok = IncrementalDetokenizer(tok, tok.encode("Story:"), SamplingParams.from_dict({"stop": ["THE END"]}))
    shown = []
    for i in tok.encode(" and they lived. THE END and more", add_special_tokens=False):
        detok.add(i)
        shown.append(detok.visible)
        if detok.matched_stop:
            break
    assert detok.matched_stop == "THE END" and detok.text == " and they lived. "
    assert all("THE" not in v for v in shown)
    assert all(detok.text.startswith(v) for v in shown)


def test_special_tokens_are_skipped_in_text_unless_asked(llm):
    tok = llm.tokenizer
    special = tok.eos_token_id
    params = {"temperature": 0, "max_new_tokens": 3, "ignore_eos": True, "logit_bias": {str(special): 1000.0}}
    assert llm.generate("Hi", params)["text"] == ""
    kept = llm.generate("Hi", {**params, "skip_special_tokens": False})["text"]
    assert kept == tok.eos_token * 3
