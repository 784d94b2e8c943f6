"""Offline CLIP byte-pair-encoding tokenizer (the one every Stable Diffusion text encoder uses).

The merge list is OpenAI's `bpe_simple_vocab_16e6.txt.gz` (MIT), shipped unmodified as package data in
`clip_vocab/` beside this module, with its licence in `clip_vocab/NOTICE.txt`.

Output matches transformers' `CLIPTokenizer` built from the same merges: NFC, whitespace runs collapsed,
lowercase, CLIP's pre-tokenizer split, byte-level BPE with a `</w>` end-of-word marker.
"""

from __future__ import annotations

import functools
import os
import re
import unicodedata
import zlib
from dataclasses import dataclass

START_TOKEN_ID = 49406
END_TOKEN_ID = 49407
# SD1's CLIP-L pads with the end token; OpenCLIP models (SD2's ViT-H, SDXL's bigG) pad with 0.
PAD_WITH_END = END_TOKEN_ID
PAD_WITH_ZERO = 0
CONTEXT_LENGTH = 77

VOCAB_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip_vocab")

# CLIP keeps 49152 - 256 - 2 merges: the vocabulary is 256 bytes, 256 bytes + "</w>", the merges and the
# two special tokens, 49408 entries in all.
MERGE_COUNT = 49152 - 256 - 2
END_OF_WORD = "</w>"
START_TEXT = "<|startoftext|>"
END_TEXT = "<|endoftext|>"

# Unicode White_Space, which is what the reference tokenizer's regex engine calls \s. Python's \s adds
# U+001C..U+001F; those must stay ordinary symbols here.
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_WHITESPACE_RUN = re.compile(f"[{_WHITESPACE}]+")
_SPECIAL_TEXT = re.compile(f"({re.escape(START_TEXT)}|{re.escape(END_TEXT)})")

# CLIP's split is: contractions | letter run | single number | run of anything else that is not space.
# Python's re has no \p{L}: [^\W\d_] is letters plus the non-decimal numbers (superscripts, roman
# numerals, ...), which _split_letter_run separates again. The last class is \p{N}-free, non-letter,
# non-space: \W minus whitespace, plus the underscore that \w claims.
_PRE_TOKEN = re.compile(
    rf"'s|'t|'re|'ve|'m|'ll|'d|(?P<letters>[^\W\d_]+)|\d|(?:[^\w{_WHITESPACE}]|_)+"
)


