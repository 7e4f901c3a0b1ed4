"""Offline throughput: the same prompts through nbengine and through transformers' generate.

    python benchmarks/offline_throughput.py                       # both backends, 32 x 64 and 64 x 128
    python benchmarks/offline_throughput.py --backend nbengine --num-prompts 1 --output-len 128

Prints output tok/s per backend and the ratio, with the device, and writes JSON next to it.
Prompts are either natural chat prompts (default, mixed lengths) or random token ids of
``--input-len`` tokens; generation uses ``ignore_eos`` so every request makes exactly
``--output-len`` tokens. Greedy decoding, float32 on CPU by default.
"""

from __future__ import annotations

import argparse
import json
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
    import os

    return f"{name} ({os.cpu_count()} cores)"


def make_prompts(chat_ids, n: int, input_len: int | None, vocab: int, seed: int) -> list[list[int]]:
    """``chat_ids(question)``: the question's chat-templated token ids."""
    rng = random.Random(seed)
    if input_len:
        return [[rng.randrange(100, vocab - 100) for _ in range(input_len)] for _ in range(n)]
    return [chat_ids(QUESTIONS[i % len(QUESTIONS)]) for i in range(n)]


def run_nbengine(args, prompts: list[list[int]]) -> dict:
    from nbengine.engine import Engine

    t0 = time.perf_counter()
    llm = Engine(args.model, dtype=args.dtype, device=args.device, random_seed=0,
                 max_running_requests=max(args.num_prompts, 1))
    start_s = time.perf_counter() - t0
    sp = {"temperature": 0, "max_new_tokens": args.output_len, "ignore_eos": True}
    llm.generate(input_ids=prompts[0], sampling_params={**sp, "max_new_tokens": 4})  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(input_ids=prompts, sampling_params=sp)
    wall = time.perf_counter() - t0
    llm.shutdown()
    n_out = sum(o["meta_info"]["completion_tokens"] for o in outs)
    return {"backend": "nbengine", "output_tokens": n_out, "seconds": wall, "tok_s": n_out / wall,
            "engine_start_s": start_s}


def run_hf(args, prompts: list[list[int]], model_dir: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": torch.float32}[args.dtype]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["nbengine", "hf", "both"], default="both")
    ap.add_argument("--model", default=None, help="model folder / .gguf (default: the embedded SmolLM2-135M)")
    ap.add_argument("--num-prompts", type=int, default=None, help="default: the 32x64 and 64x128 pair")
    ap.add_argument("--output-len", type=int, default=None)
    ap.add_argument("--input-len", type=int, default=None, help="random-token prompts of this length")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each backend this many times, alternating, and report the best run "
                         "(shared CPUs are noisy: the best run is the least disturbed one)")
    ap.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = ap.parse_args()

    from nbengine.loader.resolve import resolve_model_path
    from nbengine.tokenizer import Tokenizer

    model_dir = str(resolve_model_path(args.model))
    tok = Tokenizer(model_dir)
    def chat_ids(question: str) -> list[int]:
        return tok.apply_chat_template([{"role": "user", "content": question}], tokenize=True)

    shapes = [(args.num_prompts, args.output_len)] if args.num_prompts else [(32, 64), (64, 128)]
    backends = ["nbengine", "hf"] if args.backend == "both" else [args.backend]
    rows = []
    for num, out_len in shapes:
        a = argparse.Namespace(**{**vars(args), "num_prompts": num, "output_len": out_len or 64})
        prompts = make_prompts(chat_ids, num, args.input_len, tok.vocab_size, seed=0)
        res: dict[str, dict] = {}
        for _ in range(args.repeat):
            for b in backends:
                r = run_nbengine(a, prompts) if b == "nbengine" else run_hf(a, prompts, model_dir)
                print(f"  {b:9s} {num:3d} x {a.output_len:4d}: {r['tok_s']:8.1f} output tok/s "
                      f"({r['seconds']:.2f} s)", file=sys.stderr)
                runs = res.get(b, {}).get("all_tok_s", []) + [r["tok_s"]]
                if b not in res or r["tok_s"] > res[b]["tok_s"]:
                    res[b] = r
                res[b]["all_tok_s"] = runs
        ratio = res["nbengine"]["tok_s"] / res["hf"]["tok_s"] if len(res) == 2 else None
        rows.append({"num_prompts": num, "output_len": a.output_len,
                     "prompt_tokens": sum(len(p) for p in prompts), **{f"{b}": r for b, r in res.items()},
                     "ratio": ratio})
    dev = device_name(args.device)
    print(f"\ndevice: {dev}   model: {model_dir}   dtype: {args.dtype}")
    print(f"{'prompts x out':>14} | " + " | ".join(f"{b:>12}" for b in backends) + (" |  ratio" if len(backends) == 2 else ""))
    for r in rows:
        cells = " | ".join(f"{r[b]['tok_s']:8.1f} t/s" for b in backends)
        ratio = f" | {r['ratio']:5.2f}x" if r["ratio"] else ""
        print(f"{r['num_prompts']:>6} x {r['output_len']:<5} | {cells}{ratio}")
    if args.repeat > 1:
        print(f"(best of {args.repeat} alternating runs per backend; all runs are in {args.out})")
    Path(args.out).write_text(json.dumps({"device": dev, "dtype": args.dtype, "date": time.strftime("%Y-%m-%d"),
                                          "command": " ".join(sys.argv), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
