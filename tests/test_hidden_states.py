"""return_hidden_states: SGLang's layout, checked against transformers on the same weights."""

from __future__ import annotations

import pytest
import torch

from nbengine.engine import Engine

PROMPT = [(31 * i) % 40000 + 100 for i in range(13)]
SP = {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True}


@pytest.fixture(scope="module")
def llm(tiny_llama):
    with Engine(str(tiny_llama), random_seed=0, page_size=4, enable_return_hidden_states=True) as engine:
        yield engine


def _hf_final_states(folder, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        return hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]  # after the final norm


def _stack(states: list) -> torch.Tensor:
    """SGLang's layout back to one [positions, hidden] tensor: the prompt's block, then one row per token."""
    return torch.cat([torch.tensor(states[0])] + [torch.tensor(s).view(1, -1) for s in states[1:]])


def test_hidden_states_match_transformers_over_the_prompt_and_every_fed_back_token(llm, tiny_llama):
    out = llm.generate(input_ids=PROMPT, sampling_params=SP, return_hidden_states=True)
    states = out["meta_info"]["hidden_states"]
    assert len(states) == out["meta_info"]["completion_tokens"] == 5
    assert torch.tensor(states[0]).shape == (len(PROMPT), 64) and all(len(s) == 64 for s in states[1:])
    expected = _hf_final_states(tiny_llama, PROMPT + out["output_ids"][:-1])  # the last token is never fed back
    torch.testing.assert_close(_stack(states), expected, rtol=1e-4, atol=1e-4)


def test_stream_chunks_carry_only_the_new_states_and_add_up_to_the_whole(llm):
    whole = llm.generate(input_ids=PROMPT, sampling_params=SP, return_hidden_states=True)
    chunks = [c["meta_info"]["hidden_states"] for c in
              llm.generate(input_ids=PROMPT, sampling_params=SP, return_hidden_states=True, stream=True)]
    assert [len(c) for c in chunks] == [1, 1, 1, 1, 1]  # the prompt's block with the first token, then one each
    torch.testing.assert_close(_stack([s for c in chunks for s in c]), _stack(whole["meta_info"]["hidden_states"]))


def test_a_cached_prompt_still_returns_the_states_of_every_prompt_position(llm):
    first = llm.generate(input_ids=PROMPT, sampling_params=SP)
    assert "hidden_states" not in first["meta_info"]
    again = llm.generate(input_ids=[PROMPT, PROMPT], sampling_params=SP, return_hidden_states=[True, False])
    assert again[1]["meta_info"]["cached_tokens"] == 12 and "hidden_states" not in again[1]["meta_info"]
    assert again[0]["meta_info"]["cached_tokens"] == 0
    assert torch.tensor(again[0]["meta_info"]["hidden_states"][0]).shape[0] == len(PROMPT)


def test_asking_for_hidden_states_without_the_engine_flag_is_refused(tiny_llama):
    with Engine(str(tiny_llama), random_seed=0) as plain:
        with pytest.raises(ValueError, match="enable_return_hidden_states=True"):
            plain.generate(input_ids=PROMPT, sampling_params=SP, return_hidden_states=True)
        assert plain.generate(input_ids=PROMPT, sampling_params=SP)["meta_info"]["completion_tokens"] == 5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_the_cuda_runner_returns_the_same_states_and_its_graphs_step_aside(tiny_llama):
    """A step that returns hidden states runs eagerly (no CUDA graph); other requests keep the graphs."""
    with Engine(str(tiny_llama), random_seed=0, page_size=4, device="cuda", dtype="float32",
                enable_return_hidden_states=True) as gpu:
        outs = gpu.generate(input_ids=[PROMPT, PROMPT[:7]], sampling_params=SP, return_hidden_states=[True, False])
        plain = gpu.generate(input_ids=PROMPT[:7], sampling_params=SP)
    states = outs[0]["meta_info"]["hidden_states"]
    expected = _hf_final_states(tiny_llama, PROMPT + outs[0]["output_ids"][:-1])
    torch.testing.assert_close(_stack(states), expected, rtol=1e-3, atol=1e-3)
    assert outs[1]["output_ids"] == plain["output_ids"]
