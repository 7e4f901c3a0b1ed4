"""Vision-language throughput: requests with one image each through nbengine and transformers' batched
``generate``, on the same random-weight Qwen2.5-VL, in the same run.

    python benchmarks/vision.py                                   # CPU: the "small" model, 8 x 224px, 32 tokens
    python benchmarks/vision.py --preset qwen2.5-vl-3b --device cuda --dtype bfloat16 \\
        --requests 64 --image-size 448 --output-len 128          # the issue's GPU benchmark

Every request is a chat prompt with one random ``--image-size`` square image and the same short
question (so transformers needs no padding), greedy, ``ignore_eos`` (exactly ``--output-len`` tokens).
Reports output tok/s and the mean time to first token of each backend, nbengine's ratios, and the
device; writes JSON to benchmarks/results/vision.json (``--out``). nbengine's TTFT is each request's
first streamed token from the moment the batch is submitted; transformers' is its whole batch's
``generate`` with one new token.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offline_throughput import device_name  # noqa: E402
from random_vlm import build_random_vlm  # noqa: E402

QUESTION = "Describe this picture in detail."


def images(n: int, size: int, seed: int = 0) -> list:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def run_nbengine(args, model: Path, imgs: list) -> dict:
    from nbengine import Engine

    llm = Engine(str(model), device=args.device, dtype=args.dtype, random_seed=0)
    try:
        ids = llm.tokenizer.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}], tokenize=True)
        params = {"temperature": 0, "max_new_tokens": args.output_len, "ignore_eos": True}
        llm.generate(input_ids=ids, sampling_params={**params, "max_new_tokens": 4}, image_data=imgs[0])  # warm-up
        t0 = time.perf_counter()
        first: dict[int, float] = {}
        tokens = 0
        for chunk in llm.generate(input_ids=[ids] * len(imgs), sampling_params=params, image_data=imgs, stream=True):
            first.setdefault(chunk["index"], time.perf_counter() - t0)
            if chunk["meta_info"]["finish_reason"] is not None:
                tokens += chunk["meta_info"]["completion_tokens"]
        wall = time.perf_counter() - t0
        prompt_tokens = llm.generate(input_ids=ids, sampling_params={**params, "max_new_tokens": 1},
                                     image_data=imgs[0])["meta_info"]["prompt_tokens"]
    finally:
        llm.shutdown()
    return {"output_tok_s": tokens / wall, "wall_s": wall, "ttft_mean_s": float(np.mean(list(first.values()))),
            "prompt_tokens": prompt_tokens, "output_tokens": tokens}


def run_hf(args, model: Path, imgs: list) -> dict:
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from nbengine.multimodal import load_processor
    from nbengine.tokenizer import Tokenizer

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": torch.float32}[args.dtype]
    device = torch.device(args.device)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(model, dtype=dtype).to(device).eval()
    tok, proc = Tokenizer(model), load_processor(model)
    chat = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}], tokenize=True)

    def batch(items: list) -> dict:
        rows, pixels, grids = [], [], []
        for im in items:
            ids, mm = proc.process(chat, [im], "p")
            rows.append(ids)
            pixels.append(mm.pixel_values)
            grids += mm.grids
        x = torch.tensor(rows, device=device)  # equal lengths: same image size and question
        return dict(input_ids=x, attention_mask=torch.ones_like(x),
                    pixel_values=torch.cat(pixels).to(device, dtype),
                    image_grid_thw=torch.tensor(grids, device=device),
                    mm_token_type_ids=(x == proc.image_token_id).int())

    def generate(inputs: dict, n: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            hf.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    generate(batch(imgs[:1]), 4)  # warm-up
    inputs = batch(imgs)
    ttft = generate(inputs, 1)
    wall = generate(inputs, args.output_len)
    tokens = len(imgs) * args.output_len
    return {"output_tok_s": tokens / wall, "wall_s": wall, "ttft_mean_s": ttft, "output_tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", help="random_vlm.py preset: tiny, small, qwen2.5-vl-3b")
    ap.add_argument("--model-dir", default=None,
                    help="where the random model is built (default /tmp/random-vlm-PRESET)")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--backend", default="nbengine,hf")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "vision.json"))
    args = ap.parse_args()
    model = build_random_vlm(args.preset, args.model_dir or f"/tmp/random-vlm-{args.preset}")
    imgs = images(args.requests, args.image_size)
    results = {}
    for name in args.backend.split(","):
        results[name] = (run_nbengine if name == "nbengine" else run_hf)(args, model, imgs)
        print(f"{name:9s} {results[name]['output_tok_s']:9.1f} output tok/s   TTFT mean "
              f"{results[name]['ttft_mean_s']:.3f}s   ({results[name]['wall_s']:.1f}s)", flush=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": device_name(args.device),
              "args": vars(args), "results": results}
    if "nbengine" in results and "hf" in results:
        report["ratio_tok_s"] = results["nbengine"]["output_tok_s"] / results["hf"]["output_tok_s"]
        report["ratio_ttft"] = results["hf"]["ttft_mean_s"] / results["nbengine"]["ttft_mean_s"]
        print(f"nbengine / transformers: {report['ratio_tok_s']:.2f}x output tok/s, "
              f"TTFT {report['ratio_ttft']:.2f}x lower   on {report['device']}")
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
