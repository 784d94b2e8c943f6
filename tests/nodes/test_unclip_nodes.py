"""unCLIPCheckpointLoader: directly and in ComfyUI's unCLIP template shape (unCLIPCheckpointLoader ->
CLIPVisionEncode -> unCLIPConditioning -> KSampler) through the real server, on a tiny random SD 2.1 unCLIP file."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from comfy_serverless.models.random_checkpoints import make_test_checkpoint
from comfy_serverless.nodes.unclip_loader import NODE_CLASS_MAPPINGS, unCLIPCheckpointLoader
from conftest import server_context


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unclip-files")
    paths = {"unclip": folder / "tiny-unclip.safetensors", "sd15": folder / "tiny-sd15.safetensors"}
    make_test_checkpoint("sd2_unclip", "tiny", paths["unclip"], seed=2)
    make_test_checkpoint("sd15", "tiny", paths["sd15"], seed=1)
    return paths


def test_definition():
    assert NODE_CLASS_MAPPINGS == {"unCLIPCheckpointLoader": unCLIPCheckpointLoader}
    assert unCLIPCheckpointLoader.RETURN_TYPES == ("MODEL", "CLIP", "VAE", "CLIP_VISION")
    assert unCLIPCheckpointLoader.CATEGORY == "loaders"


def test_loader_gives_the_four_parts_and_none_for_a_plain_checkpoint(files, tmp_path):
    import torch

    from comfy_serverless.nodes.clip_vision_nodes import CLIPVisionEncode
    from comfy_serverless.nodes.loaders import CheckpointLoaderSimple

    models = tmp_path / "models" / "checkpoints"
    models.mkdir(parents=True)
    for path in files.values():
        (models / path.name).hardlink_to(path)
    with server_context(force_fp32=True, base_directory=str(tmp_path)):
        model, clip, vae, vision = unCLIPCheckpointLoader().load_checkpoint("tiny-unclip.safetensors")
        assert model.adm_kind == "unclip" and clip.family == "sd2" and vae is not None
        embeds = CLIPVisionEncode().encode(vision, torch.rand(1, 32, 32, 3), "center")[0].image_embeds
        assert embeds.shape == (1, 32)
        # The plain loader loads unCLIP files too (as ComfyUI), without the image encoder.
        assert CheckpointLoaderSimple().load_checkpoint("tiny-unclip.safetensors")[0].adm_kind == "unclip"
        assert unCLIPCheckpointLoader().load_checkpoint("tiny-sd15.safetensors")[3] is None
        with pytest.raises(RuntimeError, match="has no CLIP vision model"):
            CLIPVisionEncode().encode(None, torch.rand(1, 32, 32, 3), "center")


# -- through the server ------------------------------------------------------------------------------------

def _prompt(strength: float, noise_augmentation: float, seed: int = 3, prefix: str = "unclip") -> dict:
    return {
        "1": {"class_type": "unCLIPCheckpointLoader", "inputs": {"ckpt_name": "tiny-unclip.safetensors"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
        "3": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["1", 3], "image": ["2", 0],
                                                           "crop": "center"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a fox", "clip": ["1", 1]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "6": {"class_type": "unCLIPConditioning", "inputs": {
            "conditioning": ["4", 0], "clip_vision_output": ["3", 0], "strength": strength,
            "noise_augmentation": noise_augmentation}},
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["1", 0], "positive": ["6", 0], "negative": ["5", 0], "latent_image": ["7", 0]}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "10": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["9", 0]}},
    }


def _pixels(srv, entry: dict) -> np.ndarray:
    assert entry["status"]["status_str"] == "success", entry["status"]
    [image] = entry["outputs"]["10"]["images"]
    return np.asarray(Image.open(io.BytesIO(srv.get("/view", params=image).content))).astype(np.int16)


def test_unclip_template_through_the_server(start_server, tmp_path, files):
    base = tmp_path / "unclip-server"
    (base / "models" / "checkpoints").mkdir(parents=True)
    for path in files.values():
        (base / "models" / "checkpoints" / path.name).hardlink_to(path)
    (base / "input").mkdir()
    photo = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(photo).save(base / "input" / "photo.png")
    srv = start_server("--force-fp32", packs=(), base=base)

    info = srv.get("/object_info/unCLIPCheckpointLoader").json()["unCLIPCheckpointLoader"]
    assert info["output"] == ["MODEL", "CLIP", "VAE", "CLIP_VISION"]
    assert info["display_name"] == "unCLIPCheckpointLoader"
    without = _pixels(srv, srv.run(_prompt(0.0, 0.0)))
    with_image = _pixels(srv, srv.run(_prompt(1.0, 0.0, prefix="b")))
    augmented = _pixels(srv, srv.run(_prompt(1.0, 0.8, prefix="c")))
    again = _pixels(srv, srv.run(_prompt(1.0, 0.8, prefix="d")))
    assert without.std() > 0
    assert not np.array_equal(without, with_image)  # strength 0 leaves y at zeros; 1 feeds the embedding
    assert not np.array_equal(with_image, augmented)  # noise augmentation changes the embedding
    assert np.array_equal(augmented, again)  # the augmentation noise is seeded: same prompt, same image

    bad = _prompt(1.0, 0.0)
    bad["1"]["inputs"]["ckpt_name"] = "tiny-sd15.safetensors"
    entry = srv.run(bad)
    assert entry["status"]["status_str"] == "error"
    error = next(data for name, data in entry["status"]["messages"] if name == "execution_error")
    assert error["node_id"] == "3" and "no CLIP vision model" in error["exception_message"]
