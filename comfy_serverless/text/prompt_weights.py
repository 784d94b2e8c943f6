"""ComfyUI's prompt syntax, turned into weighted 77-token CLIP windows.

Syntax (same results as ComfyUI's CLIPTextEncode):
  (text)        weight x 1.1; nesting multiplies: ((text)) is 1.21
  (text:1.5)    weight exactly 1.5, whatever the enclosing groups say
  \\( and \\)     literal parentheses
  embedding:name  a textual-inversion embedding, resolved by a caller-supplied lookup (the name is
                passed as written, extension or not); unknown names are dropped with a warning

Chunking follows ComfyUI too: tokens are collected in groups (one group per weighted segment, with
embeddings and the text after them as groups of their own) and packed into windows of 75 tokens,
each wrapped in start/end tokens and padded to 77. A group shorter than 8 tokens is never split across
windows; longer groups are cut wherever the window fills up.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Protocol

log = logging.getLogger(__name__)

EMBEDDING_PREFIX = "embedding:"
UPWEIGHT_PER_PAREN = 1.1
# Groups shorter than this are moved whole to the next window instead of being split.
MAX_UNSPLIT_GROUP = 8

# Escaped parentheses are swapped for private-use characters while the grouping is parsed.
_ESCAPED_OPEN = "\ue000"
_ESCAPED_CLOSE = "\ue001"
_EMBEDDING_MENTION = re.compile(f"[ \n](?={re.escape(EMBEDDING_PREFIX)})")


@dataclass(frozen=True, eq=False)
class EmbeddingVector:
    """One row of a textual-inversion embedding standing in for a token; `vector` is a [dim] tensor."""

    name: str
    vector: Any


Token = int | EmbeddingVector
WeightedToken = tuple[Token, float]
# name -> tensor of shape [dim] or [count, dim], or None when there is no such embedding.
EmbeddingLookup = Callable[[str], Any]


class Tokenizer(Protocol):
    start_token_id: int
    end_token_id: int
    pad_token_id: int
    max_length: int

    def encode(self, text: str) -> list[int]: ...


def _split_top_level(text: str) -> list[str]:
    """Split into top-level "(...)" groups and the plain text between them.

    Only a depth counter, like ComfyUI: an unmatched "(" leaves the rest as plain text, and a stray ")"
    drives the depth negative so that later groups stay plain text as well.
    """
    parts: list[str] = []
    current = ""
    depth = 0
    for char in text:
        if char == "(":
            if depth == 0 and current:
                parts.append(current)
                current = ""
            depth += 1
            current += char
        elif char == ")":
            depth -= 1
            current += char
            if depth == 0:
                parts.append(current)
                current = ""
        else:
            current += char
    if current:
        parts.append(current)
    return parts


def _collect_segments(text: str, weight: float, segments: list[tuple[str, float]]) -> None:
    for part in _split_top_level(text):
        if len(part) < 2 or part[0] != "(" or part[-1] != ")":
            segments.append((part, weight))
            continue
        inner = part[1:-1]
        inner_weight = weight * UPWEIGHT_PER_PAREN
        colon = inner.rfind(":")
        if colon > 0:  # "(:2)" is text, not a weight
            try:
                inner_weight = float(inner[colon + 1 :])
                inner = inner[:colon]
            except ValueError:
                pass  # "(a:b)" keeps its colon and the 1.1 factor
        _collect_segments(inner, inner_weight, segments)


def parse_prompt_weights(text: str) -> list[tuple[str, float]]:
    """(text, weight) segments in prompt order, escapes resolved."""
    escaped = text.replace("\\)", _ESCAPED_CLOSE).replace("\\(", _ESCAPED_OPEN)
    segments: list[tuple[str, float]] = []
    _collect_segments(escaped, 1.0, segments)
    return [(segment.replace(_ESCAPED_CLOSE, ")").replace(_ESCAPED_OPEN, "("), weight) for segment, weight in segments]


def _embedding_rows(name: str, found: Any) -> list[EmbeddingVector]:
    if len(found.shape) == 1:
        return [EmbeddingVector(name, found)]
    return [EmbeddingVector(name, found[row]) for row in range(found.shape[0])]


def _resolve_embedding(mention: str, lookup: EmbeddingLookup) -> tuple[list[EmbeddingVector], str]:
    """Rows for "embedding:<name> rest..." (prefix already removed) and the text left after the name."""
    words = mention.strip("\n").split()
    if not words:
        return [], ""
    name, leftover = words[0], " ".join(words[1:])
    found = lookup(name)
    if found is None and name.endswith(","):
        # "embedding:name, more" is common: retry without the trailing commas and keep them as text.
        bare = name.rstrip(",")
        found = lookup(bare) if bare else None
        leftover = f"{name[len(bare):]} {leftover}"
        name = bare
    if found is None:
        log.warning("embedding %r not found, ignoring it", name)
        return [], leftover
    return _embedding_rows(name, found), leftover


def weighted_token_groups(
    text: str, tokenizer: Tokenizer, embedding_lookup: EmbeddingLookup | None = None, word_ids: bool = False
) -> list[list[WeightedToken]]:
    """Token groups before chunking; see the module docstring for what a group is.

    word_ids: entries are (token, weight, word) instead, word counting the prompt's space-separated words
    from 1 (an embedding is one word), ComfyUI's `tokenize(text, return_word_ids=True)`."""
    groups: list[list[WeightedToken]] = []
    word = 0
    for segment, weight in parse_prompt_weights(text):
        pieces = [piece for piece in _EMBEDDING_MENTION.split(segment) if piece]
        for piece in pieces:
            if embedding_lookup is not None and piece.startswith(EMBEDDING_PREFIX):
                rows, piece = _resolve_embedding(piece[len(EMBEDDING_PREFIX) :], embedding_lookup)
                if rows:
                    word += 1
                    groups.append([(row, weight, word) if word_ids else (row, weight) for row in rows])
            ids = tokenizer.encode(piece) if piece else []
            if ids and word_ids:
                words = _word_numbers(piece, ids, tokenizer, word)
                word = words[-1]
                groups.append([(token, weight, number) for token, number in zip(ids, words)])
            elif ids:
                groups.append([(token, weight) for token in ids])
    return groups


