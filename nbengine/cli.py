"""The ``nbengine`` command: ``nbengine generate "prompt"`` streams a completion to the terminal;
``nbengine serve`` serves a model over HTTP (see ``nbengine.server``)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

# Defaults that serve the model in front of the user. The embedded default model is small and
# 4-bit: its first answer token is nearly a coin toss ("The" 0.15, "L" 0.14 for "What is the capital
# of France?"), so sampling (even at its authors' temperature 0.2) answers wrongly in several seeds,
# while greedy decoding answers every time and ends a haiku by itself. A model whose
# generation_config.json recommends sampling values gets those instead (the Engine's
# sampling_defaults="model"); flags given on the command line win over both.
CLI_SAMPLING_DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 256,
    "temperature": 0.0,
    "top_p": 1.0,
    "top_k": -1,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
}
_FROM_MODEL = "(default: the model's generation_config.json value, else %s)"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nbengine", description="nbengine: run a language model from the shell.")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="stream a completion for one prompt",
                       description="Stream a completion for one prompt. Decoding is greedy unless you ask "
                                   "otherwise: it is what serves the small default model best.")
    g.add_argument("prompt", help="the prompt (use '-' to read it from stdin)")
    g.add_argument("--model", default=None,
                   help="HF folder, .gguf file or hub id (default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"at most this many new tokens (default: {CLI_SAMPLING_DEFAULTS['max_new_tokens']})")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy " + _FROM_MODEL % "0")
    g.add_argument("--top-p", type=float, default=None, help=_FROM_MODEL % "1.0")
    g.add_argument("--top-k", type=int, default=None, help="-1 = off " + _FROM_MODEL % "-1")
    g.add_argument("--min-p", type=float, default=None, help=_FROM_MODEL % "0.0")
    g.add_argument("--repetition-penalty", type=float, default=None, help="1.0 = off " + _FROM_MODEL % "1.0")
    g.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    g.add_argument("--stop", action="append", default=None, help="stop string, repeatable (default: none)")
    g.add_argument("--raw", action="store_true",
                   help="send the prompt as is, without the model's chat template (default: templated)")
    g.add_argument("--system", default=None, help="system message for the chat template (default: none)")
    g.add_argument("--dtype", default="auto", help="model dtype (default: %(default)s)")
    g.add_argument("--device", default="auto", help="cpu / cuda (default: %(default)s)")
    g.add_argument("--quantization", default="auto",
                   help="CPU linear layers: auto, none, q8_0 or q4_1 (default: %(default)s)")
    g.add_argument("--stats", action="store_true", help="print token counts and speed to stderr at the end")
    from .server.cli import add_serve_parser

    add_serve_parser(sub)
    return ap


def sampling_params(args: argparse.Namespace, model_defaults: dict[str, Any]) -> dict[str, Any]:
    """The request's sampling params: flags given, else the model's recommendation, else the CLI's default."""
    given = {k: getattr(args, k) for k in CLI_SAMPLING_DEFAULTS if getattr(args, k) is not None}
    return {**CLI_SAMPLING_DEFAULTS, **model_defaults, **given, "seed": args.seed, "stop": args.stop}


def prompt_ids(tokenizer: Any, prompt: str, raw: bool, system: str | None) -> list[int] | None:
    """Token ids of the chat-templated prompt (special tokens added once, by the template), or None for
    a raw prompt / a model without a chat template."""
    if raw or tokenizer is None or not tokenizer.chat_template:
        return None
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=True)


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
            input_ids = prompt_ids(llm.tokenizer, prompt, args.raw, args.system)
            params = sampling_params(args, llm.get_server_info()["default_sampling_params"])
            t0 = time.perf_counter()
            shown = ""
            last = None
            for chunk in llm.generate(None if input_ids else prompt, params, input_ids=input_ids, stream=True):
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
