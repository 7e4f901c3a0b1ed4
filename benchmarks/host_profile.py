"""Where the host time of an engine step goes at a large batch (CPU, a tiny random model).

    PYTHONPATH=$PWD python3 benchmarks/host_profile.py --batch 256 --steps 20 [--overlap 0|1]

The model is tiny (2 layers, hidden 64), so nearly all of a step is the engine's own Python:
scheduling, the batch plan, metadata, sampling, appending tokens, detokenizing and emitting.
Prints the wall time per decode step and the top functions by own time (cProfile).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import tempfile
import time
from pathlib import Path


def tiny_model(out: Path, tokenizer_dir: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out / name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--overlap", type=int, default=1)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--temperature", type=float, default=0.6)
    args = ap.parse_args()

    import torch

    from nbengine.config import EngineConfig
    from nbengine.engine_core import EngineCore
    from nbengine.loader.default_model import default_model_path
    from nbengine.sampling_params import SamplingParams
    from nbengine.sequence import Sequence
    from nbengine.tokenizer import Tokenizer

    torch.set_num_threads(1)
    folder = tiny_model(Path(tempfile.gettempdir()) / "nbengine-host-profile-llama", default_model_path(progress=False))
    tok = Tokenizer(folder)
    cfg = EngineConfig(random_seed=0, max_running_requests=args.batch, dtype="float32", quantization=None,
                       disable_overlap_schedule=not args.overlap, max_total_tokens=args.batch * 1024)
    core = EngineCore(cfg, folder, tok)
    g = torch.Generator().manual_seed(0)
    emitted = [0]

    def emit(_out) -> None:
        emitted[0] += 1

    for i in range(args.batch):
        ids = torch.randint(100, 40000, (args.prompt_len,), generator=g).tolist()
        core.add([Sequence(rid=f"r{i}", prompt_ids=ids, emit=emit, stream=True, params=SamplingParams(
            temperature=args.temperature, max_new_tokens=args.steps + 50, ignore_eos=True))])
    while any(s.num_computed < len(s.prompt_ids) for s in core.seqs.values()):
        core.step()
    for _ in range(3):
        core.step()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(args.steps):
        core.step()
    prof.disable()
    wall = (time.perf_counter() - t0) / args.steps
    print(f"batch {args.batch}, overlap {bool(args.overlap)}: {wall * 1e3:.2f} ms per decode step under cProfile")
    pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
    pstats.Stats(prof).sort_stats("cumulative").print_stats(args.top)
    core.release()


if __name__ == "__main__":
    main()