def _byte_alphabet() -> list[tuple[int, str]]:
    """(byte, stand-in character) pairs in vocabulary order.

    Printable Latin-1 bytes stand for themselves; the rest (controls, space, ...) get the characters from
    U+0100 upwards, so every BPE symbol is a visible, non-space character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    printable_set = set(printable)
    others = [b for b in range(256) if b not in printable_set]
    return [(b, chr(b)) for b in printable] + [(b, chr(256 + i)) for i, b in enumerate(others)]


def find_vocab_file() -> str:
    """Path of the BPE merges file shipped with this package (pyproject.toml's package-data)."""
    path = os.path.join(VOCAB_DIR, VOCAB_FILE_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP vocabulary {path} is missing: this install of comfy-serverless is incomplete")
    return path


@dataclass(frozen=True)
class BPETables:
    """Everything derived from the merges file; built once per process and shared by all tokenizers."""

    merge_ranks: dict[str, int]  # "left right" (a merges-file line) -> priority, lower merges first
    token_to_id: dict[str, int]
    id_to_token: tuple[str, ...]
    byte_to_char: dict[int, str]
    char_to_byte: dict[str, int]


def read_merge_lines(path: str) -> list[str]:
    """The first MERGE_COUNT "left right" lines. The file holds ~262k merges, so only the needed prefix
    is decompressed."""
    with open(path, "rb") as file:
        compressed = file.read()
    inflater = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)  # | 16: expect a gzip header
    chunks: list[bytes] = []
    newlines = 0
    for position in range(0, len(compressed), 1 << 16):
        chunk = inflater.decompress(compressed[position : position + (1 << 16)])
        chunks.append(chunk)
        newlines += chunk.count(b"\n")
        if newlines > MERGE_COUNT:
            break
    lines = b"".join(chunks).decode("utf-8").split("\n")[1 : MERGE_COUNT + 1]  # line 0: version header
    if len(lines) < MERGE_COUNT:
        raise ValueError(f"{path}: expected at least {MERGE_COUNT} merges, found {len(lines)}")
    return lines


@functools.lru_cache(maxsize=4)
def load_bpe_tables(path: str | None = None) -> BPETables:
    # Plain-string keys and C-level builders (zip, replace) keep this well under 100 ms.
    merge_lines = read_merge_lines(path or find_vocab_file())
    alphabet = _byte_alphabet()
    byte_chars = [char for _, char in alphabet]
    tokens = byte_chars + [char + END_OF_WORD for char in byte_chars]
    tokens += [line.replace(" ", "") for line in merge_lines]  # symbols never contain spaces
    tokens += [START_TEXT, END_TEXT]
    return BPETables(
        merge_ranks=dict(zip(merge_lines, range(MERGE_COUNT))),
        token_to_id=dict(zip(tokens, range(len(tokens)))),
        id_to_token=tuple(tokens),
        byte_to_char=dict(alphabet),
        char_to_byte={char: byte for byte, char in alphabet},
    )


def normalize_text(text: str) -> str:
    """NFC, whitespace runs to one space, lowercase (character by character, as the reference does:
    Python's str.lower alone would turn a word-final Σ into ς)."""
    text = unicodedata.normalize("NFC", text)
    text = _WHITESPACE_RUN.sub(" ", text)
    return text.replace("Σ", "σ").lower()


def _split_letter_run(run: str) -> list[str]:
    """Split a [^\\W\\d_]+ match into letter runs and single non-letter number characters."""
    if run.isalpha():
        return [run]
    pieces: list[str] = []
    letters = ""
    for char in run:
        if char.isalpha():
            letters += char
            continue
        if letters:
            pieces.append(letters)
            letters = ""
        pieces.append(char)
    if letters:
        pieces.append(letters)
    return pieces


def pre_tokenize(text: str) -> list[str]:
    """Split already-normalized text into the words BPE runs on."""
    words: list[str] = []
    for match in _PRE_TOKEN.finditer(text):
        if match.lastgroup == "letters":
            words.extend(_split_letter_run(match.group()))
        else:
            words.append(match.group())
    return words


class CLIPTokenizer:
    """CLIP tokenizer with configurable padding.

    `encode` gives bare token ids; `tokenize` wraps them with start/end tokens and pads (or truncates) to
    the context length, like the reference tokenizer does for a single 77-token window.
    """

    start_token_id = START_TOKEN_ID
    end_token_id = END_TOKEN_ID
    _WORD_CACHE_LIMIT = 20_000

    def __init__(
        self, pad_token_id: int = PAD_WITH_END, max_length: int = CONTEXT_LENGTH, vocab_path: str | None = None
    ):
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        self._tables = load_bpe_tables(vocab_path)
        self._word_cache: dict[str, tuple[int, ...]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self._tables.id_to_token)

    def encode(self, text: str) -> list[int]:
        """Token ids for `text`, without start/end/pad tokens."""
        ids: list[int] = []
        for piece in _SPECIAL_TEXT.split(text):
            if piece == START_TEXT:
                ids.append(START_TOKEN_ID)
            elif piece == END_TEXT:
                ids.append(END_TOKEN_ID)
            elif piece:
                for word in pre_tokenize(normalize_text(piece)):
                    ids.extend(self._word_ids(word))
        return ids

    def tokenize(self, text: str) -> list[int]:
        """One padded context window: start, up to max_length - 2 tokens, end, padding."""
        body = self.encode(text)[: self.max_length - 2]
        ids = [START_TOKEN_ID, *body, END_TOKEN_ID]
        return ids + [self.pad_token_id] * (self.max_length - len(ids))

    def decode(self, ids: list[int]) -> str:
        """Readable text for ids (special tokens dropped); for logs and debugging."""
        tables = self._tables
        symbols = "".join(tables.id_to_token[i] for i in ids if i not in (START_TOKEN_ID, END_TOKEN_ID))
        raw = bytearray()
        for word in symbols.split(END_OF_WORD):
            raw.extend(tables.char_to_byte[char] for char in word)
            raw.extend(b" ")
        return raw.decode("utf-8", errors="replace").strip()

    def _word_ids(self, word: str) -> tuple[int, ...]:
        cached = self._word_cache.get(word)
        if cached is not None:
            return cached
        byte_to_char = self._tables.byte_to_char
        # surrogatepass: a lone surrogate (possible in JSON input) becomes bytes instead of an error.
        symbols = self._merge("".join(byte_to_char[b] for b in word.encode("utf-8", "surrogatepass")))
        token_to_id = self._tables.token_to_id
        ids = tuple(token_to_id[symbol] for symbol in symbols)
        if len(self._word_cache) >= self._WORD_CACHE_LIMIT:
            self._word_cache.clear()
        self._word_cache[word] = ids
        return ids

    def _merge(self, word: str) -> list[str]:
        """Greedy BPE: repeatedly merge the adjacent pair with the lowest rank, all its occurrences at once."""
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        ranks = self._tables.merge_ranks
        while len(symbols) > 1:
            best_rank, best_index = min(
                (ranks.get(f"{left} {right}", MERGE_COUNT), index)
                for index, (left, right) in enumerate(zip(symbols, symbols[1:]))
            )
            if best_rank == MERGE_COUNT:
                break
            left, right = symbols[best_index], symbols[best_index + 1]
            merged = symbols[:best_index]
            index = best_index
            while index < len(symbols):
                if index + 1 < len(symbols) and symbols[index] == left and symbols[index + 1] == right:
                    merged.append(left + right)
                    index += 2
                else:
                    merged.append(symbols[index])
                    index += 1
            symbols = merged
        return symbols
