"""The offline CLIP tokenizer against transformers' CLIPTokenizer built from the same merges file."""

from __future__ import annotations

import gzip
import random
import sys
import unicodedata
from pathlib import Path

import pytest
import transformers

from comfy_serverless.text import tokenizer as clip_tokenizer
from comfy_serverless.text.tokenizer import PAD_WITH_END, PAD_WITH_ZERO, CLIPTokenizer

MERGES_USED = 48894


def reference_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab.json / merges.txt equivalents, derived here independently of the module under test."""
    with gzip.open(clip_tokenizer.find_vocab_file(), "rt", encoding="utf-8") as file:
        lines = file.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : MERGES_USED + 1]]
    visible = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    hidden = [b for b in range(256) if b not in visible]
    byte_symbols = [chr(b) for b in visible] + [chr(256 + n) for n in range(len(hidden))]
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


@pytest.fixture(scope="module")
def reference():
    vocab, merges = reference_vocab_and_merges()
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges)


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer()


CORPUS = [
    "a photo of a cat",
    "masterpiece, best quality, 1girl, solo, looking at viewer, (detailed eyes:1.2)",
    "A Photo Of A CAT!!! ...and a DOG???",
    "don't it's we'll they're I'M you've she'd ''s rock'n'roll o'clock 'tis",
    "curly quotes: it’s “fine” — really…",
    "numbers 0 1 12 123456789 3.14159 1,000,000 -42 +7 1e10 0x1F",
    "superscripts and fractions: x² y³ ½ ¾ Ⅻ ① ٣٤٥ ११",
    "café naïve façade résumé Ærøskøbing smörgåsbord",
    "combining: e\u0301 a\u0308 n\u0303 (NFC composes these)",
    "ΟΔΟΣ ΣΟΦΙΑ Σ σ ς αβγ",
    "İstanbul ß ẞ ﬁ ﬂ Ǆ ǅ",
    "日本語のテキスト、中文文本。한국어 텍스트",
    "emoji 🐱👍🏽 👨‍👩‍👧 🇯🇵 ❤️",
    "arabic مرحبا hebrew שלום thai สวัสดี hindi नमस्ते",
    "tabs\tand\nnewlines\r\n  and   runs\u3000of\xa0spaces\u2009here",
    "control \x00 \x01 \x1c\x1d\x1e\x1f \x7f \x85 chars",
    "snake_case __dunder__ kebab-case CamelCase",
    "<|startoftext|>inside<|endoftext|> and <|ENDOFTEXT|> <|end of text|>",
    "symbols ~!@#$%^&*()_+`-={}[]|\\:;\"'<>,.?/ ©®™°±µ¶§",
    "zero\u200bwidth\u200djoiner\ufeffbom",
    "https://example.com/path?query=1&b=2 user@example.com",
    "a" * 300,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "",
    "   ",
    "\n",
]


def test_vocabulary_matches_reference_derivation(tokenizer):
    vocab, _ = reference_vocab_and_merges()
    tables = clip_tokenizer.load_bpe_tables()
    assert tokenizer.vocab_size == 49408
    assert tables.token_to_id == vocab
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407


def test_vocabulary_is_our_package_data():
    clip_tokenizer.load_bpe_tables.cache_clear()
    CLIPTokenizer()
    package_dir = Path(clip_tokenizer.__file__).resolve().parent
    assert Path(clip_tokenizer.find_vocab_file()).resolve().parent == package_dir / "clip_vocab"
    assert (package_dir / "clip_vocab" / "NOTICE.txt").is_file()  # the MIT notice travels with the file
    assert "open_clip" not in sys.modules and "clip" not in sys.modules
    assert clip_tokenizer.load_bpe_tables() is clip_tokenizer.load_bpe_tables()


@pytest.mark.parametrize("text", CORPUS)
def test_encode_matches_transformers(tokenizer, reference, text):
    assert tokenizer.encode(text) == reference(text, add_special_tokens=False)["input_ids"]


def test_random_unicode_matches_transformers(tokenizer, reference):
    rng = random.Random(1234)
    # Unassigned code points are left out: Python's Unicode tables may be older than the reference's.
    sampled = (chr(rng.randrange(0x30000)) for _ in range(4000))
    assigned = [c for c in sampled if unicodedata.category(c) not in ("Cn", "Cs")]
    tricky = list("日本語αΣς²½Ⅻ٣🐱👍🏽\u200d\u0301\t\n \u3000''sdtmlrev")
    pool = [chr(c) for c in range(0x250)] + tricky + assigned
    for _ in range(1500):
        text = "".join(rng.choice(pool) for _ in range(rng.randrange(1, 25)))
        assert tokenizer.encode(text) == reference(text, add_special_tokens=False)["input_ids"], repr(text)


def test_tokenize_pads_and_truncates_like_transformers(reference):
    text = "a photo of an astronaut riding a horse on mars, " * 10
    expected = reference(text, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert CLIPTokenizer(pad_token_id=PAD_WITH_END).tokenize(text) == expected
    short = reference("a cat", padding="max_length", max_length=77)["input_ids"]
    assert CLIPTokenizer().tokenize("a cat") == short


def test_padding_is_configurable():
    sd1 = CLIPTokenizer(pad_token_id=PAD_WITH_END).tokenize("a cat")
    open_clip = CLIPTokenizer(pad_token_id=PAD_WITH_ZERO).tokenize("a cat")
    assert sd1[:4] == open_clip[:4] == [49406, 320, 2368, 49407]
    assert set(sd1[4:]) == {49407} and set(open_clip[4:]) == {0}
    assert len(sd1) == len(open_clip) == 77


def test_known_ids(tokenizer):
    assert tokenizer.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert tokenizer.encode("2024") == [273, 271, 273, 275]  # numbers split into single digits


def test_decode_round_trip(tokenizer):
    text = "a photo of a cat highly detailed"
    assert tokenizer.decode(tokenizer.tokenize(text)) == text
    # Every pre-token ends a "word", so punctuation and digits come back space-separated.
    assert tokenizer.decode(tokenizer.encode("cat, 8k")) == "cat , 8 k"
