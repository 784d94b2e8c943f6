"""The SD generation path over the real HTTP/WebSocket API, with tiny random-weight single-file checkpoints.

One server (with latent2rgb previews on) serves every test here; prompts are small (64 px, 2 steps).
"""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from conftest import Server

from .conftest import ARCHES, install_models, txt2img

CKPT = "tiny-sd15.safetensors"


@pytest.fixture(scope="module")
def sd_server(tmp_path_factory, model_files):
    base = install_models(tmp_path_factory.mktemp("sd-server"), model_files)
    srv = Server(base, ("--preview-method", "latent2rgb"), packs=())
    yield srv
    srv.stop()


def saved_images(srv: Server, entry: dict, node: str = "9") -> list[bytes]:
    assert entry["status"]["status_str"] == "success", entry["status"]
    files = []
    for image in entry["outputs"][node]["images"]:
        response = srv.get("/view", params=image)
        assert response.status_code == 200 and response.headers["Content-Type"] == "image/png"
        files.append(response.content)
    return files


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def free(srv: Server, marker: str = "caches and models freed", **flags) -> None:
    """POST /free and wait until the idle worker has applied it (it logs `marker` when done)."""
    before = srv.log().count(marker)
    assert srv.post("/free", flags).status_code == 200
    deadline = time.monotonic() + 5
    while srv.log().count(marker) == before:
        assert time.monotonic() < deadline, srv.log()[-2000:]
        time.sleep(0.02)


def loads(srv: Server, what: str) -> int:
    return srv.log().count(f"loaded {what}") - srv.log().count(f"unloaded {what}")


def error_of(entry: dict) -> dict:
    assert entry["status"]["status_str"] == "error"
    return next(data for name, data in entry["status"]["messages"] if name == "execution_error")


@pytest.mark.parametrize("arch", ARCHES)
def test_default_workflow_saves_a_png(sd_server, arch):
    entry = sd_server.run(txt2img(f"tiny-{arch}.safetensors", prefix=f"txt2img-{arch}"))
    [png] = saved_images(sd_server, entry)
    image = Image.open(io.BytesIO(png))
    # The tiny test VAE has two levels (downscale 2): a 64 px workflow makes 8x8 latents and 16x16 images.
    assert image.format == "PNG" and image.size == (16, 16) and image.mode == "RGB"
    assert pixels(png).std() > 0


def test_same_seed_same_bytes_other_seed_other_image(sd_server):
    prompt = txt2img(CKPT, seed=5, prefix="determinism")
    first = saved_images(sd_server, sd_server.run(prompt))[0]
    free(sd_server, free_memory=True)  # drop cached results (and models): sample again
    second = saved_images(sd_server, sd_server.run(prompt))[0]
    other = saved_images(sd_server, sd_server.run(txt2img(CKPT, seed=6, prefix="determinism")))[0]
    assert first[:8] == b"\x89PNG\r\n\x1a\n"
    # Same prefix, so the PNGs differ only if the pixels or the embedded prompt do: they must not.
    assert pixels(first).tobytes() == pixels(second).tobytes()
    assert not np.array_equal(pixels(first), pixels(other))


def test_batch_of_two_writes_two_files(sd_server):
    entry = sd_server.run(txt2img(CKPT, batch=2, prefix="batch"))
    first, second = saved_images(sd_server, entry)
    names = [image["filename"] for image in entry["outputs"]["9"]["images"]]
    assert names == ["batch_00001_.png", "batch_00002_.png"]
    assert not np.array_equal(pixels(first), pixels(second))  # each item gets its own noise


def test_progress_and_previews_per_step(sd_server):
    ws = sd_server.ws()
    queued = sd_server.queue_prompt(txt2img(CKPT, seed=11, steps=3, prefix="progress"), client_id=ws.client_id)
    messages = ws.until_done(queued["prompt_id"])
    steps = [m["data"] for m in messages if not isinstance(m, bytes) and m["type"] == "progress"]
    assert [(s["value"], s["max"], s["node"]) for s in steps] == [(1, 3, "3"), (2, 3, "3"), (3, 3, "3")]
    assert all(s["prompt_id"] == queued["prompt_id"] for s in steps)
    previews = [m for m in messages if isinstance(m, bytes)]
    assert len(previews) == 3
    assert all(p[:4] == b"\x00\x00\x00\x01" and p[4:8] == b"\x00\x00\x00\x01" for p in previews)  # JPEG
    assert Image.open(io.BytesIO(previews[0][8:])).format == "JPEG"
    ws.close()


def _load_image_graph(image_name: str, ckpt: str = CKPT) -> dict:
    prompt = txt2img(ckpt, prefix="img2img")
    prompt["10"] = {"class_type": "LoadImage", "inputs": {"image": image_name}}
    return prompt


def _write_input_image(srv: Server, name: str, alpha: bool = False) -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 255, (64, 64, 4 if alpha else 3), dtype=np.uint8)
    if alpha:
        data[..., 3] = 255
        data[16:48, 16:48, 3] = 0  # transparent square: LoadImage's mask is 1 there
    folder = srv.base / "input"
    folder.mkdir(exist_ok=True)
    Image.fromarray(data).save(folder / name)


