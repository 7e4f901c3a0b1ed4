"""Each Triton kernel against its plain-torch reference (nbengine.kernels.reference).

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here before they are
imported) on small shapes; on a GPU the same tests run compiled, on larger shapes and in bfloat16
too. Inputs are fresh random data; outputs are poisoned first so unwritten rows show up.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # conftest sets it too: it must precede importing triton
pytest.importorskip("triton")

from nbengine.kernels import reference as ref  # noqa: E402
from nbengine.kernels.activation import silu_and_mul  # noqa: E402
from nbengine.kernels.decode_attention import decode_attention  # noqa: E402
from nbengine.kernels.extend_attention import extend_attention  # noqa: E402
from nbengine.kernels.norm import add_rms_norm  # noqa: E402
from nbengine.kernels.rope_store import rope_store, store_kv  # noqa: E402

DEV = torch.device("cuda" if CUDA else "cpu")
# the interpreter multiplies bfloat16 matrices wrongly (Triton 3.9): attention runs float16/32 there
ATTN_DTYPES = [torch.bfloat16, torch.float16, torch.float32] if CUDA else [torch.float16, torch.float32]
ALL_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}


def elem_tol(dtype: torch.dtype) -> float:
    """Element-wise kernels round like their references: a quarter of the attention bound, except
    bfloat16 in the interpreter, whose float32 -> bfloat16 casts truncate instead of rounding."""
    return TOL[dtype] if dtype == torch.bfloat16 and not CUDA else TOL[dtype] / 4


def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "NaN in the kernel's output"
    return ((out.float() - want.float()).norm() / want.float().norm().clamp_min(1e-6)).item()


def poison(t: torch.Tensor) -> torch.Tensor:
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7)


# ------------------------------------------------------------------ element-wise
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("hidden", [64, 96])
def test_add_rms_norm_matches_reference_and_updates_the_residual(dtype, hidden):
    rows = 300 if CUDA else 5
    x, res = torch.randn(2, rows, hidden, device=DEV).to(dtype)
    w = (1 + 0.3 * torch.randn(hidden, device=DEV)).to(dtype)
    want, want_res = ref.add_rms_norm(x, res, w, 1e-5)
    got, got_res = add_rms_norm(x, res.clone(), w, 1e-5)
    assert rel_err(got_res, want_res) <= elem_tol(dtype)
    assert rel_err(got, want) <= elem_tol(dtype)
    alone, same = add_rms_norm(x, None, w, 1e-5)  # first layer: no residual yet
    assert same is x and rel_err(alone, ref.rms_norm(x, w, 1e-5)) <= elem_tol(dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("inter", [40, 128])
def test_silu_and_mul_matches_reference(dtype, inter):
    gu = torch.randn(257 if CUDA else 3, 2 * inter, device=DEV).to(dtype)
    assert rel_err(silu_and_mul(gu), ref.silu_and_mul(gu)) <= elem_tol(dtype)


def _cos_sin(positions: int, head_dim: int) -> torch.Tensor:
    from nbengine.layers.rotary import Rotary

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    return Rotary(head_dim, positions, 500000.0, scaling, DEV).cos_sin


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 64), (8, 1, 128), (2, 2, 64), (14, 2, 64)])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_rope_store_rotates_q_and_writes_k_v_to_their_slots(dtype, heads, kv_heads, head_dim, qk_norm):
    t, slots_total = (200, 512) if CUDA else (5, 24)
    cos_sin = _cos_sin(4096, head_dim)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim, device=DEV).to(dtype)
    positions = torch.randint(0, 4096, (t,), device=DEV, dtype=torch.int32)
    slots = torch.randperm(slots_total, device=DEV)[:t].to(torch.int32)
    slots[1] = -1  # a padded row: writes nothing
    qn = (1 + 0.3 * torch.randn(head_dim, device=DEV)).to(dtype) if qk_norm else None
    kn = (1 + 0.3 * torch.randn(head_dim, device=DEV)).to(dtype) if qk_norm else None
    kv_want = torch.randn(slots_total, 2, kv_heads, head_dim, device=DEV).to(dtype)
    kv_got = kv_want.clone()
    q_want = qkv.clone()
    keep = slots >= 0
    valid = q_want[keep]
    ref.rope_store(valid, ref.cis_from_cos_sin(cos_sin, positions[keep]), kv_want, slots[keep], heads, kv_heads,
                   head_dim, qn, kn, 1e-6)
    q_got = qkv.clone()
    rope_store(q_got, positions, cos_sin, kv_got, slots, heads, kv_heads, head_dim, qn, kn, 1e-6)
    q_end = heads * head_dim
    assert rel_err(q_got[keep, :q_end], valid[:, :q_end]) <= elem_tol(dtype)
    assert rel_err(kv_got, kv_want) <= elem_tol(dtype)  # untouched slots compared too


def test_store_kv_writes_by_slot_mapping_and_skips_negative_slots():
    kv = torch.randn(40, 2, 2, 64, device=DEV)
    k, v = torch.randn(2, 6, 2 * 64, device=DEV)
    slots = torch.tensor([3, 17, -1, 0, 39, 16], device=DEV, dtype=torch.int32)
    want = kv.clone()
    keep = slots >= 0
    ref.store_kv(k[keep], v[keep], want, slots[keep])
    store_kv(k, v, kv, slots)
    assert torch.equal(kv, want)


# ------------------------------------------------------------------ attention
def _paged_batch(q_lens, seq_lens, heads, kv_heads, head_dim, page_size, dtype, width_extra=3):
    """A ragged batch whose pages are scattered over a shuffled pool; the new K/V are already stored."""
    pages_per = [-(-n // page_size) for n in seq_lens]
    num_pages = sum(pages_per) + 2
    order = torch.randperm(num_pages - 1, device=DEV)[: sum(pages_per)] + 1  # page 0 stays scratch
    width = max(pages_per) + width_extra  # wider than needed: the kernels must stop at seq_len
    table = torch.full((len(seq_lens), width), 10**6, dtype=torch.int32, device=DEV)  # poison beyond
    at = 0
    for b, np_ in enumerate(pages_per):
        table[b, :np_] = order[at:at + np_].to(torch.int32)
        at += np_
    kv = torch.randn(num_pages * page_size, 2, kv_heads, head_dim, device=DEV).to(dtype)
    q = torch.randn(sum(q_lens), heads * head_dim, device=DEV).to(dtype)
    q_starts = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32, device=DEV)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    stride = torch.tensor([width], dtype=torch.int32, device=DEV)
    return q, kv, table, stride, lens, q_starts


def _reference(q, kv, table, lens, q_starts, heads, head_dim, page_size):
    return ref.paged_attention(q.view(-1, heads, head_dim), kv, table, lens, q_starts, page_size).view(q.shape[0], -1)


# (heads, kv heads, head dim): GQA groups 1, 4, 8, 2 and 7 (Qwen2.5-0.5B); fewer in the interpreter
GQA = [(8, 8, 64), (8, 2, 64), (8, 1, 128), (4, 2, 128), (14, 2, 64)] if CUDA else [(4, 4, 64), (8, 1, 128), (14, 2, 64)]


@pytest.mark.parametrize("dtype", ATTN_DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", GQA)
@pytest.mark.parametrize("page_size,splits", [(1, 1), (1, 3), (16, 1), (16, 3)] if CUDA else [(1, 1), (16, 3)])
def test_decode_attention_matches_reference_on_ragged_paged_batches(dtype, heads, kv_heads, head_dim, page_size,
                                                                    splits):
    seq_lens = [1, 16, 17, 700, 33, 2048] if CUDA else [1, 16, 17, 40]
    q, kv, table, stride, lens, q_starts = _paged_batch([1] * len(seq_lens), seq_lens, heads, kv_heads, head_dim,
                                                        page_size, dtype)
    out = poison(torch.empty_like(q))
    decode_attention(q, kv, table, stride, lens, out, page_size, splits)
    want = _reference(q, kv, table, lens, q_starts, heads, head_dim, page_size)
    assert rel_err(out, want) <= TOL[dtype]


def test_decode_attention_gives_zeros_for_padded_rows_with_no_context():
    q, kv, table, stride, lens, _ = _paged_batch([1, 1], [5, 9], 4, 2, 64, 16, torch.float32)
    lens[1] = 0  # a CUDA-graph padding row
    out = poison(torch.empty_like(q))
    decode_attention(q, kv, table, stride, lens, out, 16, 4)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and not torch.isnan(out).any()


@pytest.mark.parametrize("dtype", ATTN_DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", GQA)
@pytest.mark.parametrize("page_size", [1, 16])
def test_extend_attention_reads_the_cached_prefix_and_is_causal_over_new_tokens(dtype, heads, kv_heads, head_dim,
                                                                                page_size):
    # (new tokens, context): a decode row first (the extend kernel skips it), a fresh prompt, chunked
    # prefills whose prefix ends mid-page and on a page boundary
    if CUDA:
        rows = [(1, 50), (300, 300), (129, 129 + 77), (64, 64 + 256), (1000, 1500), (5, 16 + 5)]
    else:
        rows = [(1, 9), (7, 7), (5, 5 + 17), (3, 16 + 3)]
    q_lens, seq_lens = [n for n, _ in rows], [c for _, c in rows]
    q, kv, table, stride, lens, q_starts = _paged_batch(q_lens, seq_lens, heads, kv_heads, head_dim, page_size, dtype)
    out = poison(torch.empty_like(q))
    extend_attention(q, kv, table, stride, lens, q_starts, out, page_size, 1, len(rows) - 1, max(q_lens[1:]))
    want = _reference(q, kv, table, lens, q_starts, heads, head_dim, page_size)
    assert torch.isnan(out[0]).all()  # row 0 (the decode) belongs to the decode kernel
    assert rel_err(out[1:], want[1:]) <= TOL[dtype]

