"""Where one decode step's time goes: linear layers, LM head, attention, the rest of the model
(norms, rotary, activations, residuals and the Python around them), batch preparation, sampling.

    python benchmarks/decode_profile.py --batch 1 --steps 64
    python benchmarks/decode_profile.py --batch 64 --quantization none

Steps the engine core directly on this thread (set up like the engine thread), with timers
wrapped around the pieces; prints milliseconds per decode step (mean of ``--steps``, after
warm-up). The wrappers cost well under a microsecond per call.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--quantization", default="auto", help="auto / none / q8_0 / q4_1")
    ap.add_argument("--model", default=None)
    args = ap.parse_args()

    from nbengine.config import EngineConfig
    from nbengine.engine_core import EngineCore
    from nbengine.layers.attention import TorchPagedAttention
    from nbengine.layers.cpu_attention import CpuPagedAttention
    from nbengine.layers.cpu_threads import omp_team
    from nbengine.layers.linear import Linear
    from nbengine.layers.quant_linear import QuantLinear
    from nbengine.loader.resolve import resolve_model_path
    from nbengine.model_runner import ModelRunner
    from nbengine.models.llama import LlamaForCausalLM
    from nbengine.sampler import Sampler
    from nbengine.sampling_params import SamplingParams
    from nbengine.sequence import Sequence
    from nbengine.tokenizer import Tokenizer

    spent: dict[str, float] = defaultdict(float)
    state = {"in_head": False}

    def timed(cls, name: str, bucket: str, head: bool = False) -> None:
        inner = getattr(cls, name)

        def wrapper(*a, **k):
            if state["in_head"] and not head:
                return inner(*a, **k)
            state["in_head"] = head or state["in_head"]
            t0 = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                spent[bucket] += time.perf_counter() - t0
                if head:
                    state["in_head"] = False

        setattr(cls, name, wrapper)

    timed(QuantLinear, "forward", "linear layers")
    timed(Linear, "forward", "linear layers")
    timed(LlamaForCausalLM, "compute_logits", "LM head", head=True)
    timed(CpuPagedAttention, "forward", "attention")
    timed(TorchPagedAttention, "forward", "attention")
    timed(ModelRunner, "_prepare", "batch preparation")
    timed(ModelRunner, "run", "runner total")
    timed(Sampler, "__call__", "sampling")
    timed(EngineCore, "step", "step")

    omp_team.manage_this_thread()  # as the engine thread does
    model_dir = resolve_model_path(args.model)
    tok = Tokenizer(model_dir)
    quant = None if args.quantization == "none" else args.quantization
    core = EngineCore(EngineConfig(quantization=quant, random_seed=0, max_running_requests=max(args.batch, 1)),
                      model_dir, tok)
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Write a short poem about autumn."}]))

    def run(steps: int) -> float:
        for i in range(args.batch):
            core.add([Sequence(rid=f"r{time.perf_counter()}-{i}", prompt_ids=ids, emit=lambda _: None,
                               params=SamplingParams(temperature=0, max_new_tokens=steps + 2, ignore_eos=True))])
        while any(s.num_computed < len(s.prompt_ids) for s in core.seqs.values()):
            core.step()  # prefill
        spent.clear()
        t0 = time.perf_counter()
        for _ in range(steps):
            core.step()
        wall = time.perf_counter() - t0
        while core.has_work():
            core.step()
        return wall

    run(4)
    wall = run(args.steps)
    per = {k: v / args.steps * 1e3 for k, v in spent.items()}
    step = per["step"]
    model_rest = per["runner total"] - per.get("linear layers", 0) - per.get("LM head", 0) \
        - per.get("attention", 0) - per.get("batch preparation", 0)
    rows = [("linear layers (GEMM)", per.get("linear layers", 0)), ("LM head (GEMM)", per.get("LM head", 0)),
            ("attention", per.get("attention", 0)),
            ("norms, rotary, activations, residuals + Python in the model", model_rest),
            ("batch preparation", per.get("batch preparation", 0)), ("sampling", per.get("sampling", 0)),
            ("scheduler, outputs, detokenizer", step - per["runner total"] - per.get("sampling", 0))]
    info = core.info()
    print(f"batch {args.batch}, quantization {info['quantization']}, attention {info['attention_backend']}: "
          f"{step:.2f} ms per decode step ({args.batch / step * 1e3:.1f} tok/s; "
          f"{wall / args.steps * 1e3:.2f} ms between steps)")
    for name, ms in rows:
        print(f"  {name:62s} {ms:7.2f} ms  {ms / step:5.1%}")
    core.release()


if __name__ == "__main__":
    main()
