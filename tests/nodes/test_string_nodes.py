"""utils/string nodes and PreviewAny (nodes/strings.py), the regex nodes checked against Python's re."""

from __future__ import annotations

import re

import pytest
import torch

from comfy_serverless.nodes.strings import (
    CaseConverter,
    PreviewAny,
    RegexExtract,
    RegexMatch,
    RegexReplace,
    StringCompare,
    StringConcatenate,
    StringContains,
    StringLength,
    StringReplace,
    StringSubstring,
    StringTrim,
)

TEXT = "Cat 12, dog 7\ncat 300 and COW 4"


def test_plain_string_nodes():
    assert StringConcatenate().execute("a", "b", ", ") == ("a, b",)
    assert StringSubstring().execute("abcdef", 1, -1) == ("bcde",)
    assert StringLength().execute("héllo") == (5,)
    assert CaseConverter().execute("hello wORLD", "UPPERCASE") == ("HELLO WORLD",)
    assert CaseConverter().execute("hello wORLD", "lowercase") == ("hello world",)
    assert CaseConverter().execute("hello wORLD", "Capitalize") == ("Hello world",)
    assert CaseConverter().execute("hello wORLD", "Title Case") == ("Hello World",)
    assert StringTrim().execute("  x \n", "Both") == ("x",)
    assert StringTrim().execute("  x \n", "Left") == ("x \n",)
    assert StringTrim().execute("  x \n", "Right") == ("  x",)
    assert StringReplace().execute("a.b.c", ".", "-") == ("a-b-c",)
    assert StringContains().execute("Hello", "hell", True) == (False,)
    assert StringContains().execute("Hello", "hell", False) == (True,)
    assert StringCompare().execute("Hello", "he", "Starts With", False) == (True,)
    assert StringCompare().execute("Hello", "he", "Starts With", True) == (False,)
    assert StringCompare().execute("Hello", "LO", "Ends With", False) == (True,)
    assert StringCompare().execute("a", "a", "Equal", True) == (True,)
    with pytest.raises(ValueError, match="mode"):
        CaseConverter().execute("x", "sPoNgE")


@pytest.mark.parametrize("pattern, flags", [
    (r"cat \d+", 0), (r"cat \d+", re.IGNORECASE), (r"^cat", re.MULTILINE), (r"7.cat", re.DOTALL), (r"horse", 0),
])
def test_regex_match_agrees_with_re_search(pattern, flags):
    expected = re.search(pattern, TEXT, flags) is not None
    got = RegexMatch().execute(TEXT, pattern, bool(flags & re.IGNORECASE), bool(flags & re.MULTILINE),
                               bool(flags & re.DOTALL))
    assert got == (expected,)


def test_regex_extract_modes_agree_with_re():
    ignore = re.IGNORECASE
    assert RegexExtract().execute(TEXT, r"(\w+) (\d+)", "First Match", True, False, False, 1) == (
        re.search(r"(\w+) (\d+)", TEXT, ignore).group(0),)
    assert RegexExtract().execute(TEXT, r"cat \d+", "All Matches", True, False, False, 1) == (
        "\n".join(re.findall(r"cat \d+", TEXT, ignore)),)
    # with groups, All Matches gives each match's first group, as re.findall's first element
    assert RegexExtract().execute(TEXT, r"(\w+) (\d+)", "All Matches", False, False, False, 1) == (
        "\n".join(m[0] for m in re.findall(r"(\w+) (\d+)", TEXT)),)
    assert RegexExtract().execute(TEXT, r"(\w+) (\d+)", "First Group", True, False, False, 2) == ("12",)
    assert RegexExtract().execute(TEXT, r"(\w+) (\d+)", "All Groups", True, False, False, 2) == (
        "\n".join(m.group(2) for m in re.finditer(r"(\w+) (\d+)", TEXT)),)
    assert RegexExtract().execute(TEXT, r"(\w+) (\d+)", "First Group", True, False, False, 3) == ("",)
    assert RegexExtract().execute(TEXT, r"horse", "First Match", True, False, False, 1) == ("",)


def test_invalid_patterns_as_comfyui():
    assert RegexMatch().execute(TEXT, "(unclosed", True, False, False) == (False,)
    assert RegexExtract().execute(TEXT, "[", "All Matches", True, False, False, 1) == ("",)
    with pytest.raises(ValueError, match="RegexReplace"):
        RegexReplace().execute(TEXT, "(", "x")


def test_regex_replace_agrees_with_re_sub():
    assert RegexReplace().execute(TEXT, r"(\w+) (\d+)", r"\2=\1") == (
        re.sub(r"(\w+) (\d+)", r"\2=\1", TEXT, flags=re.IGNORECASE),)
    assert RegexReplace().execute(TEXT, r"cat", "X", case_insensitive=False, count=1) == (
        TEXT.replace("cat", "X", 1),)
    assert RegexReplace().execute(TEXT, r"^\w", "_", True, True) == (re.sub(r"^\w", "_", TEXT, flags=re.M | re.I),)


def test_preview_any_text():
    assert PreviewAny().main("hi") == {"ui": {"text": ["hi"]}}
    assert PreviewAny().main(3.5)["ui"]["text"] == ["3.5"]
    assert PreviewAny().main(True)["ui"]["text"] == ["True"]
    assert PreviewAny().main(None)["ui"]["text"] == ["None"]
    assert PreviewAny().main({"a": [1, 2]})["ui"]["text"] == ['{"a": [1, 2]}']
    tensor = torch.zeros(2)
    assert PreviewAny().main(tensor)["ui"]["text"] == [str(tensor)]
