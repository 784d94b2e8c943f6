"""Prepared packed weights (models/prepared_packs.py, networks/onednn_blobs.py): `prepare` writes the UNet's
weights in the layout its CPU kernels compute with; the loader maps them, so the first step packs nothing, and
gives the same results as packing at the first call; stale files or another CPU class fall back to packing."""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from comfy_serverless.models import prepared, prepared_packs
from comfy_serverless.models.checkpoint_files import read_metadata
from comfy_serverless.models.checkpoint_saving import write_safetensors
from comfy_serverless.networks import cpu_kernels, onednn_blobs
from comfy_serverless.prepare_command import prepare
from conftest import REPO, resident_fraction, server_context
from test_cpu_kernels import AVX2_CAP
from test_prepared import _image, _run, _txt2img_with_lora, in_ranges, mapped_ranges, tiny_models_base

PACK_SIZE = 64  # px: latents 8x8, every level of the tiny UNet packed


@pytest.fixture
def base(tmp_path, monkeypatch):
    yield from tiny_models_base(tmp_path, monkeypatch)


@pytest.fixture(autouse=True)
def default_kernels(monkeypatch):
    monkeypatch.delenv(cpu_kernels.ENV, raising=False)
    cpu_kernels._mode.cache_clear()
    yield
    cpu_kernels._mode.cache_clear()


def packs_file(base) -> str:
    ckpt = str(base / "models" / "checkpoints" / "tiny.safetensors")
    return prepared_packs.packs_path(prepared.prepared_path(ckpt, str(base / "prepared")))


def load_unet(base, **flags):
    from comfy_serverless.models.loading import load_checkpoint

    prepared.forget()
    with server_context(base_directory=str(base), **flags):
        return load_checkpoint(str(base / "models" / "checkpoints" / "tiny.safetensors"))[0].handle.get()


def unet_inputs(unet, side: int):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, side, side, generator=generator)
    return x, torch.tensor([500.0, 300.0]), torch.randn(2, 77, unet.config.context_dim, generator=generator)


def counting_packs(monkeypatch) -> list[str]:
    """Records every pack made at a call (oneDNN reorders of convolutions and linears)."""
    made: list[str] = []
    for name in ("_pack_convolution", "_pack_linear"):
        original = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name, lambda *args, _o=original, _n=name: made.append(_n) or _o(*args))
    return made


def packed_layers(unet) -> dict[str, object]:
    return {name: cpu_kernels.packed_weight(layer) for name, layer in unet.named_modules()
            if cpu_kernels.packed_weight(layer) is not None}


def prepared_part(layer) -> torch.Tensor:
    """The file bytes a layer's prepared weight lies in: its fp16 copy, Winograd weight or oneDNN bytes."""
    state = cpu_kernels._packs[layer]
    if state.held is not None:
        return state.held.half
    return state.packed.transformed if hasattr(state.packed, "transformed") else state.backing


