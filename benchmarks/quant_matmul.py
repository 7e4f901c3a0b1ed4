"""The candidate CPU matmuls for the quantized path, on the default model's layer shapes.

    python benchmarks/quant_matmul.py --rows 1 32 64 --threads 1

For each candidate and row count, the time of one decode step's linear layers (30 layers x
qkv 576->960, o 576->576, gate_up 576->3072, down 1536->576, plus the tied LM head 576->49152),
each layer with its own weights so they stream from memory as in a real step. Candidates:
oneDNN float32 (today's path), torch's weight-only int8 (``_weight_int8pack_mm``, float32 and
bf16 activations), dynamic W8A8 (``quantized::linear_dynamic``, fbgemm/x86), bf16 ``F.linear``,
``_weight_int4pack_mm_for_cpu`` (bf16 activations), and ours (``QuantLinear``: q4_1 body, q8_0 head).
Runs alternate between candidates; the best of ``--repeat`` is printed, in milliseconds.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F

SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]
HEAD = (576, 49152)
LAYERS = 30


def _int8_weight(w):
    scale = w.abs().amax(1) / 127
    return torch.round(w / scale[:, None]).to(torch.int8), scale


def _fbgemm(w):
    scale = w.abs().amax(1) / 127
    qw = torch.quantize_per_channel(w, scale.double(), torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(qw, None)


def _int4pack(w):
    n, k = w.shape
    g = w.view(n, k // 32, 32)
    lo, hi = g.amin(-1), g.amax(-1)
    sc = (hi - lo).clamp(min=1e-8) / 15
    q = torch.clamp(torch.round((g - lo[..., None]) / sc[..., None]), 0, 15).to(torch.int32).view(n, k)
    sz = torch.stack([sc, lo + 8 * sc], -1).transpose(0, 1).contiguous().bfloat16()
    return torch._convert_weight_to_int4pack_for_cpu(q, 1), sz


def candidates():
    from nbengine.layers.quant_linear import QuantLinear

    def make(name, w, head):
        if name == "onednn_f32":
            return lambda x: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        if name == "int8pack_f32":
            q, s = _int8_weight(w)
            return lambda x: torch._weight_int8pack_mm(x, q, s)
        if name == "int8pack_bf16":
            q, s = _int8_weight(w)
            s = s.bfloat16()
            return lambda x: torch._weight_int8pack_mm(x.bfloat16(), q, s)
        if name == "w8a8_dynamic":
            packed = _fbgemm(w)
            return lambda x: torch.ops.quantized.linear_dynamic(x, packed, True)
        if name == "bf16_linear":
            wb = w.bfloat16()
            return lambda x: F.linear(x.bfloat16(), wb)
        if name == "int4pack_bf16":
            packed, sz = _int4pack(w)
            return lambda x: torch._weight_int4pack_mm_for_cpu(x.bfloat16(), packed, 32, sz)
        layer = QuantLinear.from_weight("q8_0" if head else "q4_1", w)
        return layer

    return ["onednn_f32", "int8pack_f32", "int8pack_bf16", "w8a8_dynamic", "bf16_linear", "int4pack_bf16",
            "nbengine_q4_1"], make


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 32, 64])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip", nargs="*", default=[], help="candidates to leave out")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    import numba

    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    names, make = candidates()
    names = [n for n in names if n not in args.skip]
    torch.manual_seed(0)
    weights = [[torch.randn(n, k) * 0.02 for k, n in SHAPES] for _ in range(LAYERS)]
    head = torch.randn(HEAD[1], HEAD[0]) * 0.02
    fns = {name: ([[make(name, w, False) for w in layer] for layer in weights], make(name, head, True)) for name in names}
    print(f"threads {args.threads}; ms per decode step's linear layers (best of {args.repeat})")
    print(f"{'rows':>5} | " + " | ".join(f"{n:>14}" for n in names))
    for rows in args.rows:
        xs = {k: torch.randn(rows, k) for k in (576, 1536)}
        best = {n: float("inf") for n in names}
        for _ in range(args.repeat):
            for n in names:
                body, head_fn = fns[n]
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    for layer in body:
                        for (k, _), fn in zip(SHAPES, layer):
                            fn(xs[k])
                    head_fn(xs[576])
                    best[n] = min(best[n], time.perf_counter() - t0)
        print(f"{rows:>5} | " + " | ".join(f"{best[n] * 1e3:14.1f}" for n in names), flush=True)


if __name__ == "__main__":
    main()
