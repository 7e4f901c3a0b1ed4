"""Feature workloads of ``offline_throughput.py --workload``: prefix caching and constrained decoding.

``shared-prefix``: ``--num-prompts`` (default 64) requests sharing a ``--prefix-len`` (default 1,000)
token system text, each with its own ~20-token question, ``--output-len`` (default 64) new tokens
each (``ignore_eos``), run with the prefix cache on and off (``disable_radix_cache``): prompt
tokens prefilled (prompt tokens minus ``cached_tokens``), wall time and output tok/s.

``constrained``: the same batch of JSON-asking prompts with and without a ``json_schema`` (greedy):
output tok/s each, their ratio, and whether every constrained output validates.
"""

from __future__ import annotations

import json
import time

FILLER = ("You are a careful assistant for a public library. Answer questions about opening hours, "
          "borrowing rules, events, and the catalogue. Be brief, polite and exact; if you do not know, say so. ")
SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string"}, "author": {"type": "string"}, "year": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string"}}}, "required": ["title", "author", "year", "tags"]}


def _engine(args, **kw):
    from nbengine.engine import Engine

    return Engine(args.model, dtype=args.dtype, device=args.device, random_seed=0,
                  max_running_requests=max(args.num_prompts, 1), **kw)


def shared_prefix(args, tok, questions: list[str]) -> dict:
    prefix = (tok.encode(FILLER * (args.prefix_len // 20 + 2), add_special_tokens=False))[: args.prefix_len]
    prompts = [prefix + tok.encode(f"\nQuestion {i}: {questions[i % len(questions)]}\nAnswer:",
                                   add_special_tokens=False) for i in range(args.num_prompts)]
    sp = {"temperature": 0, "max_new_tokens": args.output_len, "ignore_eos": True}
    res = {}
    for name, disable in (("cache_off", True), ("cache_on", False)):
        best = None
        for _ in range(args.repeat):
            with _engine(args, disable_radix_cache=disable) as llm:
                llm.generate(input_ids=[7, 8, 9], sampling_params={**sp, "max_new_tokens": 2})  # warm-up
                t0 = time.perf_counter()
                outs = llm.generate(input_ids=prompts, sampling_params=sp)
                wall = time.perf_counter() - t0
            prompt = sum(o["meta_info"]["prompt_tokens"] for o in outs)
            cached = sum(o["meta_info"]["cached_tokens"] for o in outs)
            n_out = sum(o["meta_info"]["completion_tokens"] for o in outs)
            run = {"prompt_tokens": prompt, "cached_tokens": cached, "prefill_tokens": prompt - cached,
                   "seconds": wall, "tok_s": n_out / wall, "output_ids": [o["output_ids"] for o in outs]}
            best = run if best is None or wall < best["seconds"] else best
        res[name] = best
    same = res["cache_on"].pop("output_ids") == res["cache_off"].pop("output_ids")
    return {**res, "greedy_outputs_identical": same,
            "prefill_reduction": res["cache_off"]["prefill_tokens"] / max(1, res["cache_on"]["prefill_tokens"]),
            "speedup": res["cache_off"]["seconds"] / res["cache_on"]["seconds"]}


def constrained(args, tok, questions: list[str]) -> dict:
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Describe a book about: {q} Reply in JSON."}],
                                       tokenize=True) for q in (questions * 8)[: args.num_prompts]]
    sp = {"temperature": 0, "max_new_tokens": args.output_len}
    res = {}
    with _engine(args) as llm:
        llm.generate(input_ids=prompts[:2], sampling_params={**sp, "json_schema": json.dumps(SCHEMA)})  # compile
        for _ in range(args.repeat):  # alternate, keep each one's best
            for name, extra in (("unconstrained", {}), ("json_schema", {"json_schema": json.dumps(SCHEMA)})):
                t0 = time.perf_counter()
                outs = llm.generate(input_ids=prompts, sampling_params={**sp, **extra})
                wall = time.perf_counter() - t0
                n_out = sum(o["meta_info"]["completion_tokens"] for o in outs)
                run = {"seconds": wall, "output_tokens": n_out, "tok_s": n_out / wall}
                if extra:
                    run["all_valid_json"] = all(_valid(o["text"]) for o in outs)
                if name not in res or run["tok_s"] > res[name]["tok_s"]:
                    res[name] = run
    return {**res, "slowdown": res["unconstrained"]["tok_s"] / res["json_schema"]["tok_s"] - 1}


def _valid(text: str) -> bool:
    try:
        import jsonschema

        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    except Exception:  # noqa: BLE001 - truncated (max_new_tokens) or invalid
        return False


def report(name: str, r: dict) -> str:
    if name == "shared-prefix":
        on, off = r["cache_on"], r["cache_off"]
        return (f"shared prefix: prefill tokens {off['prefill_tokens']} -> {on['prefill_tokens']} "
                f"({r['prefill_reduction']:.1f}x less), wall {off['seconds']:.1f} s -> {on['seconds']:.1f} s "
                f"({r['speedup']:.2f}x), output {off['tok_s']:.1f} -> {on['tok_s']:.1f} tok/s, "
                f"greedy outputs identical: {r['greedy_outputs_identical']}")
    u, c = r["unconstrained"], r["json_schema"]
    return (f"constrained: {u['tok_s']:.1f} tok/s unconstrained vs {c['tok_s']:.1f} tok/s with json_schema "
            f"({r['slowdown'] * 100:+.1f} % slower; {u['output_tokens']} vs {c['output_tokens']} tokens), "
            f"all valid: {c['all_valid_json']}")
