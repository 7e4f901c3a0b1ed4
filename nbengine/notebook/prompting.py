"""From a cell to model input: blank-line stripping, ``{name}`` interpolation, the chat template."""

from __future__ import annotations

import re
from typing import Any

# {name}, {In[3]}, {Out[3]}: only these shapes are touched, so braces in code ({'a': 1}) stay
_PLACEHOLDER = re.compile(r"\{(?:(In|Out)\[(-?\d+)\]|([A-Za-z_][A-Za-z0-9_]*))\}")


def clean_prompt(cell: str) -> str:
    """The cell without leading/trailing blank lines (a trailing newline changes a small model's answer)."""
    lines = cell.splitlines()
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    return "\n".join(lines)


def _lookup(user_ns: dict[str, Any], kind: str | None, index: str | None, name: str | None) -> tuple[bool, Any]:
    if name is not None:
        return (True, user_ns[name]) if name in user_ns else (False, None)
    seq = user_ns.get(kind)
    i = int(index)
    try:
        return True, seq[i]
    except (KeyError, IndexError, TypeError):
        return False, None


def interpolate(text: str, user_ns: dict[str, Any]) -> str:
    """Fill in ``{name}`` / ``{In[n]}`` / ``{Out[n]}`` where they name something; leave the rest as written."""
    def sub(m: re.Match) -> str:
        found, value = _lookup(user_ns, m.group(1), m.group(2), m.group(3))
        return str(value) if found else m.group(0)

    return _PLACEHOLDER.sub(sub, text)


def prompt_list(text: str, user_ns: dict[str, Any]) -> list[str] | None:
    """A cell that is exactly ``{name}`` naming a list of strings is a batch of prompts."""
    m = _PLACEHOLDER.fullmatch(text.strip())
    if m is None:
        return None
    found, value = _lookup(user_ns, m.group(1), m.group(2), m.group(3))
    if found and isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return [clean_prompt(v) for v in value]
    return None


def chat_input_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` with the model's chat template and a generation prompt."""
    return tokenizer.apply_chat_template(messages, tokenize=True)


def has_chat_template(llm: Any) -> bool:
    tok = getattr(llm, "tokenizer", None)
    return tok is not None and bool(getattr(tok, "chat_template", None))


def build_inputs(llm: Any, prompts: list[str], chat: bool | None, system: str | None, num_images: int = 0
                 ) -> tuple[list[str] | None, list[list[int]] | None, bool]:
    """``(prompts, input_ids, used_chat)``: the chat template where wanted and available, else raw text.

    ``chat=None`` means "where the model has one"; ``chat=True`` on a model without one raises.
    ``num_images``: each prompt gets that many image placeholders (image content parts with the
    chat template; the model's placeholder text in front of a raw prompt that has none).
    """
    from .images import image_parts, placeholder

    mark = placeholder(llm) if num_images else ""  # raises for a text-only model
    templ = has_chat_template(llm)
    if chat and not templ:
        raise ValueError("This model has no chat template; use --raw (or chat=False) to send the prompt as is.")
    if system is not None and not (chat or (chat is None and templ)):
        raise ValueError("--system needs the chat template; drop --raw or drop --system.")
    if chat is False or not templ:
        return [p if not mark or mark in p else mark * num_images + p for p in prompts], None, False
    head = [{"role": "system", "content": system}] if system else []
    ids = [chat_input_ids(llm.tokenizer, head + [{"role": "user", "content": image_parts(p, num_images)
                                                   if num_images else p}]) for p in prompts]
    return None, ids, True
