"""Prepared weights (`comfy-serverless prepare`, models/prepared.py): written once in the compute dtype, memory-
mapped by the loader without conversion, ignored when stale or in another dtype; LoRAs still apply."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

from comfy_serverless.models import prepared
from comfy_serverless.models.checkpoint_files import detect_architecture, open_state_dict, split_checkpoint
from comfy_serverless.models.random_checkpoints import make_test_checkpoint, make_test_lora, make_test_vae
from comfy_serverless.prepare_command import networks_of, prepare
from conftest import REPO, resident_fraction, server_context


@pytest.fixture
def base(tmp_path, monkeypatch):
    yield from tiny_models_base(tmp_path, monkeypatch)


def tiny_models_base(tmp_path, monkeypatch):
    """A base directory with a tiny SD1.5 checkpoint, a VAE and a LoRA; prepared files under base/prepared."""
    models = tmp_path / "models"
    for folder in ("checkpoints", "vae", "loras"):
        (models / folder).mkdir(parents=True)
    make_test_checkpoint("sd15", "tiny", models / "checkpoints" / "tiny.safetensors", seed=1)
    make_test_vae(models / "vae" / "tiny-vae.safetensors", seed=3)
    make_test_lora("sd15", models / "loras" / "tiny-lora.safetensors", seed=2)
    monkeypatch.setenv(prepared.DIR_ENV, str(tmp_path / "prepared"))
    prepared.forget()
    yield tmp_path
    prepared.forget()


def mapped_ranges(path) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of `path` (Linux /proc/self/maps)."""
    ranges = []
    with open("/proc/self/maps") as fh:
        for line in fh:
            if line.rstrip().endswith(os.path.realpath(path)):
                start, end = line.split()[0].split("-")
                ranges.append((int(start, 16), int(end, 16)))
    return ranges


def in_ranges(tensor, ranges) -> bool:
    return any(start <= tensor.data_ptr() < end for start, end in ranges)


def parts(path):
    state_dict = open_state_dict(path)
    return split_checkpoint(state_dict, detect_architecture(state_dict))


def test_only_prepare_itself_times_kernels_a_check_writes_nothing(base, monkeypatch):
    from comfy_serverless import prepare_command

    timed: list = []
    monkeypatch.setattr(prepare_command, "_settle_kernel_timings", lambda networks: timed.append(set(networks)))
    with server_context(base_directory=str(base)) as ctx:
        folder = prepared.prepared_dir(ctx.settings)
        assert prepare(ctx.settings, folder, only_check=True) == 1 and timed == []
        assert prepare(ctx.settings, folder) == 0 and {"unet", "vae"} <= timed[0]


def test_prepare_writes_each_network_in_its_dtype_and_the_loader_maps_it(base):
    ckpt = str(base / "models" / "checkpoints" / "tiny.safetensors")
    with server_context(base_directory=str(base)) as ctx:
        folder = prepared.prepared_dir(ctx.settings)
        assert prepare(ctx.settings, folder, only_check=True) == 1  # nothing prepared yet
        assert prepare(ctx.settings, folder) == 0
        assert prepare(ctx.settings, folder, only_check=True) == 0
        networks = networks_of(ckpt, "checkpoints")
        assert set(networks) == {"unet", "clip_l", "vae"}
        target = prepared.prepared_path(ckpt, folder)
        assert os.path.isfile(target)
        assert os.path.isfile(prepared.prepared_path(str(base / "models" / "vae" / "tiny-vae.safetensors"), folder))
        for label, (weights, dtype) in networks.items():
            found = prepared.prepared_weights(ckpt, weights, dtype)
            assert found is not None and found.keys() == weights.keys(), label
            ranges = mapped_ranges(target)
            for name, tensor in found.items():
                expected = weights[name].to(dtype) if weights[name].is_floating_point() else weights[name]
                assert tensor.dtype == expected.dtype and torch.equal(tensor, expected), name
                assert in_ranges(tensor, ranges), f"{name} is a copy, not a view of the prepared file"
                if tensor.numel() * tensor.element_size() % prepared.DATA_ALIGNMENT == 0:
                    assert tensor.data_ptr() % prepared.DATA_ALIGNMENT == 0, f"{name} is not cache-line aligned"


def test_a_prepared_file_holds_its_vectors_before_its_matrices(base):
    """Biases and norm scales are read at every step, the weights of layers that compute from packed copies never:
    kept apart, reading the former maps no page of the latter even where the page cache holds the file in 2 MB
    folios (sampling kept 0.34-0.47 GB of SD1.5's fp32 UNet weights resident when each bias sat by its layer)."""
    from comfy_serverless.models.checkpoint_files import tensor_spans

    ckpt = str(base / "models" / "checkpoints" / "tiny.safetensors")
    with server_context(base_directory=str(base)) as ctx:
        folder = prepared.prepared_dir(ctx.settings)
        prepare(ctx.settings, folder)
        target = prepared.prepared_path(ckpt, folder)
        spans, tensors = tensor_spans(target), open_state_dict(target)
        aligned = {name: span for name, span in spans.items() if (span[1] - span[0]) % prepared.DATA_ALIGNMENT == 0}
        vectors = [span for name, span in aligned.items() if tensors[name].dim() <= 1]
        matrices = [span for name, span in aligned.items() if tensors[name].dim() > 1]
        assert len(vectors) > 10 and len(matrices) > 10
        assert max(end for _, end in vectors) <= min(start for start, _ in matrices)


