"""The ``nbengine`` command: ``nbengine generate "prompt"`` streams a completion to the terminal;
``nbengine serve`` serves a model over HTTP (see ``nbengine.server``)."""

from __future__ import annotations

import argparse
import sys
import time


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nbengine", description="nbengine: run a language model from the shell.")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="stream a completion for one prompt")
    g.add_argument("prompt", help="the prompt (use '-' to read it from stdin)")
    g.add_argument("--model", default=None, help="HF folder, .gguf file or hub id (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--raw", action="store_true", help="send the prompt as is, without the model's chat template")
    g.add_argument("--system", default=None, help="system message for the chat template")
    g.add_argument("--dtype", default="auto")
    g.add_argument("--device", default="auto")
    g.add_argument("--quantization", default="auto", help="CPU linear layers: auto, none, q8_0 or q4_1")
    g.add_argument("--stats", action="store_true", help="print token counts and speed to stderr at the end")
    from .server.cli import add_serve_parser

    add_serve_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        from .server.cli import run_serve

        return run_serve(args)
    from .engine import Engine
    from .errors import NBEngineError

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:
        with Engine(args.model, dtype=args.dtype, device=args.device, quantization=args.quantization) as llm:
            tok = llm.tokenizer
            input_ids = None
            if not args.raw and tok is not None and tok.chat_template:
                messages = ([{"role": "system", "content": args.system}] if args.system else [])
                input_ids = tok.apply_chat_template(messages + [{"role": "user", "content": prompt}], tokenize=True)
                prompt = None
            params = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                      "top_k": args.top_k, "min_p": args.min_p, "repetition_penalty": args.repetition_penalty,
                      "seed": args.seed, "stop": args.stop}
            t0 = time.perf_counter()
            shown = ""
            last = None
            for chunk in llm.generate(prompt, params, input_ids=input_ids, stream=True):
                text = chunk["text"]
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text
                last = chunk
            sys.stdout.write("\n")
            if args.stats and last is not None:
                m = last["meta_info"]
                dt = time.perf_counter() - t0
                print(f"[{m['prompt_tokens']} prompt + {m['completion_tokens']} new tokens in {dt:.2f}s, "
                      f"{m['completion_tokens'] / dt:.1f} tok/s, finish: {m['finish_reason']}]", file=sys.stderr)
    except (NBEngineError, ValueError, TypeError) as e:
        print(f"nbengine: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
