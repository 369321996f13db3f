"""Per-token log-probability entries: a token's text and bytes, as Ollama and OpenAI show them.

A token may be part of a UTF-8 character (byte-level BPE splits them), so its
text is taken from its bytes: the byte-level vocabulary's pieces map back to
bytes (GPT-2's reversible byte-to-character table), SentencePiece byte pieces
are `<0xNN>`, anything else is its decoded text. Bytes that are not whole UTF-8
are shown as OpenAI's legacy API shows them: "bytes:\\xNN...".
"""

from __future__ import annotations

import functools
import re
from typing import Any

_SPM_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.lru_cache(maxsize=1)
def byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, character -> byte: printable Latin-1 bytes stand
    for themselves, the others are shifted past U+0100 in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in table.values()]
    table.update({chr(256 + i): b for i, b in enumerate(others)})
    return table


class TokenText:
    """Text and bytes of single tokens, for one tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def bytes_of(self, token: int) -> bytes:
        piece = self._piece(token)
        if piece is not None:
            match = _SPM_BYTE.fullmatch(piece)
            if match:
                return bytes([int(match.group(1), 16)])
            table = byte_level_table()
            if piece and all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        return str(self.tokenizer.decode([token])).encode()

    def _piece(self, token: int) -> str | None:
        convert = getattr(self.tokenizer, "convert_ids_to_tokens", None)
        try:
            piece = convert(token) if convert is not None else None
        except Exception:  # an id the vocabulary does not know: fall back to decode
            return None
        return piece if isinstance(piece, str) else None

    def entry(self, token: int, logprob: float) -> dict[str, Any]:
        raw = self.bytes_of(token)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return {"token": text, "logprob": logprob, "bytes": list(raw)}
