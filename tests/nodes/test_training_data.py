"""LoadImageSetFromFolderNode / LoadImageTextSetFromFolderNode on real folders: the folder combo, pixel values,
the resize methods against PIL done by hand, captions and kohya repeat folders, errors, and a run over HTTP."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_serverless.models.random_checkpoints import make_test_checkpoint
from comfy_serverless.nodes.training_data import LoadImageSetFromFolderNode, LoadImageTextSetFromFolderNode
from conftest import Server, server_context


@pytest.fixture
def folders(tmp_path):
    with server_context(base_directory=str(tmp_path)) as server:
        os.makedirs(server.folders.input)
        yield server.folders


def _pixels(height, width, seed):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _write(path, pixels):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path)


class FakeClip:
    """Records what it encodes; the encoding is a function of the text, so entries can be checked."""

    def __init__(self):
        self.texts = []

    def encode(self, text):
        self.texts.append(text)
        value = float(len(text))
        return torch.full((1, 2, 3), value), torch.full((1, 3), value)


def test_the_folder_combo_lists_nested_input_subfolders(folders):
    for sub in ("b", "a/inner", ".hidden"):
        os.makedirs(os.path.join(folders.input, sub))
    _write(os.path.join(folders.input, "top.png"), _pixels(2, 2, 0))
    combo = LoadImageSetFromFolderNode.INPUT_TYPES()["required"]["folder"][0]
    assert list(combo) == ["a", "a/inner", "b"] and combo.source == "input:folders"
    assert folders.file_list("input:folders") == ["a", "a/inner", "b"]
    assert LoadImageTextSetFromFolderNode.INPUT_TYPES()["required"]["folder"][0].source == "input:folders"


def test_images_load_as_one_batch_in_name_order(folders):
    first, second = _pixels(4, 6, 1), _pixels(4, 6, 2)
    _write(os.path.join(folders.input, "set", "b.png"), second)
    _write(os.path.join(folders.input, "set", "a.png"), first)
    with open(os.path.join(folders.input, "set", "notes.txt"), "w") as handle:
        handle.write("not an image")
    (batch,) = LoadImageSetFromFolderNode().load_images("set")
    assert batch.shape == (2, 4, 6, 3) and batch.dtype == torch.float32
    np.testing.assert_allclose(batch[0].numpy(), first / 255.0, atol=1e-7)
    np.testing.assert_allclose(batch[1].numpy(), second / 255.0, atol=1e-7)


def test_resize_methods_follow_the_first_image(folders):
    big = _pixels(6, 8, 3)
    _write(os.path.join(folders.input, "mixed", "a.png"), _pixels(4, 5, 4))
    _write(os.path.join(folders.input, "mixed", "b.png"), big)
    node = LoadImageSetFromFolderNode()
    with pytest.raises(ValueError, match="8x6, not 5x4"):
        node.load_images("mixed", "None")
    stretched = np.asarray(Image.fromarray(big).resize((5, 4), Image.Resampling.LANCZOS)) / 255.0
    for method in ("Stretch", "Pad"):  # ComfyUI's Pad stretches as well
        (batch,) = node.load_images("mixed", method)
        assert batch.shape == (2, 4, 5, 3)
        np.testing.assert_allclose(batch[1].numpy(), stretched, atol=1e-6)
    (cropped,) = node.load_images("mixed", "Crop")
    np.testing.assert_allclose(cropped[1].numpy(), big[:4, :5] / 255.0, atol=1e-7)


def test_crop_of_a_smaller_image_fills_with_black(folders):
    small = _pixels(2, 3, 5)
    _write(os.path.join(folders.input, "grow", "a.png"), _pixels(4, 4, 6))
    _write(os.path.join(folders.input, "grow", "b.png"), small)
    (batch,) = LoadImageSetFromFolderNode().load_images("grow", "Crop")
    assert batch.shape == (2, 4, 4, 3)
    np.testing.assert_allclose(batch[1, :2, :3].numpy(), small / 255.0, atol=1e-7)
    assert batch[1, 2:].abs().max() == 0 and batch[1, :, 3:].abs().max() == 0


def test_bad_folders_give_clear_errors(folders):
    os.makedirs(os.path.join(folders.input, "empty"))
    node = LoadImageSetFromFolderNode()
    with pytest.raises(ValueError, match="No valid images"):
        node.load_images("empty")
    with pytest.raises(ValueError, match="not a subfolder"):
        node.load_images("../outside")
    with pytest.raises(ValueError, match="not a subfolder"):
        node.load_images("missing")
    with pytest.raises(ValueError, match="resize_method"):
        _write(os.path.join(folders.input, "one", "a.png"), _pixels(2, 2, 0))
        node.load_images("one", "Squash")
    with pytest.raises(RuntimeError, match="clip input is invalid"):
        LoadImageTextSetFromFolderNode().load_images("one", None)


def test_captions_repeats_and_size(folders):
    root = os.path.join(folders.input, "captioned")
    _write(os.path.join(root, "a.png"), _pixels(4, 4, 7))
    with open(os.path.join(root, "a.txt"), "w", encoding="utf-8") as handle:
        handle.write("  a red cube \n")
    _write(os.path.join(root, "b.jpg"), _pixels(4, 4, 8))  # no caption: the empty prompt
    _write(os.path.join(root, "3_cat", "c.png"), _pixels(6, 6, 9))
    with open(os.path.join(root, "3_cat", "c.txt"), "w", encoding="utf-8") as handle:
        handle.write("cat")
    _write(os.path.join(root, "misc", "d.png"), _pixels(4, 4, 10))
    clip = FakeClip()
    images, conditioning = LoadImageTextSetFromFolderNode().load_images("captioned", clip, "Stretch", 8, -1)
    # a, b, c three times (3_cat), d once; width 8 asked, height from the first image
    assert images.shape == (6, 4, 8, 3)
    assert len(conditioning) == 6
    lengths = [entry[0][0, 0, 0].item() for entry in conditioning]
    assert lengths == [len("a red cube"), 0, 3, 3, 3, 0]
    assert sorted(clip.texts) == ["", "a red cube", "cat"]  # each caption encoded once
    assert all(entry[1]["pooled_output"].shape == (1, 3) for entry in conditioning)
    assert conditioning[2][1] is not conditioning[3][1]  # entries can be changed one at a time


def test_image_text_set_through_the_server(tmp_path):
    checkpoints = tmp_path / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    make_test_checkpoint("sd15", "tiny", checkpoints / "tiny.safetensors", seed=1)
    dataset = tmp_path / "input" / "dataset"
    for index in range(2):
        _write(str(dataset / f"{index}.png"), _pixels(8, 8, index))
    (dataset / "0.txt").write_text("a photo")
    srv = Server(tmp_path, args=("--force-fp32",), packs=())
    try:
        info = srv.get("/object_info/LoadImageTextSetFromFolderNode").json()["LoadImageTextSetFromFolderNode"]
        assert info["input"]["required"]["folder"][0] == ["dataset"]
        prompt = {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
            "2": {"class_type": "LoadImageTextSetFromFolderNode", "inputs": {"folder": "dataset", "clip": ["1", 1]}},
            "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
            "4": {"class_type": "KSampler", "inputs": {
                "model": ["1", 0], "seed": 1, "steps": 1, "cfg": 1.0, "sampler_name": "euler",
                "scheduler": "normal", "positive": ["2", 1], "negative": ["2", 1], "latent_image": ["3", 0],
                "denoise": 0.5}},
            "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
            "6": {"class_type": "SaveImage", "inputs": {"filename_prefix": "train", "images": ["5", 0]}},
            "7": {"class_type": "LoadImageSetFromFolderNode", "inputs": {"folder": "dataset"}},
            "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
        }
        entry = srv.run(prompt)
        assert entry["status"]["status_str"] == "success", entry["status"]
        assert len(entry["outputs"]["6"]["images"]) == 2 and len(entry["outputs"]["8"]["images"]) == 2
        bad = {"7": {"class_type": "LoadImageSetFromFolderNode", "inputs": {"folder": "nope"}}, "8": prompt["8"]}
        response = srv.post("/prompt", {"prompt": bad})
        assert response.status_code == 400 and "nope" in response.text
    finally:
        srv.stop()
        shutil.rmtree(tmp_path / "output", ignore_errors=True)
