"""Offline throughput: the same prompts through nbengine, transformers' generate and llama.cpp.

    python benchmarks/offline_throughput.py      # the whole comparison: 1x128, 32x64, 64x128, best of 3
    python benchmarks/offline_throughput.py --backend nbengine,hf --num-prompts 1 --output-len 128 --repeat 1
    python benchmarks/offline_throughput.py --workload shared-prefix,constrained   # engine features (see
                                                                                   # engine_features.py)

Prints output tok/s per backend and nbengine's ratios to each peer, with the device, plus
``Engine()`` start and the first token of a 30-token prompt; writes JSON next to it.
Backends: ``nbengine`` (the default CPU path: quantized for the GGUF default model),
``nbengine-f32`` (``quantization=None``: exact float32), ``hf`` (transformers, float32, padded
batch ``generate``), ``llamacpp`` (llama-cpp-python on the same GGUF, one prompt at a time; built
and cached on first use, see ``llamacpp_peer.py``). Runs alternate between backends and each
keeps its best (shared CPUs are noisy). Prompts are natural chat prompts (default, mixed
lengths) or random token ids of ``--input-len`` tokens; generation uses ``ignore_eos`` so every
request makes exactly ``--output-len`` tokens. Greedy decoding.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis to a child.",
    "List three uses of Python in science.", "Why is the sky blue?", "Give me a recipe for pancakes.",
    "What is a prime number? Give examples.", "Summarize the plot of Hamlet in two sentences.",
    "How do vaccines work?", "Translate 'good morning' into Spanish, French and German.",
    "What are the benefits of regular exercise?", "Describe a cat to someone who has never seen one.",
    "What is the difference between weather and climate?", "Suggest a name for a coffee shop.",
    "How does a rainbow form?", "Write a short poem about autumn leaves falling in the park.",
]


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
        else:
            name = platform.processor() or platform.machine()
    except OSError:
        name = platform.processor() or platform.machine()
    return f"{name} ({os.cpu_count()} cores)"


def make_prompts(chat_ids, n: int, input_len: int | None, vocab: int, seed: int) -> list[list[int]]:
    """``chat_ids(question)``: the question's chat-templated token ids."""
    rng = random.Random(seed)
    if input_len:
        return [[rng.randrange(100, vocab - 100) for _ in range(input_len)] for _ in range(n)]
    return [chat_ids(QUESTIONS[i % len(QUESTIONS)]) for i in range(n)]


def run_nbengine(args, prompts: list[list[int]], quantization: str | None = "auto") -> dict:
    from nbengine.engine import Engine

    t0 = time.perf_counter()
    llm = Engine(args.model, dtype=args.dtype, device=args.device, random_seed=0, quantization=quantization,
                 max_running_requests=max(args.num_prompts, 1))
    start_s = time.perf_counter() - t0
    sp = {"temperature": 0, "max_new_tokens": args.output_len, "ignore_eos": True}
    llm.generate(input_ids=prompts[0], sampling_params={**sp, "max_new_tokens": 4})  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(input_ids=prompts, sampling_params=sp)
    wall = time.perf_counter() - t0
    llm.shutdown()
    n_out = sum(o["meta_info"]["completion_tokens"] for o in outs)
    return {"backend": "nbengine" if quantization else "nbengine-f32", "output_tokens": n_out, "seconds": wall,
            "tok_s": n_out / wall, "engine_start_s": start_s}


def nbengine_first_token_s(args, prompt: list[int], tries: int = 5) -> float:
    """Seconds from ``generate(stream=True)`` to the first chunk of a greedy request (best of ``tries``)."""
    from nbengine.engine import Engine

    with Engine(args.model, dtype=args.dtype, device=args.device, random_seed=0) as llm:
        sp = {"temperature": 0, "max_new_tokens": 2, "ignore_eos": True}
        llm.generate(input_ids=prompt, sampling_params=sp)
        best = float("inf")
        for _ in range(tries):
            t0 = time.perf_counter()
            for _chunk in llm.generate(input_ids=prompt, sampling_params=sp, stream=True):
                best = min(best, time.perf_counter() - t0)
                break
        return best