def computes_as_when_packed_at_the_first_call(base, unet) -> bool:
    """Whether fp32 `unet` gives, bit for bit, what one loaded without the packed file gives (it packs its fp32
    weights at its first call); the packed file is moved away."""
    with torch.inference_mode():
        first = unet(*unet_inputs(unet, PACK_SIZE // 8))
    os.rename(packs_file(base), packs_file(base) + ".away")
    lazily = load_unet(base, force_fp32=True)
    with torch.inference_mode():
        return torch.equal(first, lazily(*unet_inputs(lazily, PACK_SIZE // 8)))


def stored_dtypes(path) -> dict[str, str]:
    """The safetensors dtype of every weight in a packed file ("onednn/...", "winograd/..." or "taps/...")."""
    with open(path, "rb") as fh:
        header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
    return {key: info["dtype"] for key, info in header.items() if key.startswith(("onednn/", "winograd/", "taps/"))}


def test_packed_bytes_round_trip_through_a_file_without_a_copy(tmp_path):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 24, 8, 8, generator=generator).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(40, 24, 3, 3, generator=generator), torch.randn(40, generator=generator)
    linear = torch.randn(48, 24, generator=generator)
    conv_packed = torch.ops.mkldnn._reorder_convolution_weight(weight, [1, 1], [1, 1], [1, 1], 1, list(x.shape))
    linear_packed = torch.ops.mkldnn._reorder_linear_weight(linear, 16)
    tensors = {}
    for name, packed in (("conv", conv_packed), ("linear", linear_packed)):
        tensors[f"{name}.data"], tensors[f"{name}.descriptor"] = onednn_blobs.to_bytes(packed)
    write_safetensors(str(tmp_path / "packs.safetensors"), tensors, align=64)
    mapped = load_file(str(tmp_path / "packs.safetensors"))

    conv = onednn_blobs.from_bytes(mapped["conv.data"], mapped["conv.descriptor"], weight.shape, torch.float32)
    assert torch.ops.mkldnn.data_ptr(conv) == mapped["conv.data"].data_ptr()  # the file's memory, not a copy
    arguments = ([1, 1], [1, 1], [1, 1], 1, "none", [], "")
    assert torch.equal(torch.ops.mkldnn._convolution_pointwise(x, conv, bias, *arguments),
                       torch.ops.mkldnn._convolution_pointwise(x, conv_packed, bias, *arguments))
    rows = torch.randn(16, 24, generator=generator)
    lin = onednn_blobs.from_bytes(mapped["linear.data"], mapped["linear.descriptor"], linear.shape, torch.float32)
    assert torch.equal(torch.ops.mkldnn._linear_pointwise(rows, lin, None, "none", [], ""),
                       torch.ops.mkldnn._linear_pointwise(rows, linear_packed, None, "none", [], ""))

    with pytest.raises(ValueError, match="does not match"):  # the descriptor describes more bytes than there are
        onednn_blobs.from_bytes(mapped["conv.data"][:-64], mapped["conv.descriptor"], weight.shape, torch.float32)
    with pytest.raises(ValueError):
        onednn_blobs.from_bytes(mapped["conv.data"], torch.zeros(8, dtype=torch.uint8), weight.shape, torch.float32)


def test_prepare_writes_packed_weights_and_the_first_call_packs_nothing(base, monkeypatch):
    with server_context(base_directory=str(base)) as ctx:
        assert prepare(ctx.settings, prepared.prepared_dir(ctx.settings), pack_size=PACK_SIZE) == 0
        assert prepare(ctx.settings, prepared.prepared_dir(ctx.settings), only_check=True, pack_size=PACK_SIZE) == 0
        # a build for another size is not current
        assert prepare(ctx.settings, prepared.prepared_dir(ctx.settings), only_check=True, pack_size=128) == 1
    path = packs_file(base)
    metadata = read_metadata(path)
    assert metadata["pack_size"] == str(PACK_SIZE) and metadata["torch"] == torch.__version__

    unet = load_unet(base)
    assert packed_layers(unet), "no layer took a prepared packed weight"
    ranges = mapped_ranges(path)
    for name, layer in unet.named_modules():
        if cpu_kernels.packed_weight(layer) is not None:
            pointer = prepared_part(layer).data_ptr()
            assert any(start <= pointer < end for start, end in ranges), f"{name}: not in the packed file's mapping"
    made = counting_packs(monkeypatch)
    with torch.inference_mode():
        first = unet(*unet_inputs(unet, PACK_SIZE // 8))
    assert made == [], "the first call at the prepared size packed again"

    os.rename(path, path + ".away")  # the same network packing at its first call, as without the build step
    lazily = load_unet(base)
    assert packed_layers(lazily) == {}
    with torch.inference_mode():
        reference = lazily(*unet_inputs(lazily, PACK_SIZE // 8))
    assert made, "the network without the file packed nothing"
    assert torch.equal(first, reference)  # the same bytes in the same layout: the same result, bit for bit


def test_fp32_packs_of_an_fp16_checkpoint_are_held_as_fp16_and_compute_the_same(base, monkeypatch):
    """fp32 compute (an AVX2-only CPU, --force-fp32) from an fp16 checkpoint: every packed value is an fp16 value,
    so the file holds them as fp16 (half the memory) and each call expands its layer's into one fp32 buffer shared
    by the network; the results equal those of fp32 weights packed at the first call, bit for bit."""
    monkeypatch.setattr(prepared_packs, "FP32_KEPT_SHARE", 0)  # none kept in fp32 (the next test)
    with server_context(base_directory=str(base), force_fp32=True) as ctx:
        assert prepare(ctx.settings, prepared.prepared_dir(ctx.settings), pack_size=PACK_SIZE) == 0
    path = packs_file(base)
    dtypes = stored_dtypes(path)
    assert dtypes and set(dtypes.values()) == {"F16"}

    unet = load_unet(base, force_fp32=True)
    held = [cpu_kernels._packs[layer].held for layer in unet.modules() if cpu_kernels.packed_weight(layer) is not None]
    assert len(held) == len(dtypes) and None not in held
    ranges = mapped_ranges(path)
    assert all(in_ranges(weight.half, ranges) for weight in held)  # the file's pages, not a copy
    assert len({weight.into.untyped_storage().data_ptr() for weight in held}) == 1  # one shared fp32 buffer
    assert held[0].into.untyped_storage().nbytes() == 4 * max(weight.half.numel() for weight in held)

    made = counting_packs(monkeypatch)
    inputs = unet_inputs(unet, PACK_SIZE // 8)
    with torch.inference_mode():
        first, again = unet(*inputs), unet(*inputs)
    assert made == [] and torch.equal(first, again)
    os.rename(path, path + ".away")
    lazily = load_unet(base, force_fp32=True)
    assert packed_layers(lazily) == {}
    with torch.inference_mode():
        reference = lazily(*unet_inputs(lazily, PACK_SIZE // 8))
    assert torch.equal(first, reference)


def test_the_largest_fp32_packs_stay_fp32_within_their_share_and_compute_the_same(base):
    """Expanding fp16 costs time at every call: the largest oneDNN-packed weights, up to FP32_KEPT_SHARE of the
    UNet's fp32 bytes, are written in fp32 and computed with from the file as they are; the rest are held as fp16.
    Results equal those of weights packed at the first call, bit for bit."""
    with server_context(base_directory=str(base), force_fp32=True) as ctx:
        assert prepare(ctx.settings, prepared.prepared_dir(ctx.settings), pack_size=PACK_SIZE) == 0
    with open(packs_file(base), "rb") as fh:
        header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
    sizes = {key: (info["data_offsets"][1] - info["data_offsets"][0]) * (2 if info["dtype"] == "F16" else 1)
             for key, info in header.items() if key.startswith("onednn/")}  # fp32 bytes
    kept = {key for key in sizes if header[key]["dtype"] == "U8"}
    held = set(sizes) - kept
    assert kept and held and min(sizes[key] for key in kept) >= max(sizes[key] for key in held)
    unet = load_unet(base, force_fp32=True)
    budget = prepared_packs.FP32_KEPT_SHARE * 4 * sum(parameter.numel() for parameter in unet.parameters())
    extra = sum(sizes[key] / 2 for key in kept)  # fp32 over fp16 bytes
    assert extra <= budget < extra + max(sizes[key] for key in held) / 2  # largest first, to the first that misses
    states = {name: cpu_kernels._packs[layer] for name, layer in unet.named_modules()
              if cpu_kernels.packed_weight(layer) is not None}
    assert all((states[key.removeprefix("onednn/").removesuffix(".weight")].held is None) == (key in kept)
               for key in sizes)
    assert computes_as_when_packed_at_the_first_call(base, unet)


def test_packs_fp16_cannot_hold_exactly_stay_fp32(tmp_path, monkeypatch):
    """An fp32 checkpoint's weights are not fp16 values: its packs keep their fp32 bytes."""
    from comfy_serverless.models.random_checkpoints import make_test_checkpoint

    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    make_test_checkpoint("sd15", "tiny", tmp_path / "models" / "checkpoints" / "tiny.safetensors", seed=5,
                         dtype=torch.float32)
    monkeypatch.setenv(prepared.DIR_ENV, str(tmp_path / "prepared"))
    with server_context(base_directory=str(tmp_path), force_fp32=True) as ctx:
        assert prepare(ctx.settings, prepared.prepared_dir(ctx.settings), pack_size=PACK_SIZE) == 0
    dtypes = stored_dtypes(packs_file(tmp_path))
    assert dtypes and set(dtypes.values()) == {"U8"}
    unet = load_unet(tmp_path, force_fp32=True)
    layers = [layer for layer in unet.modules() if cpu_kernels.packed_weight(layer) is not None]
    assert layers and all(cpu_kernels._packs[layer].held is None for layer in layers)
    assert computes_as_when_packed_at_the_first_call(tmp_path, unet)
    prepared.forget()


def test_exact_in_half_accepts_only_fp16_values():
    values = torch.randn(4096, generator=torch.Generator().manual_seed(3)).to(torch.float16).to(torch.float32)
    assert cpu_kernels.exact_in_half(values) and cpu_kernels.exact_in_half(values.view(64, 64).t())
    for change in (lambda v: v.add_(1e-6 * v.sign()), lambda v: v.__setitem__(7, 70000.0),
                   lambda v: v.__setitem__(9, float("nan"))):
        changed = values.clone()
        change(changed)
        assert not cpu_kernels.exact_in_half(changed)


def test_another_input_size_repacks_only_layers_whose_layout_depends_on_it(base, monkeypatch):
    with server_context(base_directory=str(base)) as ctx:
        prepare(ctx.settings, prepared.prepared_dir(ctx.settings), pack_size=PACK_SIZE)
    fits = {key.partition("/")[2] for key in load_file(packs_file(base)) if key.startswith("fits/")}
    unet = load_unet(base)
    made = counting_packs(monkeypatch)
    with torch.inference_mode():
        bigger = unet(*unet_inputs(unet, 4 * PACK_SIZE // 8))  # 4x the resolution: outside every tested shape
    assert len(made) <= len(fits)  # only layers whose layout oneDNN picks by shape were packed again
    os.rename(packs_file(base), packs_file(base) + ".away")
    lazily = load_unet(base)
    with torch.inference_mode():
        reference = lazily(*unet_inputs(lazily, 4 * PACK_SIZE // 8))
    assert float((bigger - reference).abs().max()) <= 1e-5 * float(reference.abs().max())


def rewrite_packs(path: str, change) -> None:
    tensors = {key: value.clone() for key, value in load_file(path).items()}
    metadata = read_metadata(path)
    change(tensors, metadata)
    write_safetensors(path, tensors, metadata, align=64)


def test_packed_weights_from_another_cpu_torch_or_prepared_file_are_not_used(base, caplog):
    with server_context(base_directory=str(base)) as ctx:
        prepare(ctx.settings, prepared.prepared_dir(ctx.settings), pack_size=PACK_SIZE)
    path = packs_file(base)
    pristine = {key: value.clone() for key, value in load_file(path).items()}

    def other_cpu(tensors, metadata):  # the probe packs differently here, as on a CPU with other block sizes
        tensors["onednn/" + metadata["probe"]][:64] += 1

    def other_torch(tensors, metadata):
        metadata["torch"] = "1.0.0"

    for change, message in ((other_cpu, "made on another CPU class"),
                            (other_torch, "another prepared file, network or torch")):
        rewrite_packs(path, change)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            unet = load_unet(base)
        assert packed_layers(unet) == {}
        assert message in caplog.text
        write_safetensors(path, pristine, read_metadata(path), align=64)

    prepared_file = prepared.prepared_path(str(base / "models" / "checkpoints" / "tiny.safetensors"),
                                           str(base / "prepared"))
    os.utime(prepared_file, ns=(os.stat(prepared_file).st_atime_ns, os.stat(prepared_file).st_mtime_ns + 10**9))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert packed_layers(load_unet(base)) == {}  # rewritten prepared weights: these packs may not match them
    assert "another prepared file" in caplog.text


@pytest.mark.parametrize("flags", [(), ("--force-fp32",)], ids=["default", "fp32"])
def test_server_with_packed_weights_gives_the_same_images_with_and_without_a_lora(base, start_server, flags):
    """`prepare` as a build step, then servers on the same files with and without the packed file (--pack-size 0):
    the same images; a LoRA replaces the weights, so the packed ones are dropped with them. In fp32 the packed
    file holds the fp16 checkpoint's weights as fp16, but for the largest (prepared_packs.FP32_KEPT_SHARE)."""
    env = {prepared.DIR_ENV: str(base / "prepared")}
    images: dict[str, list[bytes]] = {}
    for pack_size in ("64", "0"):  # 0 also removes the file the first build wrote
        done = subprocess.run([sys.executable, "-m", "comfy_serverless.prepare_command", "--base-directory",
                               str(base), "--pack-size", pack_size, *flags], cwd=REPO, env={**os.environ, **env},
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert os.path.exists(packs_file(base)) == (pack_size != "0")
        if flags and pack_size != "0":
            assert set(stored_dtypes(packs_file(base)).values()) == {"F16", "U8"}  # the largest in fp32
        server = start_server(*flags, env=env, base=base)
        with_lora = _txt2img_with_lora("tiny.safetensors", "tiny-lora.safetensors")
        without_lora = json.loads(json.dumps(with_lora))
        without_lora["3"]["inputs"]["model"] = ["4", 0]
        images[pack_size] = [_image(server, _run(server, prompt)) for prompt in (without_lora, with_lora)]
        assert ("layers use packed weights" in server.log()) == (pack_size != "0")
        server.stop()
    assert images["64"] == images["0"]


def test_under_the_avx2_cap_winograd_weights_are_prepared_and_native_packs_are_checked(base):
    """Under the AVX2 cap (as on an AVX2-only CPU) the packed file holds the Winograd-transformed weights too; a
    file packed in this process is used there only if it is the same CPU class (it is not when this process is
    not capped: AVX-512 packs 16-wide blocks, and the cap is part of the class)."""
    code = ("import os, sys, torch\n"
            "from comfy_serverless.models import prepared, prepared_packs\n"
            "from comfy_serverless.prepare_command import prepare\n"
            "from comfy_serverless.networks import cpu_kernels\n"
            "sys.path.insert(0, 'tests')\n"
            "from conftest import server_context\n"
            "from test_prepared_packs import load_unet, packed_layers, unet_inputs\n"
            "import pathlib\n"
            "base = pathlib.Path(sys.argv[1])\n"
            "if sys.argv[2] == 'prepare':\n"
            "    with server_context(base_directory=str(base), force_fp32=True) as ctx:\n"
            "        prepare(ctx.settings, prepared.prepared_dir(ctx.settings), pack_size=256)\n"
            "unet = load_unet(base, force_fp32=True)\n"
            "kinds = sorted({type(p).__name__ for p in packed_layers(unet).values()})\n"
            "same = prepared_packs.cpu_layout_class() == os.environ['PARENT_CLASS']\n"
            "print(torch.backends.cpu.get_cpu_capability(), same, len(packed_layers(unet)), *kinds)\n")
    with server_context(base_directory=str(base), force_fp32=True) as ctx:  # fp32 here and under the cap
        prepare(ctx.settings, prepared.prepared_dir(ctx.settings), pack_size=256)
    native_adopted = len(packed_layers(load_unet(base, force_fp32=True)))
    env = {**os.environ, prepared.DIR_ENV: str(base / "prepared"), **AVX2_CAP,
           "PARENT_CLASS": prepared_packs.cpu_layout_class()}

    def capped(step: str) -> list[str]:
        done = subprocess.run([sys.executable, "-c", code, str(base), step], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.split()

    assert native_adopted > 0
    words = capped("load")  # this process's file under the cap: used only by the same class
    assert words[0] == "AVX2" and int(words[2]) == (native_adopted if words[1] == "True" else 0)
    words = capped("prepare")  # prepared under the cap: oneDNN packs and Winograd weights, all adopted
    assert words[0] == "AVX2" and int(words[2]) > 0 and words[3:] == ["Tensor", "WinogradWeight"]


def test_under_the_avx2_cap_fp16_held_winograd_taps_and_packs_compute_as_weights_packed_at_the_first_call(base):
    """Under the AVX2 cap an fp16 checkpoint's packed file holds the Winograd layers' taps and the oneDNN bytes as
    fp16 (the largest of those in fp32); every call expands them: at 32x32 the taps into F(4x4)'s weight, so the
    results match those of a network packing and transforming its fp32 weights (F(2x2)) at its first call to fp32
    rounding, and two calls each other bit for bit."""
    code = ("import os, pathlib, sys, torch\n"
            "sys.path.insert(0, 'tests')\n"
            "from comfy_serverless.models import prepared\n"
            "from comfy_serverless.prepare_command import prepare\n"
            "from conftest import server_context\n"
            "from test_prepared_packs import load_unet, packs_file, stored_dtypes, unet_inputs\n"
            "base = pathlib.Path(sys.argv[1])\n"
            "with server_context(base_directory=str(base), force_fp32=True) as ctx:\n"
            "    prepare(ctx.settings, prepared.prepared_dir(ctx.settings), pack_size=256)\n"
            "dtypes = stored_dtypes(packs_file(base))\n"
            "kinds = sorted({key.partition('/')[0] + ':' + dtype for key, dtype in dtypes.items()})\n"
            "from comfy_serverless.networks import winograd\n"
            "large, real = [], winograd._large_tiles\n"
            "winograd._large_tiles = lambda *args: large.append(1) or real(*args)\n"
            "unet = load_unet(base, force_fp32=True)\n"
            "with torch.inference_mode():\n"
            "    held, again = unet(*unet_inputs(unet, 32)), unet(*unet_inputs(unet, 32))\n"
            "os.rename(packs_file(base), packs_file(base) + '.away')\n"
            "used, large[:] = len(large), []\n"
            "lazily = load_unet(base, force_fp32=True)\n"
            "with torch.inference_mode():\n"
            "    reference = lazily(*unet_inputs(lazily, 32))\n"
            "error = float((held - reference).norm() / reference.norm())\n"
            "print(*kinds, used > 0, large == [], error < 1e-5, torch.equal(held, again))\n")
    done = subprocess.run([sys.executable, "-c", code, str(base)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, prepared.DIR_ENV: str(base / "prepared"), **AVX2_CAP}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["onednn:F16", "onednn:U8", "taps:F16", "True", "True", "True", "True"]


def test_the_read_ahead_leaves_out_the_plain_unet_weights_the_packed_file_replaces(base, monkeypatch):
    from comfy_serverless.models.checkpoint_files import tensor_spans

    ckpt = str(base / "models" / "checkpoints" / "tiny.safetensors")
    with server_context(base_directory=str(base)) as ctx:
        prepare(ctx.settings, prepared.prepared_dir(ctx.settings), pack_size=PACK_SIZE)
    target = prepared.prepared_path(ckpt, str(base / "prepared"))
    groups = json.loads(read_metadata(target)["groups"])
    unet_groups = {group for group, info in groups.items() if info["network"] == "unet"}
    ranges = prepared._wanted_ranges(target, groups)
    assert ranges
    for name, (start, end) in tensor_spans(target).items():
        covered = any(low <= start and end <= high for low, high in ranges)
        assert covered == (name.split(".", 1)[0] not in unet_groups), name  # text encoder and VAE only

    asked: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: asked.append((offset, length)))
    prepared.read_ahead(target, ranges)
    assert asked == [(start, end - start) for start, end in ranges]
    os.remove(packs_file(base))
    assert prepared._wanted_ranges(target, groups) is None  # no packed file: the whole prepared file
    asked.clear()
    prepared.read_ahead(target, None)
    assert asked == [(0, 0)]


@pytest.mark.parametrize("arch", ["sdxl", "sdxl_refiner", "sd2_unclip"])
def test_other_families_unets_are_packed_at_build_time_too(tmp_path, monkeypatch, arch):
    """The build step's one step feeds each family's extra conditioning (SDXL's vector, unCLIP's noise level)."""
    from comfy_serverless.models.random_checkpoints import make_test_checkpoint

    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    make_test_checkpoint(arch, "tiny", tmp_path / "models" / "checkpoints" / "tiny.safetensors", seed=4)
    monkeypatch.setenv(prepared.DIR_ENV, str(tmp_path / "prepared"))
    with server_context(base_directory=str(tmp_path)) as ctx:
        assert prepare(ctx.settings, prepared.prepared_dir(ctx.settings), pack_size=PACK_SIZE) == 0
    assert packed_layers(load_unet(tmp_path))
    prepared.forget()


def test_where_nothing_packs_prepare_writes_no_packed_file_and_succeeds(base, monkeypatch, caplog):
    monkeypatch.setenv(cpu_kernels.ENV, "0")  # stock layers: nothing is packed
    cpu_kernels._mode.cache_clear()
    with server_context(base_directory=str(base)) as ctx, caplog.at_level(logging.WARNING):
        assert prepare(ctx.settings, prepared.prepared_dir(ctx.settings), pack_size=PACK_SIZE) == 0
    assert not os.path.exists(packs_file(base))
    assert "no layer packed its weights" in caplog.text


def test_the_build_step_does_not_keep_the_plain_weights_it_packed_resident(base):
    """Packing at the warm-up drops the prepared file's pages of each packed weight, and so does packing it again at
    other shapes to find the layouts that depend on them (without that, `prepare` held SD1.5's fp32 UNet twice)."""
    from comfy_serverless.prepare_command import _prepared_unet, networks_of

    ckpt = str(base / "models" / "checkpoints" / "tiny.safetensors")
    with server_context(base_directory=str(base)) as ctx:
        prepare(ctx.settings, prepared.prepared_dir(ctx.settings), pack_size=0)  # prepared weights only
        weights, dtype = networks_of(ckpt, "checkpoints")["unet"]
        unet = _prepared_unet(ckpt, "checkpoints", weights, dtype)
        prepared_packs.warm_up(unet, PACK_SIZE)
        packed = cpu_kernels.packed_weights_of(unet)
        assert cpu_kernels.layout_probe(unet, packed) is not None
    layers = dict(unet.named_modules())
    large = [name for name in packed if layers[name.removesuffix(".weight")].weight.numel() * 2 >= 4 * 4096]
    assert large
    for name in large:
        assert resident_fraction(layers[name.removesuffix(".weight")].weight) == 0, name


def test_fp32_packs_follow_the_winograd_choice_they_were_made_with(base, monkeypatch, caplog):
    """Whether the fp32 3x3 layers keep Winograd weights can follow a timing (networks/winograd_choice.py): packs
    made under the other answer are not current, so prepare makes them again and the server packs lazily."""
    monkeypatch.setattr(cpu_kernels, "transformed_winograd", lambda: False)
    with server_context(base_directory=str(base), force_fp32=True) as ctx:
        folder = prepared.prepared_dir(ctx.settings)
        assert prepare(ctx.settings, folder, pack_size=PACK_SIZE) == 0
        assert read_metadata(packs_file(base))["winograd_weights"] == "no"
        monkeypatch.setattr(cpu_kernels, "transformed_winograd", lambda: True)
        with caplog.at_level(logging.WARNING):
            assert prepare(ctx.settings, folder, only_check=True, pack_size=PACK_SIZE) == 1
        assert "winograd_weights" in caplog.text
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert packed_layers(load_unet(base, force_fp32=True)) == {}
        assert "winograd_weights" in caplog.text
        assert prepare(ctx.settings, folder, pack_size=PACK_SIZE) == 0
    assert read_metadata(packs_file(base))["winograd_weights"] == "yes"
    assert packed_layers(load_unet(base, force_fp32=True))


@pytest.mark.parametrize("flags", [{}, {"force_fp32": True}])  # packs in the compute dtype; fp32 held as fp16
def test_a_vae_pass_drops_the_resident_pages_of_the_unets_packs_and_of_the_vae(base, flags):
    """The UNet is idle while the VAE runs, the prompt's memory peak: the pages of its packed weights leave the
    process before a decode or encode, and the VAE's own after it; both are read back unchanged at their next use."""
    from comfy_serverless.models.loading import load_checkpoint

    ckpt = str(base / "models" / "checkpoints" / "tiny.safetensors")
    with server_context(base_directory=str(base), **flags) as ctx:
        assert prepare(ctx.settings, prepared.prepared_dir(ctx.settings), pack_size=PACK_SIZE) == 0
        prepared.forget()
        model, _, vae = load_checkpoint(ckpt)
        unet = model.handle.get()
        parts = [prepared_part(layer) for layer in unet.modules() if cpu_kernels.packed_weight(layer) is not None]
        parts = [part for part in parts if part.numel() * part.element_size() >= 3 * 4096]  # whole pages inside
        largest = max(vae.handle.get().parameters(), key=torch.Tensor.numel)
        inputs, latent = unet_inputs(unet, PACK_SIZE // 8), torch.randn(1, 4, 8, 8)
        with torch.inference_mode():
            first = unet(*inputs)
            assert parts and all(resident_fraction(part) == 1.0 for part in parts)
            image = vae.decode(latent)
            assert all(resident_fraction(part) == 0.0 for part in parts) and resident_fraction(largest) == 0.0
            assert torch.equal(unet(*inputs), first) and all(resident_fraction(part) == 1.0 for part in parts)
            vae.encode(image)
            assert all(resident_fraction(part) == 0.0 for part in parts) and resident_fraction(largest) == 0.0
            assert torch.equal(vae.decode(latent), image)
