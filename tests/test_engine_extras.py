"""Engine.chat / async_chat, return_text_in_logprobs, custom logit processors, encode and score."""

from __future__ import annotations

import asyncio

import pytest
import torch

from nbengine.engine import Engine
from nbengine.logit_processor import CustomLogitProcessor

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
IDS = [(41 * i) % 40000 + 100 for i in range(11)]


class ForceToken(CustomLogitProcessor):
    """Allows only ``custom_params["token_id"]``."""

    def __call__(self, logits, custom_param_list):
        for i, params in enumerate(custom_param_list):
            keep = logits[i, params["token_id"]].clone()
            logits[i] = -float("inf")
            logits[i, params["token_id"]] = keep
        return logits


@pytest.fixture(scope="module")
def default_llm(default_model_dir):
    with Engine(str(default_model_dir), random_seed=0) as llm:
        yield llm


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    with Engine(str(tiny_llama), random_seed=0, enable_custom_logit_processor=True) as llm:
        yield llm


@pytest.fixture(scope="module")
def hf_tiny(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def test_chat_answers_paris_and_takes_a_list_of_conversations(default_llm):
    sp = {"temperature": 0, "max_new_tokens": 16}
    one = default_llm.chat(FRANCE, sp)
    assert "Paris" in one["text"]
    ids = default_llm.tokenizer.apply_chat_template(FRANCE, tokenize=True)
    assert one["output_ids"] == default_llm.generate(input_ids=ids, sampling_params=sp)["output_ids"]
    both = default_llm.chat([FRANCE, [{"role": "user", "content": "Say hi."}]], sp)
    assert len(both) == 2 and both[0]["output_ids"] == one["output_ids"]
    plain = default_llm.chat(FRANCE, {"max_new_tokens": 4}, chat_template="{% for m in messages %}{{ m['content'] }}"
                                                                          "{% endfor %}")
    assert plain["meta_info"]["prompt_tokens"] == len(default_llm.tokenizer.encode(FRANCE[0]["content"],
                                                                                   add_special_tokens=False))
    with pytest.raises(ValueError, match="role"):
        default_llm.chat([{"content": "no role"}])


def test_async_chat_streams_the_same_answer(default_llm):
    sp = {"temperature": 0, "max_new_tokens": 16}

    async def go():
        chunks = [c async for c in await default_llm.async_chat(FRANCE, sp, stream=True)]
        return chunks[-1], await default_llm.async_chat(FRANCE, sp)

    last, whole = asyncio.run(go())
    assert last["text"] == whole["text"] and "Paris" in whole["text"]


def test_logprob_tuples_carry_the_token_text_when_asked(default_llm):
    out = default_llm.generate("The capital of France is", {"temperature": 0, "max_new_tokens": 4},
                               return_logprob=True, top_logprobs_num=2, logprob_start_len=0,
                               return_text_in_logprobs=True)
    meta, tok = out["meta_info"], default_llm.tokenizer
    for lp, t, text in meta["output_token_logprobs"] + meta["input_token_logprobs"]:
        assert text == tok.decode([t], skip_special_tokens=False)
    assert all(text == tok.decode([t], skip_special_tokens=False) for _, t, text in meta["output_top_logprobs"][0])
    plain = default_llm.generate("The capital of France is", {"max_new_tokens": 2}, return_logprob=True)
    assert all(text is None for _, _, text in plain["meta_info"]["output_token_logprobs"])


def test_a_custom_logit_processor_steers_only_its_own_request(tiny, tiny_llama):
    sp = {"temperature": 0, "max_new_tokens": 5}
    alone = tiny.generate(input_ids=IDS, sampling_params=sp)
    outs = tiny.generate(input_ids=[IDS, IDS], sampling_params=[{**sp, "custom_params": {"token_id": 777}}, sp],
                         custom_logit_processor=[ForceToken.to_str(), None])
    assert outs[0]["output_ids"] == [777] * 5 and outs[1]["output_ids"] == alone["output_ids"]
    with pytest.raises(ValueError, match="could not be loaded"):
        tiny.generate(input_ids=IDS, sampling_params=sp, custom_logit_processor="not a processor")
    with Engine(str(tiny_llama), random_seed=0) as locked:
        with pytest.raises(ValueError, match="enable_custom_logit_processor=True"):
            locked.generate(input_ids=IDS, sampling_params=sp, custom_logit_processor=ForceToken.to_str())


def test_encode_returns_the_last_or_mean_final_hidden_state(tiny, hf_tiny):
    with torch.inference_mode():
        states = hf_tiny(torch.tensor([IDS]), output_hidden_states=True).hidden_states[-1][0]
    last = tiny.encode(input_ids=IDS)
    mean = tiny.encode(input_ids=[IDS, IDS[:4]], pooling="mean")
    torch.testing.assert_close(torch.tensor(last["embedding"]), states[-1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.tensor(mean[0]["embedding"]), states.mean(0), rtol=1e-4, atol=1e-4)
    assert last["meta_info"]["prompt_tokens"] == len(IDS) and len(mean) == 2
    with pytest.raises(ValueError, match="pooling"):
        tiny.encode(input_ids=IDS, pooling="max")


def test_score_gives_the_label_probabilities_after_each_query_and_item(tiny, hf_tiny):
    query, items, labels = IDS[:6], [[901, 902], [903]], [5, 77, 300]
    scores = tiny.score(query, items, labels)
    soft = tiny.score(query, items, labels, apply_softmax=True)
    for item, got, got_soft in zip(items, scores, soft):
        with torch.inference_mode():
            probs = torch.softmax(hf_tiny(torch.tensor([query + item])).logits[0, -1].float(), -1)[labels]
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float32), probs, rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(torch.tensor(got_soft, dtype=torch.float32), probs / probs.sum(), rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="label_token_ids"):
        tiny.score(query, items, [10**9])