def test_img2img_keeps_the_picture_size_and_changes_it(sd_server):
    _write_input_image(sd_server, "photo.png")
    prompt = _load_image_graph("photo.png")
    prompt["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    prompt["3"]["inputs"].update(latent_image=["11", 0], denoise=0.6)
    [png] = saved_images(sd_server, sd_server.run(prompt))
    assert Image.open(io.BytesIO(png)).size == (64, 64)


def saved_latent(srv: Server, entry: dict, node: str):
    from safetensors.torch import load_file

    [info] = entry["outputs"][node]["latents"]
    return load_file(srv.base / "output" / info["subfolder"] / info["filename"])["latent_tensor"]


@pytest.mark.parametrize("how", ["VAEEncodeForInpaint", "SetLatentNoiseMask"])
def test_inpainting_changes_only_the_masked_area(sd_server, how):
    _write_input_image(sd_server, "masked.png", alpha=True)
    prompt = _load_image_graph("masked.png")
    if how == "VAEEncodeForInpaint":
        prompt["11"] = {"class_type": "VAEEncodeForInpaint",
                        "inputs": {"pixels": ["10", 0], "vae": ["4", 2], "mask": ["10", 1], "grow_mask_by": 0}}
    else:
        prompt["12"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
        prompt["11"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["12", 0], "mask": ["10", 1]}}
    prompt["3"]["inputs"]["latent_image"] = ["11", 0]
    prompt["13"] = {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": f"in/{how}"}}
    prompt["14"] = {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0], "filename_prefix": f"out/{how}"}}
    entry = sd_server.run(prompt)
    assert len(saved_images(sd_server, entry)) == 1
    before, after = saved_latent(sd_server, entry, "13"), saved_latent(sd_server, entry, "14")
    # 64 px image, tiny VAE (downscale 2): 32x32 latent, the transparent square covers cells 8..23.
    change = (after - before).abs()
    assert change[..., 10:22, 10:22].mean() > 0.1
    assert change[..., :6, :].max() < 1e-3 and change[..., :, 26:].max() < 1e-3


def _with_lora(prompt: dict, strength_model: float, strength_clip: float, name="tiny-sd15-lora.safetensors"):
    prompt["20"] = {"class_type": "LoraLoader", "inputs": {
        "model": ["4", 0], "clip": ["4", 1], "lora_name": name,
        "strength_model": strength_model, "strength_clip": strength_clip}}
    prompt["3"]["inputs"]["model"] = ["20", 0]
    prompt["6"]["inputs"]["clip"] = ["20", 1]
    prompt["7"]["inputs"]["clip"] = ["20", 1]
    return prompt


def test_lora_changes_the_image_and_strength_zero_does_not(sd_server):
    plain = pixels(saved_images(sd_server, sd_server.run(txt2img(CKPT, seed=21, prefix="lora")))[0])
    zero = pixels(saved_images(sd_server, sd_server.run(_with_lora(txt2img(CKPT, seed=21, prefix="lora"), 0, 0)))[0])
    full = pixels(saved_images(sd_server, sd_server.run(_with_lora(txt2img(CKPT, seed=21, prefix="lora"), 1, 1)))[0])
    assert np.array_equal(plain, zero)
    assert not np.array_equal(plain, full)
    # Back to the plain model on the same shared weights: the LoRA was taken off again.
    free(sd_server, free_memory=True)
    again = pixels(saved_images(sd_server, sd_server.run(txt2img(CKPT, seed=21, prefix="lora")))[0])
    assert np.array_equal(plain, again)


def test_latent_upscale_then_second_pass(sd_server):
    prompt = txt2img(CKPT, seed=31, prefix="hires")
    prompt["21"] = {"class_type": "LatentUpscaleBy",
                    "inputs": {"samples": ["3", 0], "upscale_method": "bislerp", "scale_by": 2.0}}
    prompt["22"] = dict(prompt["3"], inputs={**prompt["3"]["inputs"], "latent_image": ["21", 0], "denoise": 0.5})
    prompt["8"]["inputs"]["samples"] = ["22", 0]
    [png] = saved_images(sd_server, sd_server.run(prompt))
    assert Image.open(io.BytesIO(png)).size == (32, 32)


def test_interrupt_stops_sampling_between_steps(sd_server):
    ws = sd_server.ws()
    queued = sd_server.queue_prompt(txt2img(CKPT, seed=41, steps=3000, prefix="interrupted"),
                                    client_id=ws.client_id)
    ws.until(lambda m: m["type"] == "progress" and m["data"]["prompt_id"] == queued["prompt_id"])
    assert sd_server.post("/interrupt").status_code == 200
    messages = ws.until_done(queued["prompt_id"])
    interrupted = next(m["data"] for m in messages if not isinstance(m, bytes)
                       and m["type"] == "execution_interrupted")
    assert interrupted["node_id"] == "3" and interrupted["node_type"] == "KSampler"
    steps = [m["data"]["value"] for m in ws.messages if not isinstance(m, bytes) and m["type"] == "progress"]
    assert steps and max(steps) < 3000
    entry = sd_server.wait_history(queued["prompt_id"])
    assert entry["status"]["status_str"] == "error" and "9" not in entry["outputs"]
    ws.close()


