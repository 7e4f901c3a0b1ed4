"""What one token looks like on its own: its text, or the raw bytes it holds when they are not whole characters.

Each token id is decoded by itself. Byte-level BPE (GPT-2 / SmolLM2 / Llama 3 style) and
SentencePiece byte fallback (``<0xE3>`` pieces) split many characters across tokens; such a token
decodes to U+FFFD. Then its raw bytes are recovered from the vocabulary entry and shown as byte
pieces (``<0xE6>``), with whatever whole characters it also holds as text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's printable stand-ins for the 256 byte values, reversed (character -> byte)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_LEVEL = _byte_level_decoder()


@dataclass(frozen=True)
class Piece:
    """A run of a token's display: ``text`` (kind "text" or "special") or one raw byte (kind "byte")."""

    kind: str
    text: str


@dataclass(frozen=True)
class TokenText:
    token_id: int
    pieces: tuple[Piece, ...]

    @property
    def text(self) -> str:
        """Plain text: characters as they are, bytes as ``<0xNN>``."""
        return "".join(p.text for p in self.pieces)

    @property
    def special(self) -> bool:
        return any(p.kind == "special" for p in self.pieces)

    @property
    def has_bytes(self) -> bool:
        return any(p.kind == "byte" for p in self.pieces)


def split_bytes(raw: bytes) -> tuple[Piece, ...]:
    """Whole UTF-8 characters as text pieces, every byte that is not part of one as a byte piece."""
    pieces: list[Piece] = []
    text = ""
    i = 0
    while i < len(raw):
        for size in (1, 2, 3, 4):
            try:
                ch = raw[i : i + size].decode("utf-8")
            except UnicodeDecodeError:
                continue
            text += ch
            i += size
            break
        else:
            if text:
                pieces.append(Piece("text", text))
                text = ""
            pieces.append(Piece("byte", f"<0x{raw[i]:02X}>"))
            i += 1
    if text:
        pieces.append(Piece("text", text))
    return tuple(pieces)


class TokenDecoder:
    """Decodes token ids one at a time (cached). Without a tokenizer a token shows as ``#id``."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, TokenText] = {}

    def __call__(self, token_id: int) -> TokenText:
        token_id = int(token_id)
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = TokenText(token_id, self._pieces(token_id))
        return hit

    def _pieces(self, token_id: int) -> tuple[Piece, ...]:
        tok = self.tokenizer
        if tok is None:
            return (Piece("special", f"#{token_id}"),)
        try:
            text = tok.decode([token_id], skip_special_tokens=False)
        except Exception:  # noqa: BLE001 - an id the tokenizer does not know (vocab padding)
            return (Piece("special", f"#{token_id}"),)
        if "\ufffd" in text:
            raw = self._raw_bytes(token_id)
            if raw is not None:
                return split_bytes(raw)
        if text and self._is_special(token_id, text):
            return (Piece("special", text),)
        piece = self._vocab_entry(token_id)
        if piece and piece.startswith("▁") and not text.startswith(" "):
            text = " " + text  # SentencePiece decoders drop the leading space of a lone word
        return (Piece("text", text),) if text else (Piece("special", f"#{token_id}"),)

    def _vocab_entry(self, token_id: int) -> str | None:
        getter = getattr(self.tokenizer, "id_to_token", None)
        try:
            return getter(token_id) if getter is not None else None
        except Exception:  # noqa: BLE001
            return None

    def _is_special(self, token_id: int, text: str) -> bool:
        try:
            return self.tokenizer.decode([token_id], skip_special_tokens=True) == "" != text
        except Exception:  # noqa: BLE001
            return False

    def _raw_bytes(self, token_id: int) -> bytes | None:
        piece = self._vocab_entry(token_id)
        if not piece:
            return None
        m = _BYTE_PIECE.fullmatch(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        if all(c in _BYTE_LEVEL for c in piece):
            return bytes(_BYTE_LEVEL[c] for c in piece)
        return None
