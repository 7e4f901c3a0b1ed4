"""``%%generate``, ``%%chat`` and ``%nbengine``: thin parsers handing off to the live API."""

from __future__ import annotations

import shlex
import time
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from traitlets import Float, Int, Unicode

from . import render
from .api import execute, model_label, prepare_run, with_seed
from .chat import ChatSession
from .side_by_side import compare, grid_params
from .dashboard import Dashboard
from .engines import EngineRegistry, parse_engine_args
from .images import image_parts, placeholder, resolve_images, thumbnails
from .probs import SHOW, TokenProbs, decoder_for, logprob_args
from .prompting import build_inputs, clean_prompt, interpolate, prompt_list

_SAMPLING_ARGS = [
    argument("-m", "--model", default=None,
             help="engine name (see %%nbengine list), a variable holding an Engine, or a model path / hub id; "
                  "default: the current engine (a shared engine on the default model, started on first use)"),
    argument("--max-new-tokens", type=int, default=None, help="tokens to generate at most (default 256)"),
    argument("--temperature", type=float, default=None, help="0 = greedy (default 0.7)"),
    argument("--top-p", type=float, default=None, help="nucleus sampling (default 0.9)"),
    argument("--top-k", type=int, default=None, help="-1 = off"),
    argument("--stop", action="append", default=None, help="stop string (repeatable)"),
    argument("--seed", type=int, default=None, help="sampling seed (default: a random one, recorded in the output)"),
    argument("--system", default=None, help="system message (chat template)"),
    argument("--format", default="markdown", choices=render.FORMATS,
             help="how the finished output is shown; code puts it in a new cell below"),
    argument("-o", "--out", default=None, metavar="VAR", help="store the output dict (a list for n > 1) in VAR"),
    argument("--no-stream", action="store_true", help="show the output only when done"),
    argument("--image", action="append", default=None, metavar="PATH_OR_VAR",
             help="an image for a vision-language model: a file path or a variable holding a PIL image, bytes, a "
                  "path or a list of them (repeatable; shown as thumbnails above the answer)"),
    argument("--no-interpolate", action="store_true",
             help="send {name} / {In[n]} / {Out[n]} as written instead of filling them in"),
]


