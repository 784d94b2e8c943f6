"""Every built-in node that ComfyUI 0.3.64 also has must describe itself exactly as ComfyUI's /object_info does.

The reference is docs/comfyui-0.3.64-nodes.json (the interface facts of every ComfyUI core node). Compared per
node: category, display name, outputs, output names and list flags, output node flag, input order, and every
input's type and options (tooltips aside, and a model-file combo's file list, which depends on the disk).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from comfy_serverless.catalog import packs, snapshot
from comfy_serverless.catalog.describe import FILES_MARKER

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "comfyui-0.3.64-nodes.json"
COMPARED = ("category", "display_name", "output", "output_is_list", "output_name", "output_node", "input_order")


def _reference() -> dict:
    return json.loads(REFERENCE.read_text())


def _ours() -> dict:
    nodes, failed = snapshot.describe_classes(packs.import_all([f"builtin:{module}" for module in packs.BUILTIN_PACKS]))
    assert not failed
    return {name: entry["info"] for name, entry in nodes.items()}


def _normalised_spec(spec):
    """An input spec as [type, options] with tooltips dropped and an empty options dict added."""
    if isinstance(spec, str):  # hidden inputs
        return spec
    spec = list(spec)
    options = dict(spec[1]) if len(spec) > 1 and isinstance(spec[1], dict) else {}
    options.pop("tooltip", None)
    kind = spec[0]
    if isinstance(kind, dict) and FILES_MARKER in kind:
        kind = "<files>"
    return [kind, options]


def _normalised_inputs(inputs: dict) -> dict:
    return {section: {name: _normalised_spec(spec) for name, spec in entries.items()}
            for section, entries in inputs.items()}


def _file_combos(ours: dict) -> set[tuple[str, str]]:
    """Inputs whose options are a model folder's files: V1 [{"__files__": ...}, {...}] and V3 ["COMBO",
    {"options": {"__files__": ...}}]."""
    found = set()
    for section, entries in ours["input"].items():
        for name, spec in entries.items():
            if not isinstance(spec, list):
                continue
            if isinstance(spec[0], dict) and FILES_MARKER in spec[0]:
                found.add((section, name))
            elif spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1].get("options"), dict):
                found.add((section, name))
    return found


def differences(ours: dict, theirs: dict) -> list[str]:
    found = [f"{key}: ours {ours.get(key)!r}, ComfyUI {theirs.get(key)!r}"
             for key in COMPARED if ours.get(key) != theirs.get(key)]
    for flag in ("deprecated", "experimental"):
        if bool(ours.get(flag)) != bool(theirs.get(flag)):
            found.append(f"{flag}: ours {bool(ours.get(flag))}, ComfyUI {bool(theirs.get(flag))}")
    our_inputs = _normalised_inputs(ours["input"])
    their_inputs = _normalised_inputs(theirs["input"])
    for section, name in _file_combos(ours):  # ComfyUI's list is the files of the machine it was read on
        for inputs in (our_inputs, their_inputs):
            spec = inputs.get(section, {}).get(name)
            if isinstance(spec, list) and spec[0] == "COMBO":
                spec[1]["options"] = "<files>"
            elif isinstance(spec, list):
                spec[0] = "<files>"
    for section in sorted(set(our_inputs) | set(their_inputs)):
        mine, reference = our_inputs.get(section, {}), their_inputs.get(section, {})
        for name in sorted(set(mine) | set(reference)):
            if mine.get(name) != reference.get(name):
                found.append(f"input {section}.{name}: ours {mine.get(name)!r}, ComfyUI {reference.get(name)!r}")
    return found


@pytest.fixture(scope="module")
def both():
    return _ours(), _reference()


def test_every_shared_node_matches_comfyui(both):
    ours, reference = both
    shared = sorted(set(ours) & set(reference))
    assert len(shared) >= 59
    report = {name: differences(ours[name], reference[name]) for name in shared}
    report = {name: found for name, found in report.items() if found}
    assert not report, json.dumps(report, indent=1)


def test_the_comparison_sees_a_changed_default(both):
    ours, reference = both
    changed = json.loads(json.dumps(ours["KSampler"]))
    changed["input"]["required"]["steps"][1]["default"] = 21
    assert any("steps" in line for line in differences(changed, reference["KSampler"]))