def test_loaded_networks_use_the_prepared_tensors_and_compute_the_same(base, monkeypatch):
    from comfy_serverless.models.loading import load_checkpoint
    from comfy_serverless.networks import cpu_kernels

    monkeypatch.delenv(cpu_kernels.ENV, raising=False)
    cpu_kernels._mode.cache_clear()

    ckpt = str(base / "models" / "checkpoints" / "tiny.safetensors")
    with server_context(base_directory=str(base)):
        model, _, _ = load_checkpoint(ckpt)
        plain = model.handle.get()
        x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500.0])
        context = torch.randn(1, 77, plain.config.context_dim if hasattr(plain, "config") else 32)
    with server_context(base_directory=str(base)) as ctx:
        prepare(ctx.settings, prepared.prepared_dir(ctx.settings))
        model, _, _ = load_checkpoint(ckpt)
        fast = model.handle.get()
        ranges = mapped_ranges(prepared.prepared_path(ckpt, prepared.prepared_dir(ctx.settings)))
        assert ranges and all(in_ranges(p, ranges) for p in fast.parameters())
        dtype = next(fast.parameters()).dtype
        monkeypatch.setenv(cpu_kernels.ENV, "0")  # stock layers for both: the same kernels, so equal bit for bit
        cpu_kernels._mode.cache_clear()
        with torch.inference_mode():
            a = plain(x.to(dtype), t, context.to(dtype))
            b = fast(x.to(dtype), t, context.to(dtype))
        assert torch.equal(a, b)
        monkeypatch.setenv(cpu_kernels.ENV, "auto")  # the default packs the mapped weights (and only those)
        cpu_kernels._mode.cache_clear()
        with torch.inference_mode():
            packed = fast(x.to(dtype), t, context.to(dtype))
            unpacked = plain(x.to(dtype), t, context.to(dtype))
        assert torch.equal(unpacked, a)

        def packed_layers(network):
            return sum(1 for m in network.modules() if cpu_kernels.packed_weight(m) is not None)

        assert packed_layers(fast) > 0 and packed_layers(plain) == 0  # heap weights stay on the stock path
        assert float((packed.float() - b.float()).norm() / b.float().norm()) < (1e-5 if dtype == torch.float32
                                                                                 else 2e-2)
    cpu_kernels._mode.cache_clear()


def test_changed_source_falls_back_with_a_warning(base, caplog):
    ckpt = base / "models" / "checkpoints" / "tiny.safetensors"
    with server_context(base_directory=str(base)) as ctx:
        folder = prepared.prepared_dir(ctx.settings)
        prepare(ctx.settings, folder)
        unet = parts(ckpt)[0]
        dtype = networks_of(str(ckpt), "checkpoints")["unet"][1]
        assert prepared.prepared_weights(str(ckpt), unet, dtype) is not None

        # Same size and mtime, one byte different inside the tensors: the sampled hash notices.
        stat = ckpt.stat()
        data = bytearray(ckpt.read_bytes())
        data[-10] ^= 0xFF
        ckpt.write_bytes(bytes(data))
        os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        prepared.forget()
        with caplog.at_level(logging.WARNING, logger="comfy_serverless.models.prepared"):
            assert prepared.prepared_weights(str(ckpt), parts(ckpt)[0], dtype) is None
        assert "source changed" in caplog.text and "source_hash" in caplog.text

        # A newer mtime alone is a change too.
        prepare(ctx.settings, folder)
        assert prepared.prepared_weights(str(ckpt), parts(ckpt)[0], dtype) is not None
        os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        assert prepared.prepared_weights(str(ckpt), parts(ckpt)[0], dtype) is None


def test_other_dtype_or_other_names_fall_back(base, caplog):
    ckpt = str(base / "models" / "checkpoints" / "tiny.safetensors")
    with server_context(base_directory=str(base), bf16_unet=True) as ctx:
        prepare(ctx.settings, prepared.prepared_dir(ctx.settings))
    unet = parts(ckpt)[0]
    with caplog.at_level(logging.WARNING, logger="comfy_serverless.models.prepared"):
        assert prepared.prepared_weights(ckpt, unet, torch.float32) is None  # e.g. a --force-fp32 server
    assert "prepared in bfloat16" in caplog.text
    assert prepared.prepared_weights(ckpt, unet, torch.bfloat16) is not None
    renamed = {f"other.{name}": tensor for name, tensor in unet.items()}
    assert prepared.prepared_weights(ckpt, renamed, torch.bfloat16) is None
    assert prepared.prepared_weights(str(base / "models" / "loras" / "tiny-lora.safetensors"), unet,
                                     torch.bfloat16) is None  # no prepared file at all: quietly None