def _word_numbers(piece: str, ids: list[int], tokenizer: Tokenizer, last_word: int) -> list[int]:
    """The word number of each of piece's tokens, words numbered on from last_word. CLIP's BPE never joins
    across spaces, so the words' own tokens add up to the piece's; should they not, the piece is one word."""
    numbers: list[int] = []
    for word in piece.split():
        count = len(tokenizer.encode(word))
        if count:
            last_word += 1
            numbers.extend([last_word] * count)
    if len(numbers) != len(ids):
        numbers = [last_word + 1] * len(ids)
    return numbers


def chunk_token_groups(
    groups: list[list[WeightedToken]], start_token: int, end_token: int, pad_token: int, max_length: int = 77
) -> list[list[WeightedToken]]:
    """Pack groups into windows of max_length: start, up to max_length - 2 tokens, end, padding."""
    body_length = max_length - 1  # room for start + tokens; the end token takes the last slot
    windows: list[list[WeightedToken]] = []
    window: list[WeightedToken] = [(start_token, 1.0)]

    def close_window() -> None:
        nonlocal window
        window.append((end_token, 1.0))
        window.extend([(pad_token, 1.0)] * (max_length - len(window)))
        windows.append(window)
        window = [(start_token, 1.0)]

    for group in groups:
        keep_whole = len(group) < MAX_UNSPLIT_GROUP
        while group:
            room = body_length - len(window)
            if len(group) <= room:
                window.extend(group)
                break
            # A fresh window cannot do better, so a short group is split only when it is the sole content.
            if not keep_whole or len(window) == 1:
                window.extend(group[:room])
                group = group[room:]
            close_window()
    close_window()
    return windows


def tokenize_weighted(
    text: str, tokenizer: Tokenizer, embedding_lookup: EmbeddingLookup | None = None, word_ids: bool = False
) -> list[list[WeightedToken]]:
    """Prompt -> windows of (token id or EmbeddingVector, weight), each of tokenizer.max_length entries.

    Padding uses tokenizer.pad_token_id, so SD1's CLIP-L and OpenCLIP models get their own padding from
    differently configured tokenizers. Without an embedding_lookup, "embedding:name" is ordinary text.
    """
    groups = weighted_token_groups(text, tokenizer, embedding_lookup, word_ids)
    windows = chunk_token_groups(
        groups, tokenizer.start_token_id, tokenizer.end_token_id, tokenizer.pad_token_id, tokenizer.max_length
    )
    if word_ids:  # start, end and padding tokens are word 0
        return [[entry if len(entry) == 3 else (*entry, 0) for entry in window] for window in windows]
    return windows
