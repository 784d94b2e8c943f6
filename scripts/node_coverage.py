"""ComfyUI 0.3.64's core nodes (docs/comfyui-0.3.64-nodes.json) against this server's built-in nodes.

Prints the README's coverage table: per category, how many of ComfyUI's nodes exist here, and the missing ones
with the reason. Every missing node must match a reason below; one that matches none is printed under
"NO REASON" and makes the script exit 1 (tests/test_node_coverage.py runs it and compares with the README).

    .venv/bin/python scripts/node_coverage.py            # the markdown table
    .venv/bin/python scripts/node_coverage.py --check    # exit 1 if README.md's table differs
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "comfyui-0.3.64-nodes.json"
BEGIN, END = "<!-- node-coverage:begin -->", "<!-- node-coverage:end -->"

# (pattern on "category/NodeName", reason). First match wins.
REASONS = [
    (r"^api node/", "calls a paid remote API through comfy.org; not part of a self-hosted server"),
    (r"(^|/)3d(/|$)|3d_models|Hunyuan3D|VoxelToMesh|SaveGLB", "3D model families are not supported here"),
    (r"video|Video|/WebcamCapture$|LTXV|Wan|Cosmos|Mochi|Hunyuan|SVD_|TrimVideoLatent|ImageOnlyCheckpoint"
     r"|CreateVideo|GetVideoComponents|LoadVideo|SaveVideo|SaveWEBM|camera/",
     "video model families (and video files) are not supported here"),
    (r"Flux|flux|SD3|sd3|StableCascade|stable_cascade|Lumina|HiDream|Qwen|AuraFlow|Auraflow|Chroma|chroma"
     r"|PixArt|HunyuanDiT|SkipLayerGuidanceDiT|RenormCFG|T5Tokenizer|ModelPatchLoader|USOStyleReference"
     r"|ControlNetInpaintingAliMama|ReferenceLatent|FluxKontext|TripleCLIPLoader|QuadrupleCLIPLoader"
     r"|ModelSamplingAuraFlow|ModelSamplingSD3|ModelSamplingLTXV|ModelSamplingFlux|EmptySD3LatentImage"
     r"|ModelMerge(AuraFlow|Auraflow|Cosmos|Flux1|LTXV|Mochi|QwenImage|SD35|SD3|WAN)"
     r"|EasyCache|LazyCache|ContextWindows",
     "model family not supported here (the server runs SD 1.x, SD 2.x and SDXL)"),
    (r"audio|Audio|AceStep", "audio models are not supported here"),
    (r"^training/|TrainLora|LossGraph|SaveLoRANode|LoraModelLoader", "LoRA training is not offered"),
    (r"/Load3D|/Preview3D|SaveSVGNode", "needs ComfyUI's browser frontend or its SVG type"),
    (r"UNetTemporalAttentionMultiply", "video model families are not supported here"),
    (r"OptimalStepsScheduler", "its tables exist only for FLUX, Wan and Chroma, which are not supported here"),
    (r"GITSScheduler", "needs GITS's per-step-count tables, which are not reproduced here"),
    (r"LotusConditioning", "Lotus depth/normal models are not supported here"),
]


def reference() -> dict:
    return json.loads(REFERENCE.read_text())


def builtin_names() -> set[str]:
    sys.path.insert(0, str(ROOT))
    from comfy_serverless.catalog import packs

    classes = packs.import_all([f"builtin:{module}" for module in packs.BUILTIN_PACKS])
    return set(classes)


def reason_for(category: str, name: str) -> str | None:
    key = f"{category}/{name}"
    for pattern, reason in REASONS:
        if re.search(pattern, key):
            return reason
    return None


def table(ours: set[str], nodes: dict) -> tuple[str, list[str]]:
    by_category: dict[str, list[str]] = defaultdict(list)
    for name, info in nodes.items():
        by_category[info["category"]].append(name)
    rows = ["| category | here / ComfyUI | missing, and why |", "|---|---|---|"]
    unexplained = []
    have_total = 0
    for category in sorted(by_category):
        names = sorted(by_category[category])
        have = [n for n in names if n in ours]
        have_total += len(have)
        missing: dict[str, list[str]] = defaultdict(list)
        for name in names:
            if name in ours:
                continue
            reason = reason_for(category, name)
            if reason is None:
                unexplained.append(name)
                reason = "NO REASON"
            missing[reason].append(name)
        why = "; ".join(f"{', '.join(f'`{n}`' for n in group)}: {reason}" for reason, group in missing.items())
        rows.append(f"| {category} | {len(have)} / {len(names)} | {why or '-'} |")
    rows.append(f"| **all** | **{have_total} / {len(nodes)}** | |")
    return "\n".join(rows), unexplained


def main() -> int:
    nodes = reference()
    markdown, unexplained = table(builtin_names(), nodes)
    if "--check" in sys.argv:
        readme = (ROOT / "README.md").read_text()
        current = readme.split(BEGIN, 1)[1].split(END, 1)[0].strip() if BEGIN in readme else ""
        if current != markdown:
            print("README.md's node coverage table is out of date: run scripts/node_coverage.py")
            return 1
    else:
        print(markdown)
    if unexplained:
        print("NO REASON for:", ", ".join(sorted(unexplained)), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
