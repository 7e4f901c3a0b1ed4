"""M-RoPE (Qwen2-VL's 3-D rotary): the torch reference against transformers, the Triton kernel against
the reference (in Triton's interpreter on CPU, compiled on a GPU)."""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede importing triton

from nbengine.kernels import reference as ref  # noqa: E402
from nbengine.layers.rotary import Rotary  # noqa: E402

DEV = torch.device("cuda" if CUDA else "cpu")
SECTION = [4, 6, 6]  # head_dim 32: 16 pairs


def _positions3(t: int) -> torch.Tensor:
    """Text positions (three equal rows) around an image's grid (rows differ)."""
    text = torch.arange(5).expand(3, 5)
    hh, ww = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
    image = torch.stack([torch.full((12,), 5), 5 + hh.flatten(), 5 + ww.flatten()])
    after = (torch.arange(t - 17) + 9).expand(3, t - 17)
    return torch.cat([text, image, after], dim=1).to(DEV)


def _rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    return ((out.float() - want.float()).norm() / want.float().norm()).item()


def test_mrope_reference_matches_transformers_on_the_interleaved_layout():
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb as hf_apply

    d, heads, t, theta = 32, 2, 20, 10000.0
    pos3 = _positions3(t)
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    freqs = pos3[..., None].double().cpu() * inv  # [3, T, d/2], HF: each section takes its row
    freqs = torch.cat([m[i % 3] for i, m in enumerate(freqs.split(SECTION, dim=-1))], dim=-1)
    emb = torch.cat([freqs, freqs], dim=-1)
    q = torch.randn(1, heads, t, d, dtype=torch.float64)
    want, _ = hf_apply(q, q, emb.cos()[None], emb.sin()[None])  # rotate-half layout
    table = Rotary(d, 64, theta, {"type": "mrope", "mrope_section": SECTION}, torch.device("cpu"))
    cis = ref.mrope_cis_from_cos_sin(table.cos_sin, pos3.cpu(), SECTION)
    ours = q[0].transpose(0, 1).float().contiguous()  # [T, H, d] rotate-half
    ours = ours.view(t, heads, 2, d // 2).transpose(2, 3).reshape(t, heads, d).contiguous()  # -> interleaved
    ref.apply_rotary_(ours, cis)
    want_i = want[0].transpose(0, 1).float().view(t, heads, 2, d // 2).transpose(2, 3).reshape(t, heads, d)
    assert torch.allclose(ours, want_i, atol=1e-5)
    step = table.for_step(pos3[0].cpu(), pos3.cpu(), SECTION)  # the torch path's StepRope
    assert torch.allclose(step.cis, cis)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_store_kernel_turns_each_pair_by_its_mrope_section(dtype):
    pytest.importorskip("triton")
    from nbengine.kernels.rope_store import rope_store

    heads, kv_heads, d, t, slots_total = 4, 2, 32, 20, 40
    cos_sin = Rotary(d, 64, 10000.0, None, DEV).cos_sin
    pos3 = _positions3(t).to(torch.int32)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * d, device=DEV).to(dtype)
    slots = torch.randperm(slots_total, device=DEV)[:t].to(torch.int32)
    kv_want = torch.randn(slots_total, 2, kv_heads, d, device=DEV).to(dtype)
    kv_got = kv_want.clone()
    q_want, q_got = qkv.clone(), qkv.clone()
    ref.rope_store(q_want, ref.mrope_cis_from_cos_sin(cos_sin, pos3, SECTION), kv_want, slots, heads, kv_heads, d)
    rope_store(q_got, pos3[0], cos_sin, kv_got, slots, heads, kv_heads, d, mrope_positions=pos3, mrope_section=SECTION)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5  # the interpreter truncates bfloat16 casts
    assert _rel_err(q_got[:, : heads * d], q_want[:, : heads * d]) <= tol
    assert _rel_err(kv_got, kv_want) <= tol
    # the rows differ only on the image's tokens: plain 1-D rope there would be wrong
    plain = qkv.clone()
    ref.rope_store(plain, ref.cis_from_cos_sin(cos_sin, pos3[0]), kv_want.clone(), slots, heads, kv_heads, d)
    assert not torch.allclose(plain[5:17, : heads * d].float(), q_want[5:17, : heads * d].float(), atol=0.1)