def run_backend(name: str, args, prompts: list[list[int]], model_dir: str, gguf: str | None) -> dict:
    if name == "nbengine":
        return run_nbengine(args, prompts)
    if name == "nbengine-f32":
        return run_nbengine(args, prompts, quantization=None)
    if name == "hf":
        return run_hf(args, prompts, model_dir)
    import llamacpp_peer

    return llamacpp_peer.run(gguf, prompts, args.output_len, args.threads)


def gguf_of(model: str | None) -> str | None:
    if model is None:
        from nbengine.loader.default_model import find_default_gguf

        return str(find_default_gguf())
    return model if str(model).endswith(".gguf") else None


def run_hf(args, prompts: list[list[int]], model_dir: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": torch.float32}[args.dtype]  # HF: float32 on CPU
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device if args.device != "auto" else "cpu")
    model.eval()
    pad = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kw = dict(do_sample=False, max_new_tokens=args.output_len, min_new_tokens=args.output_len, pad_token_id=pad)
    with torch.inference_mode():
        model.generate(input_ids=ids[:1, -8:], attention_mask=mask[:1, -8:], **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, **kw)
        wall = time.perf_counter() - t0
    n_out = (out.shape[1] - width) * out.shape[0]
    return {"backend": "hf", "output_tokens": n_out, "seconds": wall, "tok_s": n_out / wall}


