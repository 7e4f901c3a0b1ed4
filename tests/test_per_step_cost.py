"""Per-step cost proportional to what is new: no copy of every output id per chunk, penalties kept as
running counts, logprobs only for requests that asked, no throwaway tensor for a tied LM head."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nbengine.config import ModelConfig
from nbengine.engine import Engine
from nbengine.models.llama import LlamaForCausalLM
from nbengine.sampler import Sampler
from nbengine.sampling_params import SamplingParams
from nbengine.sequence import LogprobRequest, Sequence

V = 8


def _captured_seqs(llm):
    """Wrap EngineCore.add to keep the sequences the engine serves."""
    core = llm._thread.core
    seen: list[Sequence] = []
    original = core.add

    def add(seqs):
        seen.extend(seqs)
        return original(seqs)

    core.add = add
    return seen


# -------------------------------------------------------------------------- outputs
def test_stream_chunks_reference_the_output_ids_instead_of_copying_them(tiny_llama):
    with Engine(str(tiny_llama), random_seed=0) as llm:
        seqs = _captured_seqs(llm)
        chunks = list(llm.generate("Hello", {"temperature": 0, "max_new_tokens": 30, "ignore_eos": True},
                                   stream=True))
        seq = seqs[0]
        snapshot = llm._thread.call(lambda: llm._thread.core.make_output(seq))
    # the engine thread hands over the request's own list and a length: O(1) per chunk
    assert snapshot.output_ids is seq.output_ids and snapshot.ids_end == 30
    # the caller still gets SGLang's cumulative lists, each one fixed when its chunk was made
    assert [len(c["output_ids"]) for c in chunks] == list(range(1, 31))
    assert all(c["output_ids"] == chunks[-1]["output_ids"][: len(c["output_ids"])] for c in chunks)
    assert chunks[0]["output_ids"] is not chunks[1]["output_ids"]


# -------------------------------------------------------------------------- penalties
def _reference(logits: torch.Tensor, prompt: list[int], output: list[int], p: SamplingParams) -> torch.Tensor:
    out = logits.clone()
    seen = set(prompt) | set(output)
    for t in seen:
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=V).float() if output else torch.zeros(V)
    return out - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()


def test_penalties_are_running_counts_built_once_and_updated_with_each_token(monkeypatch):
    from nbengine.sampler import PenaltyCounts

    builds = []
    original_init = PenaltyCounts.__init__

    def counting_init(self, seq, vocab_size, device):
        builds.append(seq.rid)
        original_init(self, seq, vocab_size, device)

    monkeypatch.setattr(PenaltyCounts, "__init__", counting_init)
    params = SamplingParams.from_dict({"temperature": 0, "repetition_penalty": 1.7, "frequency_penalty": 0.6,
                                       "presence_penalty": 0.3})
    seq = Sequence(rid="r", prompt_ids=[1, 1, 5], params=params, emit=lambda out: None)
    sampler = Sampler(V, [2], torch.device("cpu"), 0)
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        logits = torch.randn(1, V, generator=g) * 3
        want = _reference(logits[0], seq.prompt_ids, seq.output_ids, params).argmax().item()
        token = sampler(logits.clone(), [seq]).tokens[0]
        assert token == want
        seq.output_ids.append(token)  # as the engine core does
    assert builds == ["r"]  # built on the first step only, never rebuilt from prompt + output
    counts = torch.bincount(torch.tensor(seq.output_ids), minlength=V).float()
    assert torch.equal(seq.penalties.counts, counts)
    assert seq.penalties.seen.nonzero().view(-1).tolist() == sorted(set(seq.prompt_ids) | set(seq.output_ids))


def test_penalty_counts_survive_a_preemption_unchanged(tiny_llama):
    params = {"temperature": 0, "max_new_tokens": 40, "ignore_eos": True, "frequency_penalty": 1.5,
              "repetition_penalty": 1.3}
    prompts = [[5 + i] * (9 + 4 * i) for i in range(6)]
    with Engine(str(tiny_llama), random_seed=0) as big:
        want = [o["output_ids"] for o in big.generate(input_ids=prompts, sampling_params=params)]
    with Engine(str(tiny_llama), random_seed=0, max_total_tokens=160, page_size=4) as small:
        got = [o["output_ids"] for o in small.generate(input_ids=prompts, sampling_params=params)]
        assert small.get_server_info()["num_preemptions"] > 0
    assert got == want


# -------------------------------------------------------------------------- logprobs
def test_requests_without_logprobs_accumulate_none_in_a_mixed_batch(tiny_llama):
    with Engine(str(tiny_llama), random_seed=0) as llm:
        seqs = _captured_seqs(llm)
        outs = llm.generate(["one two", "three four"], {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True},
                            return_logprob=[True, False], top_logprobs_num=[2, 0])
    asked, not_asked = seqs
    assert len(asked.output_token_logprobs) == 6 and len(asked.output_top_logprobs) == 6
    assert not_asked.output_token_logprobs == [] and not_asked.output_top_logprobs == []
    assert "output_token_logprobs" in outs[0]["meta_info"] and "output_token_logprobs" not in outs[1]["meta_info"]


def test_sampler_computes_logprobs_only_for_the_rows_that_asked():
    sampler = Sampler(V, [2], torch.device("cpu"), 0)
    seqs = [Sequence(rid=str(i), prompt_ids=[1], params=SamplingParams(temperature=0), emit=lambda o: None,
                     logprob=LogprobRequest(i == 1, 0, 2 if i == 1 else 0)) for i in range(3)]
    logits = torch.randn(3, V)
    result = sampler(logits.clone(), seqs)
    assert result.logprobs[0] is None and result.logprobs[2] is None
    assert abs(result.logprobs[1] - torch.log_softmax(logits[1], -1).max().item()) < 1e-6
    assert result.top[0] is None and len(result.top[1]) == 2


# -------------------------------------------------------------------------- tied LM head
class _RecordAllocations(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.empty, torch.ops.aten.empty_strided):
            self.shapes.append(tuple(out.shape))
        return out


def test_tied_lm_head_shares_the_embedding_without_allocating_a_vocab_by_hidden_tensor(tiny_llama):
    cfg = ModelConfig.from_folder(tiny_llama)
    assert cfg.tie_word_embeddings
    model = LlamaForCausalLM(cfg, torch.device("cpu"))
    with _RecordAllocations() as rec:
        model.finalize()
    assert (cfg.vocab_size, cfg.hidden_size) not in rec.shapes
    assert model._head.weight is model.embed_tokens.weight
