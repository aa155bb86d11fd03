"""Values for Long String (LO) attributes, which hold at most 64 characters each.

A pipeline's version names every model that ran (``2.2.0#holdout-normal001 outline 1.0.0 rerank
1.0.0#holdout-normal001`` for the evaluation's fold models), which can pass 64 characters.
Software Versions may hold several values, so a long version is split into values at its spaces
and nothing is lost; a single-valued attribute (the Algorithm Version of a segment) keeps the
beginning and a digest of the whole, so two different versions never read the same.
"""

from __future__ import annotations

import hashlib

LO_MAX = 64


def as_values(text: str) -> str | list[str]:
    """``text`` itself where it fits one LO value, else its words packed into as few values of
    at most 64 characters as they fit (a word longer than that cut into pieces)."""
    if len(text) <= LO_MAX:
        return text
    values: list[str] = []
    for word in text.split():
        pieces = [word[i : i + LO_MAX] for i in range(0, len(word), LO_MAX)]
        for piece in pieces:
            if values and len(values[-1]) + 1 + len(piece) <= LO_MAX:
                values[-1] += " " + piece
            else:
                values.append(piece)
    return values


def as_one(text: str) -> str:
    """``text`` where it fits one LO value, else its first 55 characters, '~' and the first 8
    hex digits of its SHA-256."""
    if len(text) <= LO_MAX:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{text[: LO_MAX - 9]}~{digest}"
