"""Tensor parallelism (tp_size=2, gloo on CPU) and data parallelism (dp_size=2) on tiny random models.

Every TP engine spawns a worker process (a few seconds each on a 2-core machine), so the tests
share engines where they can and keep the models tiny.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from nbengine import Engine
from nbengine.config import ModelConfig
from nbengine.errors import EngineDeadError, EngineShutdownError
from nbengine.parallel.sharding import TPShard, check_tp_size

FLOAT = dict(dtype="float32", quantization=None)
PROMPTS = ["Hello there, how are", "The capital of France is", "def main():\n    for i in", "Once upon a time"]
GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module")
def mqa_llama(tmp_path_factory, tiny_llama) -> Path:
    """A tiny Llama with one KV head (replicated on both ranks) and an odd vocabulary (the last rank's
    vocab rows are padded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=49153, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                         max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
                                         tie_word_embeddings=False))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    out = tmp_path_factory.mktemp("mqa") / "model"
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((tiny_llama / name).read_bytes())
    return out


# ------------------------------------------------------------------------ sharding (no processes)
def test_kv_heads_are_replicated_when_fewer_than_ranks(mqa_llama):
    cfg = ModelConfig.from_folder(mqa_llama)
    shards = [TPShard.plan(cfg, r, 2) for r in range(2)]
    assert [(s.num_heads, s.head_start, s.num_kv_heads, s.kv_head_start) for s in shards] == [(2, 0, 1, 0), (2, 2, 1, 0)]
    assert shards[1].weight_slice("model.layers.0.self_attn.k_proj.weight", 16) == (0, 0, 16)
    assert shards[1].weight_slice("model.layers.0.self_attn.o_proj.weight", 16) == (1, 32, 64)
    assert shards[1].weight_slice("lm_head.weight", 16) == (0, 24577, 49153)  # 24576 rows + 1 row of padding
    assert shards[0].weight_slice("model.norm.weight", 16) is None


def test_bad_tp_size_is_refused_before_any_process_starts(tiny_llama):
    with pytest.raises(ValueError, match=r"tp_size=3 must divide the 4 attention heads.*\[1, 2, 4\]"):
        check_tp_size(ModelConfig.from_folder(tiny_llama), 3)
    children = set(p.pid for p in __import__("multiprocessing").active_children())
    with pytest.raises(ValueError, match="tp_size=3"):
        Engine(str(tiny_llama), tp_size=3, **FLOAT)
    with pytest.raises(ValueError, match="quantization='q8_0' .* tp_size=2"):
        Engine(str(tiny_llama), tp_size=2, dtype="float32", quantization="q8_0")
    assert set(p.pid for p in __import__("multiprocessing").active_children()) == children


# ------------------------------------------------------------------------ parity with tp_size=1
def _run(path: Path, **kw) -> list[dict]:
    with Engine(str(path), max_total_tokens=2048, **FLOAT, **kw) as llm:
        return llm.generate(PROMPTS, GREEDY, return_logprob=True, logprob_start_len=0)


def _same(out: list[dict], ref: list[dict]) -> None:
    """Greedy tokens equal, logprobs within 1e-4."""
    for r, o in zip(ref, out):
        assert o["output_ids"] == r["output_ids"]
        for key in ("input_token_logprobs", "output_token_logprobs"):
            got = [lp for lp, _, _ in o["meta_info"][key] if lp is not None]
            want = [lp for lp, _, _ in r["meta_info"][key] if lp is not None]
            assert got == pytest.approx(want, abs=1e-4)


# tiny Llama itself: in the life-cycle test below (with preemptions)
@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "mqa"])
def test_tp2_greedy_tokens_and_logprobs_equal_tp1(kind, tiny_models, mqa_llama):
    path = mqa_llama if kind == "mqa" else tiny_models[kind]
    _same(_run(path, tp_size=2), _run(path))


# ------------------------------------------------------------------------ life cycle
def test_two_tp_engines_abort_preemption_killed_worker_and_clean_shutdown(tiny_llama):
    """Two TP engines in one process (each its own group and port). An abort and preemptions under TP
    give the tp_size=1 tokens and logprobs; a killed worker makes its engine's waiters raise
    ``EngineDeadError`` (the other engine keeps answering); shutdown leaves no worker process behind."""
    small = dict(max_total_tokens=96, page_size=16)  # 6 pages for 4 requests of ~40 tokens: preemptions
    params = {**GREEDY, "max_new_tokens": 30}
    with Engine(str(tiny_llama), **FLOAT, **small) as ref_engine:
        ref = ref_engine.generate(PROMPTS, params, return_logprob=True)
    a = Engine(str(tiny_llama), tp_size=2, **FLOAT, **small)
    b = Engine(str(tiny_llama), tp_size=2, max_total_tokens=2048, **FLOAT)
    pids = a._thread.core.workers.pids + b._thread.core.workers.pids
    try:
        assert len(set(pids)) == 2
        stream = b.generate("A long story:", {"max_new_tokens": 400, "ignore_eos": True}, stream=True, rid="long")
        next(stream)
        b.abort("long")
        assert list(stream)[-1]["meta_info"]["finish_reason"]["type"] == "abort"
        assert b.get_server_info()["kv_pages_used"] == 0
        out = a.generate(PROMPTS, params, return_logprob=True)
        _same(out, ref)
        info = a.get_server_info()
        assert info["num_preemptions"] > 0 and info["kv_pages_used"] == 0

        stream = b.generate("Tell me", {"max_new_tokens": 1000, "ignore_eos": True}, stream=True)
        next(stream)
        os.kill(b._thread.core.workers.pids[0], signal.SIGKILL)
        with pytest.raises(EngineDeadError, match="worker nbengine-tp1 .* killed by SIGKILL"):
            for _ in stream:  # the waiter's 0.25 s liveness check sees the failure the monitor reported
                pass
        with pytest.raises(EngineDeadError):
            b.generate("again")
        assert a.generate(PROMPTS[0], GREEDY)["output_ids"] == out[0]["output_ids"][:12]
    finally:
        a.shutdown()
        b.shutdown()
    assert all(_gone(p) for p in pids)


