"""Tensor-parallel benchmark: a Llama-3.1-8B-shaped model (bf16, random weights) at tp 1, 2, 4, 8.

    PYTHONUNBUFFERED=1 python3 benchmarks/tp.py --out "$OUT"        # every tp size the GPUs allow
    python3 benchmarks/tp.py --tiny --tp 1                            # a dry run of the script on CPU

For each tp size, in its own process (so each engine starts on clean GPUs):
  decode    batch-1 decode tok/s after a 128-token prompt (256 new tokens, timed between chunks)
  offline   256 requests, prompt and output lengths U[100, 1024] (seeded), output tok/s
Then the latency of one small all-reduce (a decode step's hidden state, 1 x 4096 bf16) between
2..N GPUs over NCCL, eager and inside a CUDA graph. The peer in the same run is tp 1 (the goals are
ratios to it: decode at tp 2 >= 1.4x, offline >= 1.8x) and transformers' batch-1 decode on one GPU.
NVLink multicast stays off (NCCL_NVLS_ENABLE=0 and friends, set below for every process).
Prints a table and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

# NVLink multicast can take a shared host's GPUs out of service: keep it off here and in every child
os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

SHAPES = {
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                         rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                 rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
}


def write_random_llama(folder: Path, shape: dict, dtype: torch.dtype) -> Path:
    """config.json, random safetensors (one file per few layers) and a word-level tokenizer, fast."""
    from safetensors.torch import save_file

    from benchmarks.random_model import write_tokenizer

    if (folder / "config.json").exists():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    h, inter, d = shape["hidden_size"], shape["intermediate_size"], shape["hidden_size"] // shape["num_attention_heads"]
    hk, v = shape["num_key_value_heads"] * d, shape["vocab_size"]
    gen = torch.Generator().manual_seed(0)

    def rand(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=gen) * 0.02).to(dtype)

    weight_map: dict[str, str] = {}

    def save(tensors: dict[str, torch.Tensor], name: str) -> None:
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})

    save({"model.embed_tokens.weight": rand(v, h), "model.norm.weight": torch.ones(h, dtype=dtype),
          "lm_head.weight": rand(v, h)}, "embed.safetensors")
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        save({p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(hk, h),
              p + "self_attn.v_proj.weight": rand(hk, h), p + "self_attn.o_proj.weight": rand(h, h),
              p + "mlp.gate_proj.weight": rand(inter, h), p + "mlp.up_proj.weight": rand(inter, h),
              p + "mlp.down_proj.weight": rand(h, inter), p + "input_layernorm.weight": torch.ones(h, dtype=dtype),
              p + "post_attention_layernorm.weight": torch.ones(h, dtype=dtype)}, f"layer{i:03d}.safetensors")
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                 "bos_token_id": 1, "eos_token_id": 2,
                                                 "torch_dtype": str(dtype).removeprefix("torch."), **shape}))
    write_tokenizer(tmp, v)
    os.replace(tmp, folder)
    return folder


# ------------------------------------------------------------------------------ one tp size (a child)
def run_one(model: Path, tp: int, tiny: bool, requests: int) -> dict:
    from nbengine import Engine

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"
    t0 = time.perf_counter()
    llm = Engine(str(model), tp_size=tp, dtype=dtype, device=device, quantization=None,
                 context_length=2304 if not tiny else 512, sampling_defaults="openai")
    ready_s = time.perf_counter() - t0
    rng = random.Random(0)
    vocab = llm.get_server_info()["vocab_size"]
    prompt = [rng.randrange(3, vocab) for _ in range(128)]
    new = 256 if not tiny else 32
    decode = []
    for _ in range(3):  # the first run warms up; the best of the other two counts
        stamps = []
        for chunk in llm.generate(input_ids=prompt, sampling_params={"temperature": 0, "max_new_tokens": new,
                                                                     "ignore_eos": True}, stream=True):
            stamps.append((time.perf_counter(), chunk["meta_info"]["completion_tokens"]))
        (t_a, n_a), (t_b, n_b) = stamps[0], stamps[-1]
        decode.append((n_b - n_a) / (t_b - t_a))
    lo, hi = (100, 1024) if not tiny else (8, 64)
    n = requests if not tiny else 16
    ins = [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
    params = [{"temperature": 0, "max_new_tokens": rng.randint(lo, hi), "ignore_eos": True} for _ in range(n)]
    t0 = time.perf_counter()
    outs = llm.generate(input_ids=ins, sampling_params=params)
    wall = time.perf_counter() - t0
    out_tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
    info = llm.get_server_info()
    llm.shutdown()
    return {"tp": tp, "ready_s": round(ready_s, 1), "decode_tok_s": round(max(decode[1:]), 1),
            "offline_out_tok_s": round(out_tokens / wall, 1),
            "offline_total_tok_s": round((out_tokens + sum(map(len, ins))) / wall, 1),
            "offline_requests": n, "offline_s": round(wall, 2), "kv_tokens": info["max_total_num_tokens"],
            "cuda_graph_batch_sizes": len(info["cuda_graph_batch_sizes"])}


def transformers_decode(model: Path, new: int = 256) -> float:
    """The peer: transformers' batch-1 greedy decode on one GPU (bf16, static cache off: its default)."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.bfloat16).to("cuda").eval()
    ids = torch.randint(3, m.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0)).cuda()
    best = 0.0
    for _ in range(2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = m.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        torch.cuda.synchronize()
        best = max(best, (out.shape[1] - ids.shape[1]) / (time.perf_counter() - t0))
    return round(best, 1)


# ------------------------------------------------------------------------------ all-reduce latency
def _allreduce_rank(rank: int, world: int, port: int, hidden: int, results) -> None:
    import datetime

    import torch.distributed as dist

    torch.cuda.set_device(rank)
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=120))
    opts = dist.ProcessGroupNCCL.Options()
    pg = dist.ProcessGroupNCCL(store, rank, world, opts)
    x = torch.ones(1, hidden, dtype=torch.bfloat16, device="cuda")
    for _ in range(50):
        pg.allreduce([x]).wait()
    torch.cuda.synchronize()
    iters = 1000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        pg.allreduce([x]).wait()
    end.record()
    torch.cuda.synchronize()
    eager_us = start.elapsed_time(end) * 1000 / iters
    graph_us = None
    try:  # the all-reduce captured in a CUDA graph, as the decode graphs capture it
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            pg.allreduce([x]).wait()
            torch.cuda.synchronize()
            with torch.cuda.graph(g, stream=s):
                for _ in range(100):
                    pg.allreduce([x]).wait()
        torch.cuda.synchronize()
        start.record()
        for _ in range(iters // 100):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        graph_us = start.elapsed_time(end) * 1000 / iters
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        graph_us = f"failed: {type(e).__name__}: {e}"[:200]
    if rank == 0:
        results.put({"world": world, "bytes": hidden * 2, "eager_us": round(eager_us, 2),
                     "graph_us": graph_us if isinstance(graph_us, str) else round(graph_us, 2)})


def allreduce_latency(world: int, hidden: int = 4096) -> dict:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_allreduce_rank, args=(r, world, port, hidden, results)) for r in range(world)]
    for p in procs:
        p.start()
    out = results.get(timeout=300)
    for p in procs:
        p.join(60)
    return out


