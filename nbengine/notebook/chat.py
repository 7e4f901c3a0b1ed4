"""Chat sessions of ``%%chat``: one conversation per name, kept for the notebook's kernel."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ChatSession:
    system: str | None = None
    turns: list[dict[str, Any]] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)  # every image of the conversation so far, in order

    def messages(self, user: str) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns + [{"role": "user", "content": user}]

    def add(self, user: str | list[dict[str, Any]], assistant: str, images: list[Any] | None = None) -> None:
        """One exchange; ``user`` may be content parts (with ``images``, which later turns send again)."""
        self.turns += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        self.images += list(images or [])

    def history(self, name: str) -> str:
        if not self.turns and not self.system:
            return f"Chat session {name!r} is empty."
        lines = [f"chat session {name!r}: {len(self.turns) // 2} exchange(s)"]
        if self.system:
            lines.append(f"[system] {self.system}")
        lines += [f"[{t['role']}] {_text(t['content'])}" for t in self.turns]
        return "\n".join(lines)


def _text(content: str | list[dict[str, Any]]) -> str:
    if isinstance(content, str):
        return content
    return " ".join("[image]" if p.get("type") != "text" else p.get("text", "") for p in content)