def _txt2img_with_lora(ckpt: str, lora: str) -> dict:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "10": {"class_type": "LoraLoader", "inputs": {"lora_name": lora, "strength_model": 1.0, "strength_clip": 1.0,
                                                      "model": ["4", 0], "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red house", "clip": ["10", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["10", 1]}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": 3, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1,
            "model": ["10", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "prepared", "images": ["8", 0]}},
    }


def _run(srv, prompt: dict) -> dict:
    return srv.wait_history(srv.queue_prompt(prompt)["prompt_id"], timeout=300)  # the machine may be loaded


def _image(srv, entry) -> bytes:
    assert entry["status"]["status_str"] == "success", entry["status"]
    image = entry["outputs"]["9"]["images"][0]
    return srv.get("/view", params=image).content


def test_server_with_prepared_weights_gives_the_same_image_with_a_lora(base, start_server):
    """The prepare command as a build step, then two servers on the same files: with and without it. Both pack
    every weight (cpu_kernels packs only file-mapped ones by default; packed and unpacked kernels round apart)."""
    kernels = {"COMFY_CPU_KERNELS": "all"}
    env = {prepared.DIR_ENV: str(base / "prepared"), **kernels}
    done = subprocess.run([sys.executable, "-m", "comfy_serverless.prepare_command", "--base-directory", str(base)],
                          cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "prepare: checkpoints/tiny.safetensors" in done.stderr + done.stdout
    prompt = _txt2img_with_lora("tiny.safetensors", "tiny-lora.safetensors")
    with_prepared = start_server(env=env, base=base)
    first = _image(with_prepared, _run(with_prepared, prompt))
    assert "using prepared weights" in with_prepared.log()
    with_prepared.stop()
    without = start_server(env={prepared.DIR_ENV: str(base / "nothing-here"), **kernels}, base=base)
    second = _image(without, _run(without, prompt))
    assert "using prepared weights" not in without.log()
    assert first == second


def test_part_files_of_unet_and_clip_loaders_are_prepared_too(base):
    from safetensors.torch import save_file

    from comfy_serverless.models.component_files import open_text_encoder, open_unet
    from comfy_serverless.models.loading import load_unet
    from comfy_serverless.models.random_checkpoints import TEST_CHECKPOINT_METADATA_KEY

    full = open_state_dict(base / "models" / "checkpoints" / "tiny.safetensors")
    unet_file = base / "models" / "diffusion_models" / "tiny-unet.safetensors"
    clip_file = base / "models" / "text_encoders" / "tiny-clip-l.safetensors"
    for path, prefix, metadata in ((unet_file, "model.diffusion_model.", None),
                                   (clip_file, "cond_stage_model.transformer.",
                                    {TEST_CHECKPOINT_METADATA_KEY: "text-encoder-clip_l"})):
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in full.items() if k.startswith(prefix)}, str(path), metadata=metadata)
    with server_context(base_directory=str(base)) as ctx:
        folder = prepared.prepared_dir(ctx.settings)
        assert prepare(ctx.settings, folder) == 0
        unet_weights = open_unet(unet_file)[1]
        dtype = networks_of(str(unet_file), "diffusion_models")["unet"][1]
        found = prepared.prepared_weights(str(unet_file), unet_weights, dtype)
        assert found is not None and all(torch.equal(found[k], v.to(dtype)) for k, v in unet_weights.items())
        kind, clip_weights, _ = open_text_encoder(clip_file)
        assert kind == "clip_l"
        assert prepared.prepared_weights(str(clip_file), clip_weights,
                                         networks_of(str(clip_file), "text_encoders")["clip_l"][1]) is not None
        network = load_unet(str(unet_file)).handle.get()
        ranges = mapped_ranges(prepared.prepared_path(str(unet_file), folder))
        assert all(in_ranges(p, ranges) for p in network.parameters())


def test_the_text_encoders_file_pages_leave_memory_after_encoding(base):
    """Encoded once per prompt: its prepared weights' pages are dropped after encoding (the page cache keeps
    them) and read back unchanged by the next encoding."""
    from comfy_serverless.models.loading import load_checkpoint
    from comfy_serverless.networks import file_pages

    ckpt = str(base / "models" / "checkpoints" / "tiny.safetensors")
    with server_context(base_directory=str(base)) as ctx:
        prepare(ctx.settings, prepared.prepared_dir(ctx.settings))
        _, clip, _ = load_checkpoint(ckpt)
        embedding = max(clip.handle.get().parameters(), key=torch.Tensor.numel)  # the token table, ~6 MB
        assert file_pages.in_unwritten_file_mapping(embedding)
        float(embedding.sum())
        assert resident_fraction(embedding) == 1.0
        first = clip.encode("a lighthouse in fog")
        assert resident_fraction(embedding) == 0.0
        second = clip.encode("a lighthouse in fog")
        assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
