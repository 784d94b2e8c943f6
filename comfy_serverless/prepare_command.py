"""`comfy-serverless prepare`: write every model file once in the dtype this CPU class computes in.

Covers checkpoints, VAEs, and the part files of UNETLoader (diffusion_models) and CLIPLoader (text_encoders).

Run it at image build time, after the models are in place and with the same flags the server will get
(--force-fp32 and friends change the dtype). A cold start then memory-maps the prepared file instead of
converting (models/prepared.py). Each UNet (checkpoints, diffusion_models) then runs one step at --pack-size and
its weights are written packed as the CPU kernels compute with them (models/prepared_packs.py), so a cold start's
first step packs nothing (an fp32 UNet from an fp16 checkpoint: held as fp16, half the memory, expanded at each
call). Files already prepared and unchanged are skipped; `--check` only reports.
Also runnable as `python -m comfy_serverless.prepare_command`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

log = logging.getLogger("comfy_serverless")


def _arguments(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="comfy-serverless prepare", add_help=False,
        description="Write each checkpoint, VAE, diffusion_models UNet and text encoder file in the dtype and layout "
                    "the server computes in on this CPU class, so cold starts memory-map it instead of converting. "
                    "Takes the server's flags (--base-directory, --extra-model-paths-config, --force-fp32...).")
    parser.add_argument("--prepared-dir", help=f"where to write (default: ${'{'}COMFY_PREPARED_DIR{'}'} or "
                                               "<base>/.comfy-serverless/prepared)")
    parser.add_argument("--check", action="store_true", help="only say which files are prepared and current")
    parser.add_argument("--pack-size", type=int, default=None, metavar="PIXELS",
                        help="also write each UNet's weights packed as its CPU kernels compute with them, after one "
                             "step at PIXELS x PIXELS (default 512; 0: do not); fp32 weights that are all fp16 "
                             "values (an fp16 checkpoint's) are written as fp16, but for the largest (up to 9 %% of "
                             "the UNet's fp32 bytes)")
    parser.add_argument("--help", "-h", action="store_true")
    known, rest = parser.parse_known_args(argv)
    if known.help:
        parser.print_help()
        raise SystemExit(0)
    if known.pack_size is not None and known.pack_size < 0:
        parser.error("--pack-size must be 0 or more")
    return known, rest


def cpu_class() -> str:
    """What the prepared dtypes were chosen for, recorded in the file for the logs."""
    from .models.precision import cpu_facts, default_decision

    facts = cpu_facts()
    decision = default_decision()
    return f"{facts.model}; {'bf16' if decision.bf16 else 'fp32'}: {decision.reason}; torch {facts.torch_version}"


def networks_of(path: str, folder_kind: str) -> dict[str, tuple[dict, object]]:
    """{label: (weights exactly as the loader hands them to its networks, compute dtype)} for one file."""
    from .models.checkpoint_files import detect_architecture, open_state_dict, open_vae, read_metadata, split_checkpoint
    from .models.loading import TEXT_ENCODERS
    from .models.precision import text_encoder_dtype, unet_dtype, vae_dtype

    if folder_kind == "vae":
        return {"vae": (open_vae(path)[0], vae_dtype())}
    if folder_kind == "diffusion_models":  # UNETLoader
        from .models.component_files import open_unet

        return {"unet": (open_unet(path)[1], unet_dtype())}
    if folder_kind == "text_encoders":  # CLIPLoader / DualCLIPLoader
        from .models.component_files import open_text_encoder

        kind, weights, _ = open_text_encoder(path)
        return {kind: (weights, text_encoder_dtype())}
    state_dict = open_state_dict(path)
    arch = detect_architecture(state_dict, read_metadata(path))
    unet, text_encoders, vae = split_checkpoint(state_dict, arch)
    networks = {"unet": (unet, unet_dtype())}
    if set(text_encoders) == TEXT_ENCODERS[arch.family]:
        networks.update({name: (weights, text_encoder_dtype()) for name, weights in text_encoders.items()})
    if vae:
        networks["vae"] = (vae, vae_dtype())
    return networks


def _wanted_dtypes_present(metadata: dict, networks: dict) -> bool:
    import json

    from .models.prepared import dtype_tag, group_id

    groups = json.loads(metadata.get("groups", "{}"))
    return all(groups.get(group_id(weights), {}).get("dtype") == dtype_tag(dtype)
               for weights, dtype in networks.values())


def prepare(settings, folder: str, only_check: bool = False, pack_size: int | None = None) -> int:
    """Prepares every checkpoint and VAE; returns 1 when a file failed (or, with --check, is not current)."""
    from . import paths
    from .models.checkpoint_files import CheckpointError
    from .models.prepared import check, write_prepared
    from .models.prepared_packs import DEFAULT_PACK_SIZE

    folders = paths.configure(settings)
    status, described = 0, cpu_class()
    log.info("prepare: CPU class %s -> %s", described, folder)
    for kind in ("checkpoints", "vae", "diffusion_models", "text_encoders"):
        for relative in folders.list_models(kind):
            path = folders.model_path(kind, relative)
            if path is None or not path.lower().endswith((".safetensors", ".sft", ".ckpt", ".pt", ".pth")):
                continue
            try:
                networks = networks_of(path, kind)
                if not only_check:  # a check only reads; the timing writes its answer to the cache file
                    _settle_kernel_timings(networks)
                metadata, why = check(path, folder)
                if metadata is not None and _wanted_dtypes_present(metadata, networks):
                    log.info("prepare: %s/%s is current", kind, relative)
                elif only_check:
                    log.warning("prepare: %s/%s is not prepared: %s", kind, relative, why or "prepared in other dtypes")
                    status = 1
                    continue
                else:
                    start = time.perf_counter()
                    target = write_prepared(path, folder, networks, described)
                    log.info("prepare: %s/%s (%s) -> %s in %.1f s (%s)", kind, relative,
                             why or "prepared in other dtypes", target, time.perf_counter() - start,
                             ", ".join(f"{label} {str(dtype).replace('torch.', '')}"
                                       for label, (_, dtype) in networks.items()))
                if "unet" in networks and pack_size == 0:
                    _remove_packs(path, folder, only_check)
                elif "unet" in networks:
                    status |= _prepare_packs(path, kind, relative, folder, networks["unet"],
                                             pack_size or DEFAULT_PACK_SIZE, only_check, described)
            except (CheckpointError, OSError, RuntimeError, ValueError) as exc:
                log.error("prepare: %s/%s failed: %s", kind, relative, exc)
                status = 1
    return status


def _settle_kernel_timings(networks: dict) -> None:
    """Times, once per CPU class, the kernel choice a cold start would otherwise time at its first fp32 VAE
    decode (cpu_kernels.large_tiles_sizes; the UNet's is settled by packing its weights)."""
    import torch

    if networks.get("vae", (None, None))[1] == torch.float32:
        from .networks import cpu_kernels

        cpu_kernels.large_tiles_sizes()


def _prepare_packs(path: str, kind: str, relative: str, folder: str, unet: tuple[dict, object], pack_size: int,
                   only_check: bool, described: str) -> int:
    """Writes the UNet's packed weights (models/prepared_packs.py) unless current; 1 when --check finds them not."""
    from .models.prepared_packs import check as check_packs
    from .models.prepared_packs import write_packs

    weights, dtype = unet
    name = f"{kind}/{relative}"
    metadata, why = check_packs(path, folder, weights, dtype)
    if metadata is not None and metadata.get("pack_size") == str(pack_size):
        log.info("prepare: %s packed weights are current", name)
        return 0
    if only_check:
        log.warning("prepare: %s has no current packed weights: %s", name, why or "made at another --pack-size")
        return 1
    start = time.perf_counter()
    layers = write_packs(path, folder, _prepared_unet(path, kind, weights, dtype), weights, dtype, pack_size, described)
    if layers:
        log.info("prepare: %s packed weights of %d layers (one step at %d px) in %.1f s", name, layers, pack_size,
                 time.perf_counter() - start)
    else:
        log.warning("prepare: %s: no layer packed its weights here (COMFY_CPU_KERNELS=0, or a dtype oneDNN cannot "
                    "pack on this CPU); the server computes without packed weights", name)
    return 0


def _remove_packs(path: str, folder: str, only_check: bool) -> None:
    """--pack-size 0: no packed weights, so none from an earlier build either."""
    from .models.prepared import prepared_path
    from .models.prepared_packs import packs_path

    target = packs_path(prepared_path(path, folder))
    if os.path.exists(target) and not only_check:
        os.remove(target)
        log.info("prepare: removed %s (--pack-size 0)", target)


def _prepared_unet(path: str, kind: str, weights: dict, dtype):
    """The UNet built from the prepared file, as the server builds it (cpu_kernels' classes and all)."""
    from .models.checkpoint_files import CheckpointError, detect_architecture, open_state_dict, read_metadata
    from .models.component_files import open_unet
    from .models.prepared import prepared_weights
    from .networks.build import build_from_state_dict
    from .networks.unet import UNetModel

    prepared = prepared_weights(path, weights, dtype)
    if prepared is None:
        raise CheckpointError(f"{path}: its prepared UNet weights cannot be read back")
    if kind == "diffusion_models":
        config = open_unet(path)[0].unet_config
    else:
        config = detect_architecture(open_state_dict(path), read_metadata(path)).unet_config
    return build_from_state_dict(lambda: UNetModel(config), prepared, dtype)


def prepare_command(argv: list[str]) -> int:
    from . import logs
    from .cli import parse
    from .models.prepared import DIR_ENV, prepared_dir

    known, rest = _arguments(argv)
    settings = parse("prepare", rest)
    logs.configure(settings)
    if known.prepared_dir:
        os.environ[DIR_ENV] = os.path.abspath(known.prepared_dir)  # read by prepared_dir() in this process
    os.environ[DIR_ENV] = prepared_dir(settings)  # the loader's prepared_dir() in this process (packed weights)
    return prepare(settings, prepared_dir(settings), known.check, known.pack_size)


if __name__ == "__main__":
    sys.exit(prepare_command(sys.argv[1:]))