# ------------------------------------------------------------------------------ driver
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny model (a CPU dry run of the script)")
    ap.add_argument("--tp", type=str, default=None, help="comma-separated tp sizes (default: 1,2,4,8 up to the GPUs)")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--model-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "nbengine-tp-bench")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child: run one tp size
    ap.add_argument("--no-peer", action="store_true", help="skip transformers' decode")
    args = ap.parse_args()
    shape = "tiny" if args.tiny else "llama-3.1-8b"
    gpus = torch.cuda.device_count()
    model = write_random_llama(args.model_dir / shape, SHAPES[shape],
                               torch.bfloat16 if gpus and not args.tiny else torch.float32)
    if args.one is not None:
        print("RESULT " + json.dumps(run_one(model, args.one, args.tiny, args.requests)), flush=True)
        return
    sizes = [int(x) for x in args.tp.split(",")] if args.tp else [n for n in (1, 2, 4, 8) if n <= max(gpus, 1)]
    device = torch.cuda.get_device_name(0) if gpus else "cpu"
    report: dict = {"device": device, "gpus": gpus, "shape": shape, "date": time.strftime("%Y-%m-%d %H:%M UTC",
                    time.gmtime()), "command": " ".join(sys.argv), "runs": [], "allreduce": []}
    for tp in sizes:
        done = subprocess.run([sys.executable, __file__, "--one", str(tp), "--model-dir", str(args.model_dir),
                               "--requests", str(args.requests)] + (["--tiny"] if args.tiny else []),
                              capture_output=True, text=True)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        if done.returncode or not lines:
            print(f"tp {tp} failed:\n{done.stderr[-3000:]}", flush=True)
            report["runs"].append({"tp": tp, "error": done.stderr[-1000:]})
            continue
        report["runs"].append(json.loads(lines[-1].removeprefix("RESULT ")))
        print(report["runs"][-1], flush=True)
    if gpus and not args.tiny and not args.no_peer:
        try:
            report["transformers_decode_tok_s"] = transformers_decode(model)
        except Exception as e:  # noqa: BLE001
            report["transformers_decode_tok_s"] = f"failed: {e}"[:200]
    for world in (w for w in (2, 4, 8) if w <= gpus):
        try:
            report["allreduce"].append(allreduce_latency(world))
        except Exception as e:  # noqa: BLE001
            report["allreduce"].append({"world": world, "error": str(e)[:300]})
    base = next((r for r in report["runs"] if r.get("tp") == 1 and "error" not in r), None)
    print(f"\n{device} x{gpus}, {shape}")
    print(f"{'tp':>3} {'ready s':>8} {'decode tok/s':>13} {'x tp1':>6} {'offline out tok/s':>18} {'x tp1':>6}")
    for r in report["runs"]:
        if "error" in r:
            print(f"{r['tp']:>3} failed")
            continue
        dx = r["decode_tok_s"] / base["decode_tok_s"] if base else float("nan")
        ox = r["offline_out_tok_s"] / base["offline_out_tok_s"] if base else float("nan")
        r["decode_x_tp1"], r["offline_x_tp1"] = round(dx, 2), round(ox, 2)
        print(f"{r['tp']:>3} {r['ready_s']:>8} {r['decode_tok_s']:>13} {dx:>6.2f} {r['offline_out_tok_s']:>18} {ox:>6.2f}")
    if "transformers_decode_tok_s" in report:
        print(f"transformers batch-1 decode (1 GPU): {report['transformers_decode_tok_s']} tok/s")
    for a in report["allreduce"]:
        print(f"all-reduce {a}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tp.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
