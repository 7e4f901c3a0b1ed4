"""The tokenizer: HF ``tokenizer.json`` through the ``tokenizers`` library, plus the chat template.

Avoids importing transformers on the engine's start path (it costs seconds); folders without a
``tokenizer.json`` fall back to transformers' AutoTokenizer.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger("nbengine")


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        cfg_path = folder / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        self.chat_template: str | None = self.config.get("chat_template")
        tmpl_file = folder / "chat_template.jinja"
        if self.chat_template is None and tmpl_file.exists():
            self.chat_template = tmpl_file.read_text()
        self._hf = None
        if (folder / "tokenizer.json").exists():
            from tokenizers import Tokenizer as _Tok

            self._tok = _Tok.from_file(str(folder / "tokenizer.json"))
        else:
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(str(folder))
            self._tok = self._hf.backend_tokenizer if hasattr(self._hf, "backend_tokenizer") else None
            self.chat_template = self.chat_template or getattr(self._hf, "chat_template", None)
        self.eos_token = _token_str(self.config.get("eos_token"))
        self.bos_token = _token_str(self.config.get("bos_token"))
        self.eos_token_id = self.token_to_id(self.eos_token) if self.eos_token else None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True) if self._tok else len(self._hf)
        self._token_text: dict[int, str] = {}

    def token_text(self, token_id: int) -> str:
        """The text of one token (the third element of logprob tuples), cached."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self.decode([token_id], skip_special_tokens=False)
            if len(self._token_text) < 1 << 17:
                self._token_text[token_id] = text
        return text

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token) if self._tok else self._hf.convert_tokens_to_ids(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of ``token_id`` as stored (byte-level or ``<0xNN>`` pieces), or None."""
        return self._tok.id_to_token(token_id) if self._tok else self._hf.convert_ids_to_tokens(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._hf is not None:
            return self._hf.encode(text, add_special_tokens=add_special_tokens)
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False, chat_template: str | None = None,
                            tools: list[dict[str, Any]] | None = None, **kwargs: Any) -> str | list[int]:
        """Render the model's chat template (jinja2, sandboxed, as transformers does).

        With ``tokenize=True`` returns token ids: the rendered text already holds the template's
        special tokens (BOS included), so it is encoded *without* adding special tokens again.
        This is the one way every caller (CLI, notebook, server, ``Engine.chat``) turns messages
        into a prompt.
        """
        template = chat_template or self.chat_template
        if not template:
            raise ValueError("This model's tokenizer has no chat template; pass a plain prompt instead.")
        text = _compiled(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text


@functools.lru_cache(maxsize=16)
def _compiled(template: str) -> Any:
    """The template compiled once (compiling costs ~100x rendering; a server renders per request)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(template)


def _raise(message: str) -> None:
    raise ValueError(message)
