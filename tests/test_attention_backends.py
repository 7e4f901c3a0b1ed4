"""The runner's attention backends and the metadata path of the Triton path, on CPU.

The Triton backend runs here in Triton's interpreter (TRITON_INTERPRET=1, set by conftest):
slow, so the models are tiny and the runs short; on a GPU the same code runs compiled.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from nbengine.batch_buffers import BatchBuffers
from nbengine.batch_plan import BatchPlan
from nbengine.engine import Engine
from nbengine.errors import NBEngineError
from nbengine.kernels import reference as ref

PROMPTS = [[5 + 7 * i + j for j in range(3 + 13 * i)] for i in range(3)]  # 3, 16 and 29 tokens


def _generate(model_dir, backend: str, page_size: int) -> list[dict]:
    sp = {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True}
    # a 12-token budget: prompts are prefilled in chunks, beside running decodes (mixed steps)
    with Engine(str(model_dir), device="cpu", dtype="float32", attention_backend=backend, page_size=page_size,
                chunked_prefill_size=12, max_running_requests=4, skip_tokenizer_init=True, random_seed=0) as llm:
        assert llm.get_server_info()["attention_backend"] == backend
        return llm.generate(input_ids=PROMPTS, sampling_params=sp, return_logprob=True)


@pytest.mark.parametrize("kind,page_size", [("qwen3", 16), ("llama3", 1)])
def test_triton_backend_gives_the_torch_backends_tokens_and_logprobs(tiny_models, kind, page_size):
    pytest.importorskip("triton")
    ours = _generate(tiny_models[kind], "triton", page_size)
    want = _generate(tiny_models[kind], "torch", page_size)
    for a, b in zip(ours, want):
        assert a["output_ids"] == b["output_ids"]
        lp_a = [x[0] for x in a["meta_info"]["output_token_logprobs"]]
        lp_b = [x[0] for x in b["meta_info"]["output_token_logprobs"]]
        assert max(abs(x - y) for x, y in zip(lp_a, lp_b)) < 1e-3


def test_cpu_engine_defaults_to_the_torch_backend(tiny_llama):
    with Engine(str(tiny_llama), device="cpu", skip_tokenizer_init=True, max_total_tokens=256) as llm:
        info = llm.get_server_info()
    assert info["attention_backend"] == "torch" and info["cuda_graph_batch_sizes"] == []


def test_unusable_attention_backends_are_refused_with_what_to_change(tiny_llama, monkeypatch):
    with pytest.raises(ValueError, match="attention_backend must be"):
        Engine(str(tiny_llama), attention_backend="flashinfer")
    with pytest.raises(NBEngineError, match="flash_attn"):
        Engine(str(tiny_llama), device="cpu", attention_backend="flash_attn")
    if pytest.importorskip("triton"):
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="use attention_backend='torch' on CPU"):
            Engine(str(tiny_llama), device="cpu", attention_backend="triton")


def _decode_plan(lens: list[int], page_size: int = 4) -> BatchPlan:
    plan, first = BatchPlan(page_size), 1
    for n in lens:
        pages = list(range(first, first + -(-n // page_size)))
        first += len(pages)
        plan.q_starts.append(len(plan.ids))
        plan.ids.append(n)
        plan.positions.append(n - 1)
        plan.slots.append(pages[(n - 1) // page_size] * page_size + (n - 1) % page_size)
        plan.q_lens.append(1)
        plan.seq_lens.append(n)
        plan.tables.append(pages)
        plan.logits_rows.append(len(plan.ids) - 1)
        plan.sample_rows.append(len(plan.ids) - 1)
    plan.q_starts.append(len(plan.ids))
    plan.num_decodes = len(lens)
    return plan


def test_padded_decode_batches_reuse_the_same_device_addresses():
    """What a CUDA graph relies on: every decode step padded to bs rows reads the same addresses."""
    buf = BatchBuffers(max_tokens=64, max_seqs=8, max_pages=16, page_size=4, dtype=torch.float32,
                       device=torch.device("cpu"))
    a = buf.load(_decode_plan([3, 9]), pad_to=4)
    ptrs = [t.data_ptr() for t in (a.input_ids, a.positions, a.out_slots, a.seq_lens, a.page_table_width,
                                   a.page_table)]
    b = buf.load(_decode_plan([17, 2, 30]), pad_to=4)  # wider page table, more rows
    assert ptrs == [t.data_ptr() for t in (b.input_ids, b.positions, b.out_slots, b.seq_lens, b.page_table_width,
                                           b.page_table)]
    assert b.seq_lens.tolist() == [17, 2, 30, 0] and b.out_slots[3].item() == -1  # padding: no context, no write
    width = b.page_table_width.item()
    assert width == 8 and b.page_table.flatten()[:width * 3].view(3, width)[2, :8].tolist() == list(range(7, 15))
    assert b.q_starts.tolist() == [0, 1, 2, 3, 4]


def _fake_flash_attn() -> types.ModuleType:
    """flash-attn's two paged entry points, written in torch from its documented semantics."""

    def attend(q, k, v, scale):  # q [n, H, D], k/v [L, Hkv, D]; causal, aligned to the end
        n, h, _ = q.shape
        k, v = (x.repeat_interleave(h // x.shape[1], 1).float() for x in (k, v))
        s = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
        pos = torch.arange(k.shape[0] - n, k.shape[0])[:, None]
        s = s.masked_fill(torch.arange(k.shape[0])[None, :] > pos, float("-inf"))
        return torch.einsum("hqk,khd->qhd", s.softmax(-1), v).to(q.dtype)

    def gather(cache, pages, length):
        return cache[pages.long()].flatten(0, 1)[:length]

    def with_kvcache(q, k_cache, v_cache, cache_seqlens, block_table, softmax_scale, causal):
        assert causal and q.shape[1] == 1
        return torch.stack([attend(q[b], gather(k_cache, block_table[b], n), gather(v_cache, block_table[b], n),
                                   softmax_scale) for b, n in enumerate(cache_seqlens.tolist())])

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal, block_table):
        assert causal and cu_q[0] == 0 and cu_k[0] == 0
        outs = []
        for i in range(len(cu_q) - 1):
            n = (cu_k[i + 1] - cu_k[i]).item()
            assert (cu_q[i + 1] - cu_q[i]).item() <= max_q and n <= max_k
            outs.append(attend(q[cu_q[i]:cu_q[i + 1]], gather(k, block_table[i], n), gather(v, block_table[i], n),
                               softmax_scale))
        return torch.cat(outs)

    return types.SimpleNamespace(flash_attn_with_kvcache=with_kvcache, flash_attn_varlen_func=varlen)


def test_flash_attn_backend_passes_decodes_and_extends_as_its_api_expects(monkeypatch):
    from nbengine.layers.flash_attention import FlashAttention

    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_attn())
    h, hk, d, ps = 4, 2, 16, 4
    plan = _decode_plan([5, 11])
    # one prefill chunk of 6 new tokens after a 7-token prefix, on pages 20..23
    plan.q_starts[-1:] = [2]
    plan.ids += [1] * 6
    plan.positions += list(range(7, 13))
    plan.slots += [20 * ps + p for p in range(7, 13)]
    plan.q_lens.append(6)
    plan.seq_lens.append(13)
    plan.tables.append([20, 21, 22, 23])
    plan.q_starts.append(8)
    buf = BatchBuffers(64, 8, 8, ps, torch.float32, torch.device("cpu"), fixed_width=True)
    fb = buf.load(plan)
    kv = torch.randn(30 * ps, 2, hk, d)
    q = torch.randn(8, h * d)
    backend = FlashAttention(h, hk, d)
    backend.prepare(fb)
    out = backend.forward(q, kv, fb)
    want = ref.paged_attention(q.view(8, h, d), kv, fb.page_table, fb.seq_lens, fb.q_starts, ps).view(8, -1)
    assert torch.allclose(out, want, atol=1e-5)
