"""ComfyUI prompt syntax: weights, escapes, embeddings and 77-token windows."""

from __future__ import annotations

import logging

import pytest
import torch

from comfy_serverless.text.prompt_weights import (
    EmbeddingVector,
    chunk_token_groups,
    parse_prompt_weights,
    tokenize_weighted,
    weighted_token_groups,
)
from comfy_serverless.text.tokenizer import PAD_WITH_ZERO, CLIPTokenizer

START, END = 49406, 49407
CAT = 2368  # "cat</w>"


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer()


def approx_segments(segments):
    return [(text, pytest.approx(weight)) for text, weight in segments]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a cat", [("a cat", 1.0)]),
        ("a (cat)", [("a ", 1.0), ("cat", 1.1)]),
        ("((cat))", [("cat", 1.1 * 1.1)]),
        ("(((cat)))", [("cat", 1.1 * 1.1 * 1.1)]),
        ("(cat:1.5) dog", [("cat", 1.5), (" dog", 1.0)]),
        ("((cat:1.5))", [("cat", 1.5)]),  # an explicit weight is absolute, not multiplied
        ("((cat:0.5) dog)", [("cat", 0.5), (" dog", 1.1)]),
        ("(a (b:0.5) c:1.2)", [("a ", 1.2), ("b", 0.5), (" c", 1.2)]),
        ("(cat: 2 )", [("cat", 2.0)]),
        ("(a:b)", [("a:b", 1.1)]),  # not a number: the colon stays, the 1.1 applies
        ("(time: 12:30:1.3)", [("time: 12:30", 1.3)]),  # only the last colon counts
        ("(:2)", [(":2", 1.1)]),  # a colon in first place is text
        ("()", []),
        ("(cat", [("(cat", 1.0)]),  # unbalanced: literal
        ("cat) (dog)", [("cat) (dog)", 1.0)]),  # a stray ")" disables later groups, as in ComfyUI
    ],
)
def test_parse_weights(prompt, expected):
    assert parse_prompt_weights(prompt) == approx_segments(expected)


def test_nested_weights_multiply_in_comfyui_order():
    ((_, weight),) = parse_prompt_weights("((cat))")
    assert weight == 1.0 * 1.1 * 1.1  # bit-exact, not just close


def test_escaped_parentheses_are_literal():
    assert parse_prompt_weights(r"\(literal\) text") == [("(literal) text", 1.0)]
    assert parse_prompt_weights(r"(a \(b\) c:1.3)") == approx_segments([("a (b) c", 1.3)])
    assert parse_prompt_weights(r"\((cat)\)") == approx_segments([("(", 1.0), ("cat", 1.1), (")", 1.0)])


def test_single_window_layout(tokenizer):
    (window,) = tokenize_weighted("a (cat:1.5)", tokenizer)
    assert len(window) == 77
    assert window[:4] == [(START, 1.0), (320, 1.0), (CAT, 1.5), (END, 1.0)]
    assert window[4:] == [(END, 1.0)] * 73  # SD1 pads with the end token


def test_padding_follows_tokenizer(tokenizer):
    (window,) = tokenize_weighted("a cat", CLIPTokenizer(pad_token_id=PAD_WITH_ZERO))
    assert window[3] == (END, 1.0)
    assert {token for token, _ in window[4:]} == {0}


def test_empty_prompt_is_one_empty_window(tokenizer):
    (window,) = tokenize_weighted("", tokenizer)
    assert [token for token, _ in window] == [START, END] + [END] * 75


def body_tokens(windows):
    """Tokens between start and end of every window, padding dropped."""
    bodies = []
    for window in windows:
        tokens = [token for token, _ in window]
        assert tokens[0] == START and len(tokens) == 77
        bodies.append(tokens[1 : tokens.index(END, 1)])
    return bodies


def test_long_prompt_splits_into_full_windows(tokenizer):
    prompt = " ".join(["cat"] * 200)  # one unweighted group of 200 tokens
    windows = tokenize_weighted(prompt, tokenizer)
    bodies = body_tokens(windows)
    assert [len(body) for body in bodies] == [75, 75, 50]
    assert sum(bodies, []) == [CAT] * 200
    assert all(window[76] == (END, 1.0) for window in windows[:2])


