"""Packs import the issue-11 image, mask and string nodes under ComfyUI's module names (comfy_extras.nodes_mask,
nodes_images, nodes_post_processing, nodes_morphology, nodes_canny, nodes_compositing, nodes_string,
nodes_preview_any) and get our classes; a pack subclassing them runs through the real server."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

EXPECTED = {
    "nodes_mask": ["CropMask", "FeatherMask", "GrowMask", "ImageColorToMask", "MaskComposite", "MaskPreview",
                   "ThresholdMask", "ImageCompositeMasked", "SolidMask"],
    "nodes_compositing": ["PorterDuffImageComposite", "SplitImageWithAlpha", "JoinImageWithAlpha"],
    "nodes_images": ["ImageCrop", "ImageFromBatch", "RepeatImageBatch", "ImageAddNoise", "SaveAnimatedPNG",
                     "SaveAnimatedWEBP", "ImageStitch", "ResizeAndPadImage", "GetImageSize", "ImageRotate",
                     "ImageFlip", "ImageScaleToMaxDimension"],
    "nodes_post_processing": ["Blend", "Blur", "Quantize", "Sharpen", "ImageScaleToTotalPixels"],
    "nodes_morphology": ["Morphology", "ImageRGBToYUV", "ImageYUVToRGB"],
    "nodes_canny": ["Canny"],
    "nodes_string": ["StringConcatenate", "StringSubstring", "StringLength", "CaseConverter", "StringTrim",
                     "StringReplace", "StringContains", "StringCompare", "RegexMatch", "RegexExtract", "RegexReplace"],
    "nodes_preview_any": ["PreviewAny"],
}


def test_comfy_extras_modules_give_our_classes(tmp_path):
    code = textwrap.dedent(f"""
        import importlib, json
        from comfy_serverless.catalog import comfy_modules
        comfy_modules.install()
        found = {{}}
        for module, names in {EXPECTED!r}.items():
            loaded = importlib.import_module("comfy_extras." + module)
            found[module] = {{name: getattr(loaded, name).__module__ for name in names}}
            found[module]["_mapped"] = sorted(loaded.NODE_CLASS_MAPPINGS)
        print(json.dumps(found))
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout)
    for module, names in EXPECTED.items():
        for name in names:
            assert found[module][name].startswith("comfy_serverless.nodes."), (module, name, found[module][name])
    assert "GrowMask" in found["nodes_mask"]["_mapped"] and "ImageBlend" in found["nodes_post_processing"]["_mapped"]
    assert found["nodes_morphology"]["_mapped"] == ["ImageRGBToYUV", "ImageYUVToRGB", "Morphology"]


PACK = '''
from comfy_extras.nodes_mask import GrowMask
from comfy_extras.nodes_string import StringConcatenate
from comfy_extras.nodes_morphology import Morphology


class GrowMaskTwice(GrowMask):
    """A pack node built on ComfyUI's GrowMask."""

    def expand_mask(self, mask, expand, tapered_corners):
        once = super().expand_mask(mask, expand, tapered_corners)[0]
        return super().expand_mask(once, expand, tapered_corners)


class MaskArea:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mask": ("MASK",)}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "area"
    CATEGORY = "testing"

    def area(self, mask):
        joined = StringConcatenate().execute("area", str(int(mask.sum().item())), "=")[0]
        return {"ui": {"area": [joined]}}


NODE_CLASS_MAPPINGS = {"GrowMaskTwice": GrowMaskTwice, "MaskArea": MaskArea, "PackMorphology": Morphology}
'''


def test_a_pack_subclassing_extras_nodes_runs_through_the_server(start_server, tmp_path):
    base = tmp_path / "extras-pack"
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "extras_pack.py").write_text(PACK)
    srv = start_server(packs=(), base=base)
    info = srv.get("/object_info").json()
    assert "GrowMaskTwice" in info, srv.log()[-3000:]
    assert info["GrowMaskTwice"]["input"] == info["GrowMask"]["input"]
    prompt = {
        "1": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 9, "height": 9}},
        "2": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 1, "height": 1}},
        "3": {"class_type": "MaskComposite", "inputs": {"destination": ["1", 0], "source": ["2", 0], "x": 4, "y": 4,
                                                        "operation": "add"}},
        "4": {"class_type": "GrowMaskTwice", "inputs": {"mask": ["3", 0], "expand": 1, "tapered_corners": True}},
        "5": {"class_type": "MaskArea", "inputs": {"mask": ["4", 0]}},
    }
    entry = srv.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert entry["outputs"]["5"]["area"] == ["area=13"]  # a diamond of radius 2: 1 + 4 + 8 pixels
