"""Serving overhead: N concurrent HTTP clients on loopback against the engine's offline throughput.

    python benchmarks/serving.py                                  # default model, 32 chat prompts x 64 tokens, 32 clients
    python benchmarks/serving.py --model FOLDER --num-prompts 256 --concurrency 256 --input-len 128
    python benchmarks/serving.py --random-model qwen2.5-0.5b --num-prompts 256 --concurrency 256 \
        --input-len 128 --client-procs 4                          # builds the random folder first (GPU)

This process loads the Engine once and serves it with ``nbengine.server.serve`` (uvicorn on its
own thread and loop). Offline runs call ``llm.generate(input_ids=prompts)`` on that engine;
server runs send the same token ids to ``/v1/completions`` (streamed, ``include_usage``) from
``--concurrency`` clients in ``--client-procs`` separate processes (httpx + asyncio), so client
work stays out of the server's interpreter. Greedy, ``ignore_eos``: every request makes exactly
``--output-len`` tokens. Runs alternate offline / server ``--repeat`` times; each mode's best
run is reported: requests/s, output tok/s, time to first token p50/p99 (server), and the
server's overhead = 1 - server tok/s / offline tok/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------ clients
async def _one(client, model: str, prompt: list[int], output_len: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices"):
                if ttft is None:  # the server sends a choice chunk once text appears
                    ttft = time.perf_counter() - t0
            elif event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif event.get("error"):
                raise RuntimeError(event["error"])
    return {"ttft": ttft, "latency": time.perf_counter() - t0, "tokens": tokens}


async def _clients(cfg: dict) -> dict:
    import httpx

    prompts = list(enumerate(cfg["prompts"]))[::-1]
    results: list[dict] = []
    limits = httpx.Limits(max_connections=cfg["concurrency"], max_keepalive_connections=cfg["concurrency"])
    async with httpx.AsyncClient(base_url=cfg["url"], timeout=None, limits=limits) as client:
        async def worker() -> None:
            while prompts:
                _, p = prompts.pop()
                results.append(await _one(client, cfg["model"], p, cfg["output_len"]))

        print("ready", flush=True)
        sys.stdin.readline()  # start together with the other client processes
        start = time.time()
        await asyncio.gather(*(worker() for _ in range(cfg["concurrency"])))
        return {"start": start, "end": time.time(), "results": results}


def client_main(config_path: str) -> None:
    cfg = json.loads(Path(config_path).read_text())
    print(json.dumps(asyncio.run(_clients(cfg))), flush=True)


def run_server_clients(url: str, model: str, prompts: list[list[int]], args, tmp: Path) -> dict:
    procs = []
    k = max(1, min(args.client_procs, args.concurrency))
    for i in range(k):
        cfg = {"url": url, "model": model, "prompts": prompts[i::k], "output_len": args.output_len,
               "concurrency": len(range(i, args.concurrency, k))}
        path = tmp / f"client{i}.json"
        path.write_text(json.dumps(cfg))
        procs.append(subprocess.Popen([sys.executable, __file__, "--client", str(path)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True))
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    wall = max(o["end"] for o in outs) - min(o["start"] for o in outs)
    results = [r for o in outs for r in o["results"]]
    ttfts = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    tokens = sum(r["tokens"] for r in results)
    return {"mode": "server", "requests": len(results), "output_tokens": tokens, "seconds": wall,
            "req_s": len(results) / wall, "tok_s": tokens / wall, "ttft_p50": _pct(ttfts, 50),
            "ttft_p99": _pct(ttfts, 99), "latency_p50": _pct(sorted(r["latency"] for r in results), 50)}


def _pct(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, round(q / 100 * (len(sorted_values) - 1)))]


# ------------------------------------------------------------------------------------ offline
def run_offline(llm, prompts: list[list[int]], output_len: int) -> dict:
    sp = {"max_new_tokens": output_len, "temperature": 0, "ignore_eos": True}
    t0 = time.perf_counter()
    outs = llm.generate(input_ids=prompts, sampling_params=sp)
    wall = time.perf_counter() - t0
    tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
    return {"mode": "offline", "requests": len(outs), "output_tokens": tokens, "seconds": wall,
            "req_s": len(outs) / wall, "tok_s": tokens / wall}


def make_prompts(llm, n: int, input_len: int | None) -> list[list[int]]:
    """Chat prompts through the model's template (as offline_throughput.py), or random token ids."""
    from offline_throughput import make_prompts as offline_prompts

    tok = llm.tokenizer
    if input_len is None and tok.chat_template:
        chat_ids = lambda q: tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True)  # noqa: E731
        return offline_prompts(chat_ids, n, None, tok.vocab_size, seed=0)
    return offline_prompts(None, n, input_len or 128, tok.vocab_size, seed=0)