def test_mixed_200_token_prompt_keeps_short_groups_whole(tokenizer):
    prompt = ", ".join(f"(word{i}:1.{i % 9 + 1})" if i % 3 == 0 else f"thing{i}" for i in range(53))
    groups = weighted_token_groups(prompt, tokenizer)
    all_tokens = [token for group in groups for token, _ in group]
    assert len(all_tokens) == 201
    windows = tokenize_weighted(prompt, tokenizer)
    bodies = body_tokens(windows)
    assert sum(bodies, []) == all_tokens  # nothing lost, order kept
    assert [len(body) for body in bodies] == [74, 75, 52]  # a 2-token group moved to the second window
    # No short group straddles a window boundary.
    boundaries = set()
    position = 0
    for body in bodies[:-1]:
        position += len(body)
        boundaries.add(position)
    position = 0
    for group in groups:
        inside = range(position + 1, position + len(group))
        if len(group) < 8:
            assert not boundaries.intersection(inside)
        position += len(group)


def test_short_group_moves_to_next_window(tokenizer):
    prompt = " ".join(["cat"] * 72) + " (a b c d e:1.2)"  # 72 + 5 tokens do not fit in 75
    windows = tokenize_weighted(prompt, tokenizer)
    assert [len(body) for body in body_tokens(windows)] == [72, 5]
    assert windows[0][73:] == [(END, 1.0)] * 4  # end token, then padding
    assert {weight for _, weight in windows[1][1:6]} == {1.2}


def test_long_weighted_group_is_cut_at_the_window_edge(tokenizer):
    prompt = " ".join(["cat"] * 72) + " (" + " ".join(["dog"] * 10) + ":0.8)"
    bodies = body_tokens(tokenize_weighted(prompt, tokenizer))
    assert [len(body) for body in bodies] == [75, 7]


def test_chunking_never_loops_on_tiny_windows():
    groups = [[(1, 1.0)] * 5]
    windows = chunk_token_groups(groups, START, END, 0, max_length=4)
    assert [len(w) for w in windows] == [4, 4, 4]
    assert [t for w in windows for t, _ in w if t == 1] == [1] * 5


class FakeEmbeddings:
    def __init__(self, **vectors):
        self.vectors = vectors
        self.asked: list[str] = []

    def __call__(self, name):
        self.asked.append(name)
        return self.vectors.get(name)


def test_embedding_rows_become_tokens(tokenizer):
    style = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    lookup = FakeEmbeddings(style=style)
    (window,) = tokenize_weighted("a embedding:style cat", tokenizer, lookup)
    assert window[0] == (START, 1.0) and window[1] == (320, 1.0)
    for offset, row in enumerate(style):
        token, weight = window[2 + offset]
        assert isinstance(token, EmbeddingVector) and token.name == "style" and weight == 1.0
        assert torch.equal(token.vector, row)
    assert window[4:6] == [(CAT, 1.0), (END, 1.0)]


def test_embedding_name_is_passed_as_written_and_weighted(tokenizer):
    lookup = FakeEmbeddings(**{"style.safetensors": torch.ones(3)})
    (window,) = tokenize_weighted("(embedding:style.safetensors:1.3) cat", tokenizer, lookup)
    assert lookup.asked == ["style.safetensors"]
    token, weight = window[1]
    assert isinstance(token, EmbeddingVector) and weight == pytest.approx(1.3)
    assert window[2] == (CAT, 1.0)


def test_embedding_followed_by_comma(tokenizer):
    lookup = FakeEmbeddings(style=torch.ones(3))
    (window,) = tokenize_weighted("embedding:style, cat", tokenizer, lookup)
    assert lookup.asked == ["style,", "style"]
    assert isinstance(window[1][0], EmbeddingVector)
    assert [token for token, _ in window[2:4]] == tokenizer.encode(", cat")


def test_missing_embedding_is_dropped_with_a_warning(tokenizer, caplog):
    with caplog.at_level(logging.WARNING):
        (window,) = tokenize_weighted("embedding:nothing cat", tokenizer, FakeEmbeddings())
    assert window[:3] == [(START, 1.0), (CAT, 1.0), (END, 1.0)]
    assert "nothing" in caplog.text


def test_without_lookup_embedding_is_plain_text(tokenizer):
    (window,) = tokenize_weighted("a embedding:style", tokenizer)
    expected = tokenizer.encode("a") + tokenizer.encode("embedding:style")
    assert [token for token, _ in window[1 : 1 + len(expected)]] == expected