BACKENDS = ("nbengine", "nbengine-f32", "hf", "llamacpp")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="nbengine,hf,llamacpp",
                    help=f"comma-separated, from {', '.join(BACKENDS)} (default: nbengine,hf,llamacpp)")
    ap.add_argument("--model", default=None, help="model folder / .gguf (default: the embedded SmolLM2-135M)")
    ap.add_argument("--num-prompts", type=int, default=None, help="default: 1x128, 32x64 and 64x128")
    ap.add_argument("--output-len", type=int, default=None)
    ap.add_argument("--input-len", type=int, default=None, help="random-token prompts of this length")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp threads")
    ap.add_argument("--repeat", type=int, default=3,
                    help="run each backend this many times, alternating, and report the best run "
                         "(shared CPUs are noisy: the best run is the least disturbed one)")
    ap.add_argument("--no-latency", action="store_true", help="skip the first-token measurement")
    ap.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    ap.add_argument("--workload", default=None,
                    help="instead of the peer comparison: shared-prefix and/or constrained (comma-separated), "
                         "nbengine only (see engine_features.py)")
    ap.add_argument("--prefix-len", type=int, default=1000, help="shared-prefix: tokens of the shared prefix")
    args = ap.parse_args()
    if args.workload:
        return run_workloads(args)
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        ap.error(f"unknown backend(s) {unknown}; choose from {BACKENDS}")

    from nbengine.loader.resolve import resolve_model_path
    from nbengine.tokenizer import Tokenizer

    model_dir = str(resolve_model_path(args.model))
    gguf = gguf_of(args.model)
    if "llamacpp" in backends and gguf is None:
        ap.error("the llamacpp backend needs a GGUF model (the default model, or --model some.gguf)")
    tok = Tokenizer(model_dir)

    def chat_ids(question: str) -> list[int]:
        return tok.apply_chat_template([{"role": "user", "content": question}], tokenize=True)

    shapes = [(args.num_prompts, args.output_len or 64)] if args.num_prompts else [(1, 128), (32, 64), (64, 128)]
    rows = []
    for num, out_len in shapes:
        a = argparse.Namespace(**{**vars(args), "num_prompts": num, "output_len": out_len})
        prompts = make_prompts(chat_ids, num, args.input_len, tok.vocab_size, seed=0)
        res: dict[str, dict] = {}
        for _ in range(args.repeat):
            for b in backends:
                r = run_backend(b, a, prompts, model_dir, gguf)
                print(f"  {b:12s} {num:3d} x {out_len:4d}: {r['tok_s']:8.1f} output tok/s "
                      f"({r['seconds']:.2f} s)", file=sys.stderr)
                runs = res.get(b, {}).get("all_tok_s", []) + [r["tok_s"]]
                if b not in res or r["tok_s"] > res[b]["tok_s"]:
                    res[b] = r
                res[b]["all_tok_s"] = runs
        ratios = {f"nbengine/{b}": res["nbengine"]["tok_s"] / res[b]["tok_s"]
                  for b in backends if b != "nbengine" and "nbengine" in res}
        rows.append({"num_prompts": num, "output_len": out_len, "prompt_tokens": sum(len(p) for p in prompts),
                     **res, "ratios": ratios})
    latency = {}
    if not args.no_latency and "nbengine" in backends:
        prompt30 = (chat_ids(QUESTIONS[0]) * 30)[:30]
        latency["nbengine_first_token_s"] = nbengine_first_token_s(args, prompt30)
        starts = [r["nbengine"]["engine_start_s"] for r in rows]
        latency["nbengine_engine_start_s"] = min(starts)
        if "llamacpp" in backends:
            import llamacpp_peer

            latency["llamacpp_first_token_s"] = llamacpp_peer.first_token_s(gguf, prompt30, args.threads)
    dev = device_name(args.device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\ndevice: {dev}   model: {model_dir}   dtype: {args.dtype}   load average (1 min): {load:.1f}"
          f"   OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    ratio_names = list(rows[0]["ratios"]) if rows else []
    print(f"{'prompts x out':>14} | " + " | ".join(f"{b:>12}" for b in backends)
          + "".join(f" | {n:>18}" for n in ratio_names))
    for r in rows:
        cells = " | ".join(f"{r[b]['tok_s']:8.1f} t/s" for b in backends)
        ratios = "".join(f" | {r['ratios'][n]:17.2f}x" for n in ratio_names)
        print(f"{r['num_prompts']:>6} x {r['output_len']:<5} | {cells}{ratios}")
    for k, v in latency.items():
        print(f"{k}: {v * 1e3:.0f} ms")
    if args.repeat > 1:
        print(f"(best of {args.repeat} alternating runs per backend; all runs are in {args.out})")
    Path(args.out).write_text(json.dumps({"device": dev, "cpu_flags": cpu_flags(), "dtype": args.dtype,
                                          "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
                                          "load_average_1min": load,
                                          "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                                          "rows": rows, "latency": latency}, indent=2))


def run_workloads(args) -> None:
    import engine_features

    from nbengine.loader.resolve import resolve_model_path
    from nbengine.tokenizer import Tokenizer

    names = [w.strip() for w in args.workload.split(",") if w.strip()]
    if any(n not in ("shared-prefix", "constrained") for n in names):
        raise SystemExit(f"unknown workload in {names}; choose shared-prefix and/or constrained")
    args.num_prompts = args.num_prompts or 64
    args.output_len = args.output_len or 64
    tok = Tokenizer(resolve_model_path(args.model))
    fns = {"shared-prefix": engine_features.shared_prefix, "constrained": engine_features.constrained}
    results = {n: fns[n](args, tok, QUESTIONS) for n in names}
    dev = device_name(args.device)
    print(f"\ndevice: {dev}   {args.num_prompts} prompts x {args.output_len} new tokens   best of {args.repeat}")
    for n, r in results.items():
        print(engine_features.report(n, r))
    out = Path(args.out).with_name(Path(args.out).stem + "_features.json")
    out.write_text(json.dumps({"device": dev, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
                               "results": results}, indent=2))


def cpu_flags() -> list[str]:
    """The SIMD flags of this CPU that matter for the kernels compared here."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if f.startswith(("avx", "fma", "f16c", "amx")) or f in ("vnni",))


if __name__ == "__main__":
    main()