_SIGINT_SCRIPT = """
import json, os, signal, sys, threading
from nbengine import Engine

if __name__ == "__main__":
    llm = Engine(sys.argv[1], tp_size=2, dtype="float32", quantization=None, max_total_tokens=2048)
    workers = llm._thread.core.workers.procs
    stream = llm.generate("Tell me", {"max_new_tokens": 1000, "ignore_eos": True}, stream=True, rid="r")
    next(stream)
    # what Jupyter's interrupt does: SIGINT to the kernel's whole process group, while the main thread waits
    threading.Timer(0.2, os.killpg, (os.getpgid(0), signal.SIGINT)).start()
    interrupted = False
    try:
        for chunk in stream:
            pass
    except KeyboardInterrupt:
        interrupted = True
    stream.close()  # leaving the stream aborts its request
    out = llm.generate("Hello", {"max_new_tokens": 5, "temperature": 0})
    info = llm.get_server_info()
    print(json.dumps({"interrupted": interrupted, "workers_alive": all(p.is_alive() for p in workers),
                      "answer_tokens": out["meta_info"]["completion_tokens"],
                      "running": info["num_running_reqs"], "pages_used": info["kv_pages_used"]}))
    llm.shutdown()
"""


def test_sigint_to_the_process_group_aborts_the_request_and_workers_survive(tiny_llama, tmp_path):
    script = tmp_path / "interrupt.py"
    script.write_text(textwrap.dedent(_SIGINT_SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # its own session: the SIGINT goes to that process group only, never to the test runner's
    done = subprocess.run([sys.executable, str(script), str(tiny_llama)], capture_output=True, text=True,
                          timeout=300, env=env, start_new_session=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"interrupted": True, "workers_alive": True, "answer_tokens": 5, "running": 0,
                      "pages_used": 0}


def test_two_nodes_on_one_host_share_a_tcp_store(tiny_llama):
    """nnodes=2: node 1's Engine runs rank 1 (blocking, here on a thread) until node 0's engine shuts down."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{s.getsockname()[1]}"
    node = dict(tp_size=2, nnodes=2, dist_init_addr=addr, max_total_tokens=2048, **FLOAT)
    node1: list = []
    runner = threading.Thread(target=lambda: node1.append(Engine(str(tiny_llama), node_rank=1, **node)))
    runner.start()
    with Engine(str(tiny_llama), node_rank=0, **node) as llm:
        assert llm._thread.core.workers.pids == []  # rank 1 lives on "the other node"
        out = llm.generate(PROMPTS[:2], GREEDY)
    runner.join(60)
    assert not runner.is_alive()
    with Engine(str(tiny_llama), max_total_tokens=2048, **FLOAT) as ref:
        assert [o["output_ids"] for o in out] == [r["output_ids"] for r in ref.generate(PROMPTS[:2], GREEDY)]
    with pytest.raises(EngineShutdownError, match="node_rank=0"):
        node1[0].generate("hi")


# ------------------------------------------------------------------------ data parallel
def test_dp2_routes_to_both_replicas_with_the_same_greedy_outputs_and_dies_as_one(tiny_llama):
    ref = _run(tiny_llama)
    with Engine(str(tiny_llama), dp_size=2, max_total_tokens=2048, **FLOAT) as llm:
        out = llm.generate(PROMPTS, GREEDY)
        info = llm.get_server_info()
        # the samples of one prompt (n > 1 shares its prompt's pages) stay on one replica
        pair = llm.generate(PROMPTS[0], {**GREEDY, "n": 2})
        assert [o["output_ids"] for o in pair] == [ref[0]["output_ids"]] * 2
        assert len(llm.get_recent_requests()) == 6 and llm.flush_cache()

        def broken_forward(site, seqs):
            if site == "runner":
                raise RuntimeError("injected: replica 0's forward pass failed")

        replicas = llm._thread.threads
        replicas[0].core.fault_hook = broken_forward
        with pytest.raises(EngineDeadError, match="replica"):
            llm.generate(PROMPTS[:2], GREEDY)  # one request on each replica: both callers learn it
        for t in replicas:  # the healthy replica is stopped too, as one engine would be
            t.thread.join(30)
            assert not t.thread.is_alive()
    assert [o["output_ids"] for o in out] == [r["output_ids"] for r in ref]
    assert [r["requests_routed"] for r in info["replicas"]] == [2, 2]
    assert info["num_finished_reqs"] == 4 and info["num_running_reqs"] == 0
