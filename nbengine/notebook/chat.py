"""Chat sessions of ``%%chat``: one conversation per name, kept for the notebook's kernel."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ChatSession:
    system: str | None = None
    turns: list[dict[str, str]] = field(default_factory=list)

    def messages(self, user: str) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns + [{"role": "user", "content": user}]

    def add(self, user: str, assistant: str) -> None:
        self.turns += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]

    def history(self, name: str) -> str:
        if not self.turns and not self.system:
            return f"Chat session {name!r} is empty."
        lines = [f"chat session {name!r}: {len(self.turns) // 2} exchange(s)"]
        if self.system:
            lines.append(f"[system] {self.system}")
        lines += [f"[{t['role']}] {t['content']}" for t in self.turns]
        return "\n".join(lines)