@pytest.mark.parametrize("name, make, expected", [
    ("truncated.safetensors", lambda files: files["sd15"].read_bytes()[:300_000], "truncated"),
    ("a-vae.safetensors", lambda files: files["vae"].read_bytes(), "a VAE on its own"),
    ("a-lora.safetensors", lambda files: files["sd15-lora"].read_bytes(), "a LoRA"),
    ("picture.safetensors", lambda files: b"\x89PNG\r\n\x1a\n" + bytes(2000), "PNG image"),
    ("empty.ckpt", lambda files: b"", "empty"),
])
def test_bad_checkpoint_fails_the_prompt_with_a_clear_message(sd_server, model_files, name, make, expected):
    (sd_server.base / "models" / "checkpoints" / name).write_bytes(make(model_files))
    error = error_of(sd_server.run(txt2img(name, prefix="bad")))
    assert error["node_id"] == "4" and error["node_type"] == "CheckpointLoaderSimple"
    assert expected in error["exception_message"] and name in error["exception_message"]
    assert sd_server.get("/system_stats").status_code == 200
    assert saved_images(sd_server, sd_server.run(txt2img(CKPT, seed=51, prefix="after-bad")))


def test_free_unloads_the_cached_model(sd_server):
    saved_images(sd_server, sd_server.run(txt2img(CKPT, seed=61, prefix="free")))
    unloads = sd_server.log().count("unloaded tiny-sd15.safetensors UNet")
    loaded = loads(sd_server, "tiny-sd15.safetensors UNet")
    free(sd_server, "unloaded tiny-sd15.safetensors UNet", unload_models=True)
    assert sd_server.log().count("unloaded tiny-sd15.safetensors UNet") == unloads + 1
    # The next prompt builds the network again from the file.
    saved_images(sd_server, sd_server.run(txt2img(CKPT, seed=62, prefix="free")))
    assert loads(sd_server, "tiny-sd15.safetensors UNet") == loaded + 1


def test_unknown_sampler_is_a_validation_error(sd_server):
    response = sd_server.post("/prompt", {"prompt": txt2img(CKPT, sampler="no_such_sampler")})
    assert response.status_code == 400
    [error] = response.json()["node_errors"]["3"]["errors"]
    assert error["type"] == "value_not_in_list" and "sampler_name" in error["details"]


def test_disable_smart_memory_unloads_after_each_prompt(start_server, model_files, tmp_path):
    srv = start_server("--disable-smart-memory", packs=(), base=install_models(tmp_path / "dsm", model_files))
    saved_images(srv, srv.run(txt2img(CKPT, prefix="dsm")))
    deadline = time.monotonic() + 5
    while "unloaded tiny-sd15.safetensors UNet" not in srv.log():
        assert time.monotonic() < deadline, srv.log()[-2000:]
        time.sleep(0.02)


def test_precision_flags_choose_the_loaded_dtypes(start_server, sd_server, model_files, tmp_path):
    srv = start_server("--force-fp16", "--fp16-vae", packs=(), base=install_models(tmp_path / "fp16", model_files))
    [png] = saved_images(srv, srv.run(txt2img(CKPT, steps=1, prefix="fp16")))
    assert pixels(png).std() > 0
    log = srv.log()
    assert f"loaded {CKPT} UNet (float16)" in log  # --force-fp16
    assert f"loaded {CKPT} VAE (float16)" in log  # --fp16-vae
    # Without the flags the same model loads in the measured default (float32 or bfloat16), never float16.
    saved_images(sd_server, sd_server.run(txt2img(CKPT, steps=1, prefix="default-precision")))
    default_log = sd_server.log()
    assert f"loaded {CKPT} UNet (" in default_log and f"loaded {CKPT} VAE (" in default_log
    assert "(float16)" not in default_log


def test_deterministic_and_taesd_fallback(start_server, model_files, tmp_path):
    srv = start_server("--deterministic", "--preview-method", "taesd", packs=(),
                       base=install_models(tmp_path / "det", model_files))
    ws = srv.ws()
    for seed in (21, 22):
        queued = srv.queue_prompt(txt2img(CKPT, seed=seed, steps=2, prefix="det"), client_id=ws.client_id)
        messages = ws.until_done(queued["prompt_id"])
        saved_images(srv, srv.wait_history(queued["prompt_id"]))
        previews = [m for m in messages if isinstance(m, bytes)]
        assert len(previews) == 2  # latent2rgb previews stand in for taesd
    ws.close()
    log = srv.log()
    assert "--deterministic: torch.use_deterministic_algorithms(True)" in log
    assert log.count("taesd needs weights this server does not ship; using latent2rgb") == 1
