"""Quality of the quantized CPU path against float32, on the default model.

    python benchmarks/quality.py                       # auto (the GGUF's blocks), q8_0, q4_1 vs float32

Reports, per method: perplexity on the held-out text the tests use (``tests/data/heldout.txt``,
2,734 tokens) and its ratio to float32; top-1 agreement of the next-token prediction at every
position of that text; greedy agreement over the parity prompts (``tests/test_parity.py``'s
questions through the chat template, 24 tokens each): identical continuations and mean length
of the common prefix. Writes JSON next to it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
N_GREEDY = 24


def held_out_scores(llm, ids: list[int]) -> tuple[float, list[int]]:
    """Perplexity of ``ids`` and the argmax next token after each position."""
    out = llm.generate(input_ids=ids, sampling_params={"max_new_tokens": 1, "temperature": 0},
                       return_logprob=True, logprob_start_len=0, top_logprobs_num=1)
    meta = out["meta_info"]
    lps = [lp for lp, _, _ in meta["input_token_logprobs"][1:]]
    top1 = [top[0][1] for top in meta["input_top_logprobs"][1:]]
    return math.exp(-sum(lps) / len(lps)), top1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="auto,q8_0,q4_1")
    ap.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from test_parity import QUESTIONS

    from nbengine.engine import Engine
    from nbengine.loader.default_model import default_model_path
    from nbengine.tokenizer import Tokenizer

    model_dir = default_model_path()
    tok = Tokenizer(model_dir)
    text_ids = tok.encode((ROOT / "tests" / "data" / "heldout.txt").read_text())
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in QUESTIONS]
    greedy = {"temperature": 0, "max_new_tokens": N_GREEDY, "ignore_eos": True}

    def evaluate(quantization):
        with Engine(str(model_dir), random_seed=0, quantization=quantization) as llm:
            ppl, top1 = held_out_scores(llm, text_ids)
            outs = [o["output_ids"] for o in llm.generate(input_ids=prompts, sampling_params=greedy)]
            return ppl, top1, outs, llm.get_server_info()["quantization"]

    ppl_f, top1_f, outs_f, _ = evaluate(None)
    rows = [{"method": "float32 (None)", "perplexity": ppl_f}]
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        ppl, top1, outs, resolved = evaluate(method)
        prefix = []
        for a, b in zip(outs, outs_f):
            n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
            prefix.append(n)
        rows.append({"method": f"{method} ({resolved})", "perplexity": ppl, "ppl_ratio": ppl / ppl_f,
                     "top1_agreement": sum(a == b for a, b in zip(top1, top1_f)) / len(top1_f),
                     "greedy_identical": sum(n == N_GREEDY for n in prefix), "greedy_prompts": len(prefix),
                     "greedy_mean_common_prefix": sum(prefix) / len(prefix)})
    print(f"default model, held-out text {len(text_ids)} tokens; {len(prompts)} parity prompts x {N_GREEDY} greedy tokens")
    print(f"{'method':>18} | {'perplexity':>10} | {'vs f32':>7} | {'top-1 agree':>11} | {'greedy same':>11} | "
          f"{'common prefix':>13}")
    for r in rows:
        if "ppl_ratio" not in r:
            print(f"{r['method']:>18} | {r['perplexity']:10.3f} |")
            continue
        print(f"{r['method']:>18} | {r['perplexity']:10.3f} | {r['ppl_ratio'] - 1:+6.2%} | {r['top1_agreement']:11.1%} | "
              f"{r['greedy_identical']:>5} / {r['greedy_prompts']:<3} | {r['greedy_mean_common_prefix']:9.1f} / {N_GREEDY}")
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "tokens": len(text_ids),
                                          "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
