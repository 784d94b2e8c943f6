"""SaveAnimatedPNG, SaveAnimatedWEBP and LoadImageOutput against real files, and the issue-11 image, mask and
string nodes together in workflows run by the real server over HTTP."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from comfy_serverless.nodes.image_saving import LoadImageOutput, SaveAnimatedPNG, SaveAnimatedWEBP
from conftest import server_context


@pytest.fixture
def folders(tmp_path):
    with server_context(base_directory=str(tmp_path)) as server:
        for directory in (server.folders.input, server.folders.output):
            os.makedirs(directory)
        yield server.folders


def frames(count=3, height=4, width=5):
    images = torch.zeros(count, height, width, 3)
    for index in range(count):
        images[index, ..., index % 3] = 1.0  # red, green, blue frames
    return images


def comf_chunks(path) -> dict[str, str]:
    """The private 'comf' chunks of a PNG: {key: text}."""
    data, found, offset = open(path, "rb").read(), {}, 8
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        if kind == b"comf":
            key, _, value = data[offset + 8:offset + 8 + length].partition(b"\0")
            found[key.decode("latin-1")] = value.decode("latin-1")
        offset += 12 + length
    return found


def test_animated_png_frames_timing_and_metadata(folders):
    result = SaveAnimatedPNG().save_images(frames(), fps=4.0, compress_level=1, filename_prefix="anim/clip",
                                           prompt={"1": {"class_type": "X"}}, extra_pnginfo={"workflow": {"n": 1}})
    assert result == {"ui": {"images": [{"filename": "clip_00001_.png", "subfolder": "anim", "type": "output"}],
                             "animated": [True]}}
    path = os.path.join(folders.output, "anim", "clip_00001_.png")
    with Image.open(path) as png:
        assert png.n_frames == 3 and png.info["duration"] == 250
        colours = [np.array(frame.convert("RGB"))[0, 0].tolist() for frame in ImageSequence.Iterator(png)]
    assert colours == [[255, 0, 0], [0, 255, 0], [0, 0, 255]]
    assert comf_chunks(path) == {"prompt": json.dumps({"1": {"class_type": "X"}}), "workflow": json.dumps({"n": 1})}
    again = SaveAnimatedPNG().save_images(frames(1), 6.0, 4, "anim/clip")
    assert again["ui"]["images"][0]["filename"] == "clip_00002_.png"


def test_animated_webp_frames_and_exif(folders):
    result = SaveAnimatedWEBP().save_images(frames(), 10.0, "clip", True, 80, "fastest", prompt={"a": 1},
                                            extra_pnginfo={"workflow": {"b": 2}})
    assert result["ui"] == {"images": [{"filename": "clip_00001_.webp", "subfolder": "", "type": "output"}],
                            "animated": [True]}
    with Image.open(os.path.join(folders.output, "clip_00001_.webp")) as webp:
        assert webp.n_frames == 3
        exif = webp.getexif()
        assert exif[0x0110] == 'prompt:{"a": 1}' and exif[0x010F] == 'workflow:{"b": 2}'
        webp.seek(1)
        assert np.array(webp.convert("RGB"))[0, 0].tolist() == [0, 255, 0]  # lossless
    with pytest.raises(ValueError, match="method"):
        SaveAnimatedWEBP().save_images(frames(), 10.0, "clip", True, 80, "quickest")
    with pytest.raises(ValueError, match="fps"):
        SaveAnimatedPNG().save_images(frames(), 0.0, 4, "clip")


def test_load_image_output_reads_annotated_output_files(folders):
    Image.new("RGBA", (3, 2), (255, 0, 0, 64)).save(os.path.join(folders.output, "made.png"))
    image, mask = LoadImageOutput().load_image("made.png [output]")
    assert image.shape == (1, 2, 3, 3) and image[0, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert mask[0, 0, 0].item() == pytest.approx(1 - 64 / 255)
    assert LoadImageOutput.VALIDATE_INPUTS("made.png [output]") is True
    assert LoadImageOutput.VALIDATE_INPUTS("made.png") == "Invalid image file: made.png"  # unannotated: input
    spec = LoadImageOutput.INPUT_TYPES()["required"]["image"]
    assert spec[0] == "COMBO" and spec[1]["image_folder"] == "output" and LoadImageOutput.EXPERIMENTAL


# -- through the server ----------------------------------------------------------------------------------------

def test_image_mask_and_string_nodes_over_http(start_server, tmp_path):
    srv = start_server(packs=(), base=tmp_path / "issue11-base")
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 6, "batch_size": 1, "color": 0xFF0000}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 4, "height": 6, "batch_size": 1, "color": 0x0000FF}},
        "3": {"class_type": "ImageStitch", "inputs": {"image1": ["1", 0], "image2": ["2", 0], "direction": "right",
                                                      "match_image_size": False, "spacing_width": 0,
                                                      "spacing_color": "white"}},
        "4": {"class_type": "ImageRotate", "inputs": {"image": ["3", 0], "rotation": "90 degrees"}},
        "5": {"class_type": "GetImageSize", "inputs": {"image": ["4", 0]}},
        "6": {"class_type": "StringConcatenate", "inputs": {"string_a": "rotated", "string_b": "stitch",
                                                            "delimiter": " "}},
        "7": {"class_type": "CaseConverter", "inputs": {"string": ["6", 0], "mode": "Title Case"}},
        "8": {"class_type": "PreviewAny", "inputs": {"source": ["7", 0]}},
        "9": {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}},
        "10": {"class_type": "ImageColorToMask", "inputs": {"image": ["4", 0], "color": 0x0000FF}},
        "11": {"class_type": "GrowMask", "inputs": {"mask": ["10", 0], "expand": 1, "tapered_corners": False}},
        "12": {"class_type": "MaskToImage", "inputs": {"mask": ["11", 0]}},
        "13": {"class_type": "Morphology", "inputs": {"image": ["12", 0], "operation": "erode", "kernel_size": 3}},
        "14": {"class_type": "SaveImage", "inputs": {"images": ["13", 0], "filename_prefix": "mask"}},
        "15": {"class_type": "SaveAnimatedPNG", "inputs": {"images": ["4", 0], "filename_prefix": "turned",
                                                          "fps": 2.0, "compress_level": 1}},
    }
    entry = srv.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    outputs = entry["outputs"]
    assert outputs["8"]["text"] == ["Rotated Stitch"]
    assert outputs["9"]["text"] == ["6"]  # the width of the rotated 12 x 6 image
    assert outputs["15"]["animated"] == [True]
    with Image.open(srv.base / "output" / outputs["15"]["images"][0]["filename"]) as png:
        turned = np.array(png.convert("RGB"))
    assert turned.shape == (12, 6, 3)
    assert turned[0, 0].tolist() == [255, 0, 0] and turned[-1, 0].tolist() == [0, 0, 255]  # blue part at the bottom
    # The blue rows 8..11 grown by one (square) then eroded by 3x3: back to rows 8..11 (the border is ignored).
    with Image.open(srv.base / "output" / outputs["14"]["images"][0]["filename"]) as png:
        mask = np.array(png.convert("L")) // 255
    expected = np.zeros((12, 6), dtype=np.uint8)
    expected[8:] = 1
    assert np.array_equal(mask, expected)

    # The saved animation read back through LoadImageOutput, and a bad name refused at validation.
    saved = outputs["15"]["images"][0]["filename"]
    reload = {
        "1": {"class_type": "LoadImageOutput", "inputs": {"image": f"{saved} [output]"}},
        "2": {"class_type": "GetImageSize", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
    }
    again = srv.run(reload)
    assert again["status"]["status_str"] == "success", again["status"]
    assert again["outputs"]["3"]["text"] == ["12"]
    reload["1"]["inputs"]["image"] = "missing.png [output]"
    refused = srv.post("/prompt", {"prompt": reload})
    assert refused.status_code == 400 and "Invalid image file" in refused.text