# ------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder / .gguf / hub id (default: the embedded SmolLM2-135M)")
    ap.add_argument("--random-model", default=None, metavar="PRESET",
                    help="build (once) and use a random-weight model of this shape, e.g. qwen2.5-0.5b")
    ap.add_argument("--random-model-dir", default=None, help="where to build it (default: ~/.cache/nbengine/bench/)")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=None, help="concurrent HTTP clients (default: --num-prompts)")
    ap.add_argument("--client-procs", type=int, default=1, help="client processes sharing the clients")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=None,
                    help="random-token prompts of this length (default: chat prompts when the model has a template)")
    ap.add_argument("--repeat", type=int, default=3, help="alternating runs per mode; the best is reported")
    ap.add_argument("--out", default=str(HERE / "results" / "serving.json"))
    ap.add_argument("--client", help=argparse.SUPPRESS)
    sys.path[:0] = [str(HERE.parent), str(HERE)]  # this checkout's nbengine; the sibling benchmark modules
    from nbengine.server.cli import add_engine_args, engine_args

    add_engine_args(ap)
    args = ap.parse_args()
    if args.client:
        client_main(args.client)
        return
    args.concurrency = args.concurrency or args.num_prompts
    model = args.model
    if args.random_model:
        from random_model import build_random_model

        folder = args.random_model_dir or Path.home() / ".cache" / "nbengine" / "bench" / f"random-{args.random_model}"
        model = str(build_random_model(args.random_model, folder))

    from nbengine.engine import Engine
    from nbengine.server import serve
    from offline_throughput import device_name

    llm = Engine(model, **{"random_seed": 0, **engine_args(args)})
    info = llm.get_server_info()
    prompts = make_prompts(llm, args.num_prompts, args.input_len)
    server = serve(llm, port=0, served_model_name="bench")
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"nbengine-serving-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        run_offline(llm, prompts[:2], 4)  # warm-up, both paths
        run_server_clients(server.url, "bench", prompts[:2], argparse.Namespace(**{**vars(args), "output_len": 4,
                                                                                   "concurrency": 2}), tmp)
        runs: dict[str, list[dict]] = {"offline": [], "server": []}
        for i in range(args.repeat):
            for mode in ("offline", "server"):
                r = run_offline(llm, prompts, args.output_len) if mode == "offline" else \
                    run_server_clients(server.url, "bench", prompts, args, tmp)
                runs[mode].append(r)
                extra = f", TTFT p50 {r['ttft_p50']:.3f} s" if mode == "server" else ""
                print(f"  run {i + 1} {mode:7s}: {r['tok_s']:8.1f} tok/s, {r['req_s']:6.2f} req/s{extra}",
                      file=sys.stderr, flush=True)
    finally:
        server.stop()
        llm.shutdown()
    best = {m: max(rs, key=lambda r: r["tok_s"]) for m, rs in runs.items()}
    overhead = 100.0 * (1 - best["server"]["tok_s"] / best["offline"]["tok_s"])
    dev = device_name(info["device"])
    print(f"\ndevice: {dev}   model: {info['model_path']} ({info['dtype']})")
    print(f"{args.num_prompts} prompts ({sum(map(len, prompts))} tokens) x {args.output_len} new tokens, "
          f"{args.concurrency} clients in {args.client_procs} process(es); best of {args.repeat} alternating runs")
    print(f"{'mode':>8} | {'req/s':>7} | {'out tok/s':>9} | {'TTFT p50':>8} | {'TTFT p99':>8}")
    for m, r in best.items():
        p50 = f"{r['ttft_p50']:7.3f}s" if r.get("ttft_p50") is not None else "       -"
        p99 = f"{r['ttft_p99']:7.3f}s" if r.get("ttft_p99") is not None else "       -"
        print(f"{m:>8} | {r['req_s']:7.2f} | {r['tok_s']:9.1f} | {p50} | {p99}")
    print(f"server overhead: {overhead:.1f} % of offline throughput")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "device": dev, "model": info["model_path"], "dtype": info["dtype"], "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv), "num_prompts": args.num_prompts, "output_len": args.output_len,
        "concurrency": args.concurrency, "client_procs": args.client_procs, "best": best,
        "overhead_pct": overhead, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
