"""WebcamCapture (nodes/webcam.py): LoadImage's file loading for the frame ComfyUI's webcam widget uploads,
the image only, the file as it is whatever width/height say (ComfyUI's frontend sizes the capture), and a run
over HTTP with the widget's upload (subfolder "webcam" of the temp folder)."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_serverless.nodes import webcam
from comfy_serverless.nodes.image_files import LoadImage
from comfy_serverless.nodes.webcam import WebcamCapture
from conftest import server_context


def frame(height=6, width=10, alpha=False):
    pixels = (np.arange(height * width * 4, dtype=np.uint32).reshape(height, width, 4) * 37 % 256).astype(np.uint8)
    return Image.fromarray(pixels if alpha else pixels[..., :3], "RGBA" if alpha else "RGB")


@pytest.fixture
def folders(tmp_path):
    with server_context(base_directory=str(tmp_path)) as server:
        for directory in (server.folders.input, server.folders.temp):
            os.makedirs(directory, exist_ok=True)
        yield server.folders


def test_loads_the_frame_as_load_image_does_and_returns_only_the_image(folders):
    frame(alpha=True).save(os.path.join(folders.input, "shot.png"))
    result = WebcamCapture().load_capture("shot.png", width=0, height=0, capture_on_queue=True)
    assert len(result) == 1
    expected = LoadImage().load_image("shot.png")[0]
    assert result[0].shape == (1, 6, 10, 3) and torch.equal(result[0], expected)
    pixels = np.asarray(frame(alpha=True))[..., :3].astype(np.float32) / 255.0
    assert torch.equal(result[0][0], torch.from_numpy(pixels))


def test_width_and_height_do_not_resize_on_the_server(folders):
    frame().save(os.path.join(folders.input, "shot.png"))
    (image,) = WebcamCapture().load_capture("shot.png", width=64, height=48, capture_on_queue=False)
    assert image.shape == (1, 6, 10, 3)


def test_temp_folder_annotation_and_is_changed(folders):
    os.makedirs(os.path.join(folders.temp, "webcam"))
    path = os.path.join(folders.temp, "webcam", "1.png")
    frame().save(path)
    (image,) = WebcamCapture().load_capture("webcam/1.png [temp]", 0, 0, True)
    assert image.shape == (1, 6, 10, 3)
    first = WebcamCapture.IS_CHANGED("webcam/1.png [temp]", 0, 0, True)
    assert first == LoadImage.IS_CHANGED("webcam/1.png [temp]")
    frame(height=3).save(path)
    assert WebcamCapture.IS_CHANGED("webcam/1.png [temp]", 0, 0, True) != first


def test_missing_file_is_refused(folders):
    assert WebcamCapture.VALIDATE_INPUTS("nothing.png") == "Invalid image file: nothing.png"


def test_definition_matches_comfyui():
    assert WebcamCapture.RETURN_TYPES == ("IMAGE",) and WebcamCapture.CATEGORY == "image"
    assert webcam.NODE_DISPLAY_NAME_MAPPINGS == {"WebcamCapture": "Webcam Capture"}
    assert list(WebcamCapture.INPUT_TYPES()["required"]) == ["image", "width", "height", "capture_on_queue"]


def test_capture_over_http(server):
    png = io.BytesIO()
    frame(height=5, width=7).save(png, format="PNG")
    uploaded = server.post("/upload/image", files={"image": ("capture.png", png.getvalue(), "image/png")},
                           data={"subfolder": "webcam", "type": "temp"})
    assert uploaded.status_code == 200, uploaded.text
    name = f"{uploaded.json()['subfolder']}/{uploaded.json()['name']} [temp]"
    prompt = {
        "1": {"class_type": "WebcamCapture",
              "inputs": {"image": name, "width": 640, "height": 480, "capture_on_queue": True}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "webcam"}},
    }
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    saved = entry["outputs"]["2"]["images"][0]
    with Image.open(server.base / "output" / saved["subfolder"] / saved["filename"]) as out:
        assert out.size == (7, 5) and out.tobytes() == frame(height=5, width=7).tobytes()
    bad = server.post("/prompt", json={"prompt": {**prompt, "1": {**prompt["1"], "inputs": {
        **prompt["1"]["inputs"], "image": "absent.png"}}}})
    assert bad.status_code == 400 and "Invalid image file: absent.png" in bad.text