def _unquote(value: Any) -> Any:
    """IPython's magic argument parser keeps the quotes of ``--system 'Be brief.'``; drop them."""
    if isinstance(value, list):
        return [_unquote(v) for v in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def _parse(func: Any, line: str) -> Any:
    args = parse_argstring(func, line)
    for key in ("model", "stop", "system", "out", "session", "image"):
        if hasattr(args, key):
            setattr(args, key, _unquote(getattr(args, key)))
    if args.out is not None and not args.out.isidentifier():
        raise UsageError(f"-o needs a variable name, got {args.out!r}.")
    return args


def _with(args: list) -> Any:
    def apply(func: Any) -> Any:
        for dec in reversed(args):
            func = dec(func)
        return func
    return apply


@magics_class
class NBEngineMagics(Magics):
    """Defaults are configurable: ``%config NBEngineMagics.temperature = 0``."""

    max_new_tokens = Int(256, help="default --max-new-tokens").tag(config=True)
    temperature = Float(0.7, help="default --temperature").tag(config=True)
    top_p = Float(0.9, help="default --top-p").tag(config=True)
    ui = Unicode("auto", help="live view: auto (widgets where installed), widget, text").tag(config=True)

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell, **kwargs)
        self.registry = EngineRegistry()
        self.chats: dict[str, ChatSession] = {}
        self.dashboards: list[Dashboard] = []

    # ------------------------------------------------------------ helpers
    def _params(self, args: Any) -> dict[str, Any]:
        p = {"max_new_tokens": self.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens,
             "temperature": self.temperature if args.temperature is None else args.temperature,
             "top_p": self.top_p if args.top_p is None else args.top_p,
             "top_k": args.top_k, "stop": args.stop, "seed": args.seed, "n": getattr(args, "n", 1)}
        return {k: v for k, v in p.items() if v is not None}

    def _engine(self, model: str | None) -> tuple[str, Any]:
        from ..errors import ModelNotFoundError, UnsupportedModelError

        try:
            return self.registry.get(model, self.shell.user_ns)
        except (ModelNotFoundError, UnsupportedModelError) as e:  # a wrong -m: say so in one line
            raise UsageError(str(e)) from None

    def _prompt(self, cell: str, interpolate_on: bool) -> tuple[str, list[str] | None]:
        text = clean_prompt(cell)
        if not text:
            raise UsageError("The cell is empty: write the prompt below the %%generate line.")
        if not interpolate_on:
            return text, None
        return interpolate(text, self.shell.user_ns), prompt_list(text, self.shell.user_ns)

    def _prepared(self, llm: Any, prompts: list[str], params: dict, **kw: Any) -> Any:
        try:
            return prepare_run(llm, prompts, params, ui=self.ui, **kw)
        except (ValueError, TypeError) as e:  # bad options or prompt: a one-line error, nothing enqueued
            raise UsageError(str(e)) from None

    def _images(self, args: Any, llm: Any) -> list[Any]:
        """The cell's ``--image`` values resolved, shown as thumbnails (nothing shown for none)."""
        if not args.image:
            return []
        from IPython.display import display

        try:
            placeholder(llm)  # a text-only model: say so before showing anything
            images = resolve_images(args.image, self.shell.user_ns)
            shown = thumbnails(images)
        except (ValueError, TypeError) as e:
            raise UsageError(str(e)) from None
        display(shown)
        return images

    def _store(self, var: str | None, value: Any) -> None:
        if var:
            self.shell.user_ns[var] = value

    # ---------------------------------------------------------- %%generate
    @magic_arguments()
    @_with(_SAMPLING_ARGS)
    @argument("-n", type=int, default=1, help="samples per prompt (one live pane each)")
    @argument("--show", default="text", choices=SHOW,
              help="probs: each token shaded by its probability, alternatives on hover; "
                   "prompt: the prompt's tokens too (their surprise), with perplexities")
    @argument("--chat", dest="chat", action="store_const", const=True, default=None,
              help="apply the model's chat template (the default where the model has one)")
    @argument("--raw", dest="chat", action="store_const", const=False, help="send the prompt as is")
    @cell_magic
    def generate(self, line: str, cell: str) -> None:
        """Generate from the cell's text, streamed live. A cell that is just ``{name}`` naming a list
        of strings is a batch (one pane per sample)."""
        args = _parse(self.generate, line)
        prompt, batch = self._prompt(cell, not args.no_interpolate)
        prompts = batch or [prompt]
        params = self._params(args)
        if args.format == "code" and (len(prompts) > 1 or args.n > 1):
            raise UsageError("--format code inserts one cell: use it with one prompt and -n 1.")
        if args.show != "text" and args.format != "markdown":
            raise UsageError(f"--show {args.show} shows the tokens themselves; --format applies to --show text only.")
        name, llm = self._engine(args.model)
        images = self._images(args, llm)
        if args.no_stream:
            outs, single = self._generate_quietly(llm, prompts, params, args, images)
        else:
            run = self._prepared(llm, prompts, params, chat=args.chat, system=args.system, fmt=args.format,
                                 images=images, show=args.show)
            try:
                execute(run)
            except KeyboardInterrupt:  # the partial text is shown (marked stopped) and kept in -o
                self._store(args.out, run.outputs()[0] if run.single else run.outputs())
                raise
            outs, single = run.outputs(), run.single
            if run.stats().get("tok_per_s"):
                self.registry.last_tok_per_s[name] = run.stats()["tok_per_s"]
        self._store(args.out, outs[0] if single else outs)
        if args.format == "code" and not render.was_stopped(outs[0]):
            self.shell.set_next_input(render.strip_fences(outs[0]["text"]), replace=False)

    def _generate_quietly(self, llm: Any, prompts: list[str], params: dict, args: Any,
                          images: list[Any]) -> tuple[list[dict], bool]:
        from IPython.display import display

        params = with_seed(params)
        single = len(prompts) == 1 and params.get("n", 1) == 1
        t0 = time.perf_counter()
        try:
            texts, ids, used_chat = build_inputs(llm, prompts, args.chat, args.system, len(images))
            image_data = (images if single else [images] * len(prompts)) if images else None
            res = llm.generate(texts[0] if single and texts else texts, params,
                               input_ids=(ids[0] if single else ids) if ids else None, image_data=image_data,
                               **logprob_args(args.show))
        except (ValueError, TypeError) as e:
            raise UsageError(str(e)) from None
        outs = [res] if single else res
        stats = {"elapsed_s": round(time.perf_counter() - t0, 4), "ttft_s": None, "tok_per_s": None}
        for out in outs:
            b = render.bundle(out, args.format) if args.show == "text" else \
                TokenProbs(out, decoder_for(llm), args.show == "prompt")._repr_mimebundle_()
            display(b, raw=True,
                    metadata=render.metadata(out, stats, model_label(llm), params, {"chat_template": used_chat}))
        return outs, single

    # ----------------------------------------------------------- %%compare
    @magic_arguments()
    @argument("-m", "--model", action="append", default=None,
              help="an engine to compare (repeatable: one column of panes each; default: the current engine)")
    @argument("--temperature", type=float, nargs="+", default=None, help="one pane per value")
    @argument("--top-p", type=float, nargs="+", default=None, help="one pane per value")
    @argument("--top-k", type=int, nargs="+", default=None, help="one pane per value")
    @argument("--seed", type=int, nargs="+", default=None, help="one pane per value")
    @argument("--max-new-tokens", type=int, default=None, help="tokens per pane at most (default 256)")
    @argument("--stop", action="append", default=None, help="stop string (repeatable)")
    @argument("--system", default=None, help="system message (chat template)")
    @argument("--chat", dest="chat", action="store_const", const=True, default=None)
    @argument("--raw", dest="chat", action="store_const", const=False, help="send the prompt as is")
    @argument("-o", "--out", default=None, metavar="VAR", help="store the list of output dicts in VAR")
    @argument("--no-interpolate", action="store_true", help="send {name} as written")
    @cell_magic
    def compare(self, line: str, cell: str) -> None:
        """Run the cell's prompt under every combination of the listed settings (and on every -m engine)
        at once, streamed side by side: ``%%compare --temperature 0 0.8 --seed 1 2``."""
        args = _parse(self.compare, line)
        prompt, _ = self._prompt(cell, not args.no_interpolate)
        base = {"max_new_tokens": self.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "stop": args.stop}
        params = grid_params({k: v for k, v in base.items() if v is not None}, temperature=args.temperature,
                             top_p=args.top_p, top_k=args.top_k, seed=args.seed)
        models = [self._engine(m)[1] for m in (args.model or [None])]
        try:
            outs = compare(prompt, params, models=models, chat=args.chat, system=args.system, ui=self.ui)
        except (ValueError, TypeError) as e:
            raise UsageError(str(e)) from None
        self._store(args.out, outs)

    # -------------------------------------------------------------- %%chat
    @magic_arguments()
    @_with(_SAMPLING_ARGS)
    @argument("--session", default="default", help="conversation name (default: default)")
    @line_cell_magic
    def chat(self, line: str, cell: str | None = None) -> None:
        """Chat with the model; the conversation is kept per --session.
        ``%chat reset [--session NAME]`` forgets it, ``%chat history [--session NAME]`` shows it."""
        if cell is None:
            return self._chat_command(line)
        args = _parse(self.chat, line)
        message, _ = self._prompt(cell, not args.no_interpolate)
        session = self.chats.setdefault(args.session, ChatSession())
        if args.system is not None:
            session.system = args.system
        name, llm = self._engine(args.model)
        tok = getattr(llm, "tokenizer", None)
        if tok is None or not tok.chat_template:
            raise UsageError("This model has no chat template; use %%generate --raw instead of %%chat.")
        images = self._images(args, llm)
        content = image_parts(message, len(images)) if images else message
        messages = session.messages(message)
        messages[-1] = {"role": "user", "content": content}
        ids = tok.apply_chat_template(messages, tokenize=True)
        params = self._params(args)
        # earlier turns' images go again with the whole conversation
        run = self._prepared(llm, [message], params, fmt=args.format, messages_ids=ids,
                             images=session.images + images,
                             extra_meta={"session": args.session, "turn": len(session.turns) // 2 + 1})
        try:
            execute(run)
        except KeyboardInterrupt:
            session.add(content, run.outputs()[0]["text"], images)  # what was shown stays in the conversation
            self._store(args.out, run.outputs()[0])
            raise
        out = run.outputs()[0]
        session.add(content, out["text"], images)
        self._store(args.out, out)

    def _chat_command(self, line: str) -> None:
        words = shlex.split(line)
        cmd = words[0] if words else ""
        name = "default"
        if "--session" in words:
            i = words.index("--session")
            if i + 1 >= len(words):
                raise UsageError("--session needs a name.")
            name = words[i + 1]
        if cmd == "reset":
            self.chats.pop(name, None)
            print(f"Chat session {name!r} reset.")
        elif cmd == "history":
            print(self.chats.get(name, ChatSession()).history(name))
        else:
            raise UsageError("Use %%chat with a message in the cell, or `%chat reset` / `%chat history` "
                             "[--session NAME].")

    # ----------------------------------------------------------- %nbengine
    @line_magic
    def nbengine(self, line: str) -> None:
        """Manage engines: ``load MODEL [key=value ...] [--name NAME]``, ``list``, ``use NAME``,
        ``status [NAME]``, ``shutdown [NAME|all]``, ``dashboard [NAME]`` (a live view of the engine,
        refreshed ~2 times a second while other cells run; ``dashboard close`` stops them all)."""
        words = shlex.split(line)
        cmd, rest = (words[0], words[1:]) if words else ("", [])
        reg = self.registry
        try:
            if cmd == "load":
                if not rest:
                    raise UsageError("Usage: %nbengine load MODEL [key=value ...] [--name NAME] "
                                     "(MODEL: default, a folder, a .gguf file or a hub id).")
                model = None if rest[0] == "default" else rest[0]
                name, engine_args = parse_engine_args(rest[1:])
                reg.load(model, name, **engine_args)
                reg.use(name or (model or "default"))
            elif cmd == "list":
                print(reg.listing())
            elif cmd == "use" and len(rest) == 1:
                reg.use(rest[0])
                print(f"Magics now use engine {rest[0]!r}.")
            elif cmd == "status" and len(rest) <= 1:
                print(reg.status(rest[0] if rest else None))
            elif cmd == "dashboard" and rest == ["close"]:
                self.close_dashboards()
            elif cmd == "dashboard" and len(rest) <= 1:
                name, llm = self._engine(rest[0] if rest else None)
                self.dashboards = [d for d in self.dashboards if d.running]
                self.dashboards.append(Dashboard(llm, title=f"engine {name!r}").show())
            elif cmd == "shutdown" and len(rest) <= 1:
                done = reg.shutdown(rest[0] if rest else None)
                print(f"Shut down: {', '.join(done)}.")
            else:
                raise UsageError("Usage: %nbengine load MODEL [key=value ...] [--name NAME] | list | use NAME | "
                                 "status [NAME] | shutdown [NAME|all] | dashboard [NAME|close]")
        except (ValueError, TypeError) as e:
            raise UsageError(str(e)) from None

    def close_dashboards(self) -> None:
        for d in self.dashboards:
            d.close()
        self.dashboards.clear()
