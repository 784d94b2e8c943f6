"""Primitive nodes, and the cold-start rule shared by every built-in pack (no torch/numpy/PIL at import)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from comfy_serverless.nodes import primitives

PACK_MODULES = (
    "comfy_serverless.nodes.primitives",
    "comfy_serverless.nodes.images",
    "comfy_serverless.nodes.masks",
    "comfy_serverless.nodes.image_files",
)


@pytest.mark.parametrize("name, value", [
    ("PrimitiveInt", -7), ("PrimitiveFloat", 2.5), ("PrimitiveString", "cat"),
    ("PrimitiveStringMultiline", "a\nb"), ("PrimitiveBoolean", True),
])
def test_primitive_returns_its_value(name, value):
    cls = primitives.NODE_CLASS_MAPPINGS[name]
    assert getattr(cls(), cls.FUNCTION)(value=value) == (value,)


def test_primitive_definitions_match_comfyui():
    mappings, names = primitives.NODE_CLASS_MAPPINGS, primitives.NODE_DISPLAY_NAME_MAPPINGS
    assert names == {"PrimitiveString": "String", "PrimitiveStringMultiline": "String (Multiline)",
                     "PrimitiveInt": "Int", "PrimitiveFloat": "Float", "PrimitiveBoolean": "Boolean"}
    expected_outputs = {"PrimitiveString": "STRING", "PrimitiveStringMultiline": "STRING",
                        "PrimitiveInt": "INT", "PrimitiveFloat": "FLOAT", "PrimitiveBoolean": "BOOLEAN"}
    for name, cls in mappings.items():
        assert cls.CATEGORY == "utils/primitive"
        assert cls.RETURN_TYPES == (expected_outputs[name],)
        spec = cls.INPUT_TYPES()["required"]
        assert list(spec) == ["value"]
        assert spec["value"][0] == expected_outputs[name]
    int_options = mappings["PrimitiveInt"].INPUT_TYPES()["required"]["value"][1]
    assert int_options == {"min": -sys.maxsize, "max": sys.maxsize, "control_after_generate": True}
    float_options = mappings["PrimitiveFloat"].INPUT_TYPES()["required"]["value"][1]
    assert float_options == {"min": -sys.maxsize, "max": sys.maxsize}  # no step, as ComfyUI 0.3.64 reports
    assert mappings["PrimitiveStringMultiline"].INPUT_TYPES()["required"]["value"][1]["multiline"] is True


def test_pack_modules_import_and_describe_without_heavy_libraries(tmp_path):
    # The catalogue imports packs and calls INPUT_TYPES() before torch is loaded: neither may pull it in.
    script = textwrap.dedent(f"""
        import importlib, sys
        from comfy_serverless import paths
        from comfy_serverless.settings import default_settings
        paths.configure(default_settings(base_directory={str(tmp_path)!r}))
        for name in {PACK_MODULES!r}:
            module = importlib.import_module(name)
            assert module.NODE_CLASS_MAPPINGS, name
            for cls in module.NODE_CLASS_MAPPINGS.values():
                cls.INPUT_TYPES()
        heavy = sorted(m for m in ("torch", "numpy", "PIL") if m in sys.modules)
        assert not heavy, heavy
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
