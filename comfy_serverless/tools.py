"""Command-line tools besides `serve`."""

from __future__ import annotations

import argparse
import logging
import os
import time

from . import paths
from .catalog import packs, snapshot

log = logging.getLogger("comfy_serverless")


def write_snapshot(settings) -> int:
    """Imports every pack and writes the catalogue snapshot the server starts from."""
    folders = paths.configure(settings)
    refs = packs.all_pack_refs(folders.model_dirs("custom_nodes"), settings.disable_all_custom_nodes,
                               settings.whitelist_custom_nodes)
    existing = snapshot.load(settings.catalog_file)
    if existing is not None and existing.get("fingerprint") == snapshot.fingerprint(refs):
        # Nothing that describes a node changed: importing every pack again (seconds) would change nothing.
        log.info("catalogue snapshot up to date: %s", settings.catalog_file)
        return 0
    snap = snapshot.build(refs)
    snapshot.save(snap, settings.catalog_file)
    log.info("catalogue snapshot: %d nodes (%d failed) in %.2f s -> %s", len(snap["nodes"]), len(snap["failed"]),
             snap["built_in_s"], settings.catalog_file)
    return 0


def make_test_checkpoint_command(argv: list[str]) -> int:
    """`comfy-serverless make-test-checkpoint`: a random-weight checkpoint in the original single-file layout."""
    parser = argparse.ArgumentParser(
        prog="comfy-serverless make-test-checkpoint",
        description="Write a checkpoint with random weights in the original single-file layout: tiny (a few MB, "
                    "for tests) or full (the real architecture sizes, for benchmarks; SD1.5 is about 2.1 GB).")
    parser.add_argument("--arch", required=True,
                        choices=("sd15", "sd2", "sd2-v", "sdxl", "sdxl_refiner", "sd2_unclip", "sd_x4_upscaler"))
    parser.add_argument("--size", default="tiny", choices=("tiny", "full"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    parser.add_argument("out", metavar="OUT.safetensors")
    args = parser.parse_args(argv)
    if not args.out.endswith((".safetensors", ".sft")):
        parser.error("OUT must end with .safetensors")

    import torch  # only this tool needs it; the server's front stays light

    from .models.random_checkpoints import make_test_checkpoint

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    started = time.perf_counter()
    make_test_checkpoint(args.arch, args.size, args.out, seed=args.seed, dtype=dtype)
    size_mb = os.path.getsize(args.out) / 1e6
    print(f"wrote {args.out}: {args.arch} {args.size} {args.dtype}, {size_mb:.1f} MB in "
          f"{time.perf_counter() - started:.1f} s")
    return 0
