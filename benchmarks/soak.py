"""Soak: thousands of concurrent async requests with random valid parameters, some aborted at random
moments, invalid requests mixed in, over several rounds on one engine.

    python benchmarks/soak.py                        # 2,000 requests x 3 rounds on the default model
    python benchmarks/soak.py --requests 300 --model path/to/model --rounds 2

Every valid request must end with a finish reason that fits its parameters (length at exactly
max_new_tokens, a stop on one of its stop tokens / strings, or abort only when the soak aborted
it); every invalid one must raise the expected error naming its field; after each round the KV
pool must be full again, and thread count and memory must not grow from round to round.
Prints the figures and writes JSON next to this file. ``tests/test_soak.py`` runs a short version.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Why is the sky blue?",
             "List three uses of Python.", "How do vaccines work?", "Suggest a name for a coffee shop.",
             "Explain rotary embeddings in one sentence.", "Say hello in five languages."]
STOP_STRINGS = [".", "\n", " the", ",", "e", "!", "ing"]
ABORT_MODES = ("abort", "break", "cancel")  # llm.abort(rid), leaving a stream early, cancelling the task


@dataclass
class Request:
    kwargs: dict[str, Any]
    n: int
    max_new_tokens: int
    stop: list[str]
    stop_token_ids: list[int]
    abort: str | None = None  # one of ABORT_MODES when the soak aborts it


@dataclass
class RoundReport:
    valid: int = 0
    samples: int = 0
    aborted: int = 0
    invalid: int = 0
    finish: Counter = field(default_factory=Counter)
    tokens: int = 0
    wall_s: float = 0.0
    problems: list[str] = field(default_factory=list)
    pool_full: bool = False
    threads: int = 0
    rss_mb: float = 0.0
    objects: int = 0
    tensors: int = 0


def _invalid_requests(vocab: int, context: int) -> list[tuple[dict, type, str]]:
    """(generate kwargs, the exception expected, a word its message must contain)."""
    return [
        ({"prompt": "x", "sampling_params": {"temperature": -1}}, ValueError, "temperature"),
        ({"prompt": "x", "sampling_params": {"top_p": 0}}, ValueError, "top_p"),
        ({"prompt": "x", "sampling_params": {"top_k": 0}}, ValueError, "top_k"),
        ({"prompt": "x", "sampling_params": {"temprature": 0.5}}, TypeError, "temprature"),
        ({"prompt": "x", "sampling_params": {"n": 0}}, ValueError, "n must"),
        ({"prompt": "x", "sampling_params": {"seed": -3}}, ValueError, "seed"),
        ({"prompt": "x", "sampling_params": {"logit_bias": {str(vocab): 1.0}}}, ValueError, "logit_bias"),
        ({"prompt": "x", "sampling_params": {"stop_token_ids": [-1]}}, ValueError, "stop_token_ids"),
        ({"prompt": "x", "sampling_params": {"max_new_tokens": context + 10}}, ValueError, "max_new_tokens"),
        ({"prompt": "x", "sampling_params": {"repetition_penalty": 0}}, ValueError, "repetition_penalty"),
        ({"prompt": ""}, ValueError, "prompt"),
        ({"prompt": 42}, TypeError, "prompt"),
        ({"input_ids": [1, 2, vocab + 5]}, ValueError, "input_ids"),
        ({"input_ids": [[1, 2], []]}, ValueError, "input_ids"),
        ({"input_ids": [1.5, 2]}, ValueError, "input_ids"),
        ({"prompt": "x", "input_ids": [1]}, ValueError, "input_ids"),
        ({"prompt": "x", "rid": 7}, TypeError, "rid"),
        ({"prompt": "x", "return_logprob": True, "top_logprobs_num": -2}, ValueError, "top_logprobs_num"),
    ]


def _valid_request(rng: random.Random, prompts: list, eos: int | None, idx: int) -> Request:
    n = rng.choice([1, 1, 1, 2, 3])
    max_new = rng.randint(1, 16)
    params: dict[str, Any] = {"max_new_tokens": max_new, "n": n}
    if rng.random() < 0.5:
        params["temperature"] = rng.choice([0.0, 0.3, 0.7, 1.0, 1.5])
    if rng.random() < 0.3:
        params["top_p"] = rng.choice([0.5, 0.9, 1.0])
    if rng.random() < 0.3:
        params["top_k"] = rng.choice([-1, 1, 5, 50])
    if rng.random() < 0.2:
        params["min_p"] = rng.choice([0.0, 0.05, 0.2])
    if rng.random() < 0.3:
        params["seed"] = rng.randrange(2**31)
    if rng.random() < 0.3:
        params["stop"] = rng.sample(STOP_STRINGS, rng.randint(1, 2))
    if rng.random() < 0.2 and eos is not None:
        params["stop_token_ids"] = [eos]
    if rng.random() < 0.3:
        params["repetition_penalty"] = rng.choice([0.8, 1.1, 1.5])
    if rng.random() < 0.3:
        params["frequency_penalty"] = rng.choice([-0.5, 0.5, 1.5])
    if rng.random() < 0.3:
        params["presence_penalty"] = rng.choice([-1.0, 0.6])
    if rng.random() < 0.2:
        params["ignore_eos"] = True
    if rng.random() < 0.1:
        params["min_new_tokens"] = rng.randint(0, max_new)
    prompt = rng.choice(prompts)
    kwargs: dict[str, Any] = {"sampling_params": params, "rid": f"soak-{idx}", "stream": rng.random() < 0.5}
    kwargs["input_ids" if isinstance(prompt, list) else "prompt"] = prompt
    if rng.random() < 0.3:
        kwargs.update(return_logprob=True, top_logprobs_num=rng.choice([0, 2]), logprob_start_len=rng.choice([-1, 0]))
    return Request(kwargs, n, max_new, params.get("stop", []), params.get("stop_token_ids", []))


def _check_final(req: Request, out: dict, eos_ids: set[int], problems: list[str]) -> str:
    meta = out["meta_info"]
    reason = meta["finish_reason"]
    where = f"{meta['id']} ({req.kwargs['sampling_params']})"
    if not isinstance(reason, dict) or reason.get("type") not in ("length", "stop", "abort"):
        problems.append(f"{where}: bad finish_reason {reason!r}")
        return "bad"
    kind = reason["type"]
    ids = out["output_ids"]
    if meta["completion_tokens"] != len(ids) or len(ids) > req.max_new_tokens:
        problems.append(f"{where}: {len(ids)} output ids, completion_tokens {meta['completion_tokens']}")
    if kind == "abort" and req.abort is None:
        problems.append(f"{where}: aborted without being asked: {reason}")
    if kind == "length" and len(ids) != req.max_new_tokens:
        problems.append(f"{where}: length finish after {len(ids)} of {req.max_new_tokens} tokens")
    if kind == "stop":
        matched = reason.get("matched")
        if isinstance(matched, str):
            if matched not in req.stop:
                problems.append(f"{where}: stopped on {matched!r}, not one of {req.stop}")
        elif not ids or ids[-1] != matched or (matched not in req.stop_token_ids and matched not in eos_ids):
            problems.append(f"{where}: stopped on token {matched!r}, not a stop token (last id {ids[-1:]})")
    if "text" in out and kind != "abort" and any(s in out["text"] for s in req.stop):
        problems.append(f"{where}: text {out['text']!r} still holds a stop string {req.stop}")
    if req.kwargs.get("return_logprob") and len(meta.get("output_token_logprobs", [])) != len(ids):
        problems.append(f"{where}: {len(meta.get('output_token_logprobs', []))} output logprobs for {len(ids)} ids")
    return kind


async def _run_valid(llm, req: Request, rng: random.Random, eos_ids: set[int], report: RoundReport) -> None:
    loop = asyncio.get_running_loop()
    rids = [req.kwargs["rid"]] if req.n == 1 else [f"{req.kwargs['rid']}_{j}" for j in range(req.n)]
    if req.abort == "abort":
        def abort_all() -> None:
            for r in rids:
                llm.abort(r)
        loop.call_later(rng.uniform(0.0, 2.0), abort_all)
    finals: dict[int, dict] = {}
    if req.kwargs["stream"]:
        last: dict[int, dict] = {}
        leave_after = rng.randint(1, 4) if req.abort == "break" else None
        seen = 0
        async for chunk in await llm.async_generate(**req.kwargs):
            i = chunk.get("index", 0)
            prev = last.get(i)
            if prev is not None and (prev["meta_info"]["finish_reason"] is not None
                                     or chunk["output_ids"][: len(prev["output_ids"])] != prev["output_ids"]):
                report.problems.append(f"{req.kwargs['rid']}: chunks not cumulative or after the end")
            last[i] = chunk
            if chunk["meta_info"]["finish_reason"] is not None:
                finals[i] = chunk
            seen += 1
            if leave_after is not None and seen >= leave_after:
                return  # leaving the stream aborts every request of the call
    else:
        outs = await llm.async_generate(**req.kwargs)
        finals = dict(enumerate(outs if isinstance(outs, list) else [outs]))
    if len(finals) != req.n:
        report.problems.append(f"{req.kwargs['rid']}: {len(finals)} finished samples of {req.n}")
    for out in finals.values():
        report.finish[_check_final(req, out, eos_ids, report.problems)] += 1
        report.tokens += len(out["output_ids"])


async def _run_invalid(llm, kwargs: dict, exc: type, word: str, report: RoundReport) -> None:
    try:
        await llm.async_generate(**kwargs)
    except exc as e:
        if word not in str(e):
            report.problems.append(f"invalid {kwargs}: {type(e).__name__} does not name {word!r}: {e}")
    except Exception as e:  # noqa: BLE001
        report.problems.append(f"invalid {kwargs}: raised {type(e).__name__}: {e}, expected {exc.__name__}")
    else:
        report.problems.append(f"invalid {kwargs}: no error, expected {exc.__name__}")


async def soak_round(llm, num_requests: int, seed: int, abort_fraction: float = 0.1,
                     invalid_every: int = 10) -> RoundReport:
    """One round: ``num_requests`` valid requests at once, ``num_requests // invalid_every`` invalid ones mixed in."""
    rng = random.Random(seed)
    tok = llm.tokenizer
    info = llm.get_server_info()
    eos_ids = set(info["eos_token_ids"])  # the tokenizer's and the model's (generation_config) EOS ids
    prompts: list = [q for q in QUESTIONS]
    if tok is not None and tok.chat_template:
        prompts += [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True) for q in QUESTIONS]
    report = RoundReport()
    invalid = _invalid_requests(info["vocab_size"], info["context_length"])
    jobs = []
    for i in range(num_requests):
        req = _valid_request(rng, prompts, tok.eos_token_id if tok else None, i + seed * 1_000_000)
        if rng.random() < abort_fraction:
            req.abort = rng.choice(ABORT_MODES if req.kwargs["stream"] else ("abort", "cancel"))
            report.aborted += 1
        report.valid += 1
        report.samples += req.n
        jobs.append(req)
    t0 = time.perf_counter()
    tasks = []
    for i, req in enumerate(jobs):
        task = asyncio.ensure_future(_run_valid(llm, req, rng, eos_ids, report))
        if req.abort == "cancel":
            asyncio.get_running_loop().call_later(rng.uniform(0.0, 2.0), task.cancel)
        tasks.append(task)
        if i % invalid_every == 0:
            kwargs, exc, word = invalid[(i // invalid_every) % len(invalid)]
            tasks.append(asyncio.ensure_future(_run_invalid(llm, kwargs, exc, word, report)))
            report.invalid += 1
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for r, task in zip(results, tasks):
        if isinstance(r, asyncio.CancelledError):
            continue
        if isinstance(r, BaseException):
            report.problems.append(f"a request raised {type(r).__name__}: {r}")
    report.wall_s = time.perf_counter() - t0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # aborts of left streams land at the next step
        info = llm.get_server_info()
        if info["kv_pages_used"] == 0 and info["num_running_reqs"] == 0 and info["num_waiting_reqs"] == 0:
            break
        await asyncio.sleep(0.05)
    report.pool_full = info["kv_pages_free"] == info["kv_pages_total"] and info["num_running_reqs"] == 0 \
        and info["num_waiting_reqs"] == 0
    report.threads = threading.active_count()
    report.objects, report.tensors = _live_objects()
    report.rss_mb = _rss_mb()
    return report


def _live_objects() -> tuple[int, int]:
    """(Python objects, torch tensors) the garbage collector can see, after a collection."""
    import gc

    import torch

    gc.collect()
    objects = gc.get_objects()
    return len(objects), sum(1 for o in objects if isinstance(o, torch.Tensor))


def _rss_mb() -> float:
    """Resident memory after asking glibc to hand freed heap memory back (else RSS mostly shows the
    allocator's high-water mark, not what is in use)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_soak(llm, num_requests: int, rounds: int, seed: int = 0) -> list[RoundReport]:
    return [asyncio.run(soak_round(llm, num_requests, seed + r)) for r in range(rounds)]


def summarize(reports: list[RoundReport]) -> dict[str, Any]:
    first, last = reports[0], reports[-1]
    return {
        "rounds": len(reports),
        "requests": sum(r.valid for r in reports), "samples": sum(r.samples for r in reports),
        "aborted": sum(r.aborted for r in reports), "invalid": sum(r.invalid for r in reports),
        "finish": dict(sum((r.finish for r in reports), Counter())),
        "tokens": sum(r.tokens for r in reports), "wall_s": round(sum(r.wall_s for r in reports), 1),
        "problems": sum(len(r.problems) for r in reports),
        "pool_full_after_every_round": all(r.pool_full for r in reports),
        "threads_per_round": [r.threads for r in reports],
        "rss_mb_per_round": [round(r.rss_mb, 1) for r in reports],
        "python_objects_per_round": [r.objects for r in reports],
        "live_tensors_per_round": [r.tensors for r in reports],
        "rss_growth_mb": round(last.rss_mb - first.rss_mb, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder / .gguf (default: the embedded SmolLM2-135M)")
    ap.add_argument("--requests", type=int, default=2000, help="valid requests per round, all submitted at once")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).with_name("soak.json")))
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).parent))
    from offline_throughput import device_name

    from nbengine.engine import Engine

    with Engine(args.model, random_seed=args.seed) as llm:
        reports = []
        for r in range(args.rounds):
            rep = asyncio.run(soak_round(llm, args.requests, args.seed + r))
            reports.append(rep)
            print(f"round {r + 1}: {rep.valid} requests ({rep.samples} samples), {rep.aborted} aborted, "
                  f"{rep.invalid} invalid, {rep.tokens} tokens in {rep.wall_s:.1f} s "
                  f"({rep.tokens / rep.wall_s:.0f} tok/s); finish {dict(rep.finish)}; pool full: {rep.pool_full}; "
                  f"threads {rep.threads}; RSS {rep.rss_mb:.0f} MB; {rep.objects} Python objects, {rep.tensors} tensors; "
                  f"problems: {len(rep.problems)}", flush=True)
            for p in rep.problems[:20]:
                print("   ", p)
        summary = summarize(reports)
        summary.update(device=device_name(llm.get_server_info()["device"]), model=str(llm.model_dir),
                       date=time.strftime("%Y-%m-%d"), command=" ".join(sys.argv))
    print(json.dumps(summary, indent=2))
    Path(args.out).write_text(json.dumps(summary, indent=2))
    sys.exit(1 if summary["problems"] or not summary["pool_full_after_every_round"] else 0)


if __name__ == "__main__":
    main()
