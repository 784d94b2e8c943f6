"""LoadImage, LoadImageMask, SaveImage and PreviewImage against real files in a temporary base directory."""

from __future__ import annotations

import json
import os
import re
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_serverless import paths
from comfy_serverless.nodes import image_files
from comfy_serverless.nodes.image_files import LoadImage, LoadImageMask, PreviewImage, SaveImage
from conftest import server_context


@pytest.fixture
def folders(tmp_path):
    with server_context(base_directory=str(tmp_path)) as server:
        for directory in (server.folders.input, server.folders.output):
            os.makedirs(directory)
        yield server.folders


def write_png(path, pixels, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(pixels), mode).save(path)
    return path


def saved_names(directory):
    return sorted(os.listdir(directory))


# -- saving --------------------------------------------------------------------------------------------

def test_save_names_counter_and_ui(folders):
    images = torch.rand(2, 4, 5, 3)
    result = SaveImage().save_images(images, "ComfyUI")
    assert result == {"ui": {"images": [
        {"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"},
        {"filename": "ComfyUI_00002_.png", "subfolder": "", "type": "output"}]}}
    again = SaveImage().save_images(images[:1], "ComfyUI")
    assert again["ui"]["images"][0]["filename"] == "ComfyUI_00003_.png"
    with Image.open(os.path.join(folders.output, "ComfyUI_00001_.png")) as png:
        assert png.size == (5, 4) and png.mode == "RGB"


def test_save_counter_continues_after_highest_existing_file(folders):
    for name in ("ComfyUI_00041_.png", "ComfyUI_00007_.png", "ComfyUI_notes.txt", "Other_00100_.png"):
        open(os.path.join(folders.output, name), "wb").close()
    result = SaveImage().save_images(torch.rand(1, 2, 2, 3), "ComfyUI")
    assert result["ui"]["images"][0]["filename"] == "ComfyUI_00042_.png"


def test_save_prefix_with_folders_and_variables(folders):
    result = SaveImage().save_images(torch.rand(2, 3, 7, 3), "renders/%width%x%height%/shot_%batch_num%")
    entries = result["ui"]["images"]
    assert [e["subfolder"] for e in entries] == ["renders/7x3", "renders/7x3"]
    assert [e["filename"] for e in entries] == ["shot_0_00001_.png", "shot_1_00002_.png"]
    assert saved_names(os.path.join(folders.output, "renders", "7x3")) == ["shot_0_00001_.png",
                                                                          "shot_1_00002_.png"]
    dated = SaveImage().save_images(torch.rand(1, 2, 2, 3), "%year%-%month%-%day%")
    assert dated["ui"]["images"][0]["filename"].startswith(time.strftime("%Y-%m-"))


@pytest.mark.parametrize("prefix", ["../escape", "a/../../escape", "/tmp/escape"])
def test_save_refuses_prefixes_that_leave_the_output_folder(folders, prefix):
    with pytest.raises(ValueError):
        SaveImage().save_images(torch.rand(1, 2, 2, 3), prefix)


def test_save_converts_by_truncation(folders):
    values = torch.tensor([0.25, 0.5, 1.0, -1.0, 2.0, 0.999])
    image = values.reshape(1, 1, 6, 1).expand(1, 1, 6, 3)
    SaveImage().save_images(image, "levels")
    with Image.open(os.path.join(folders.output, "levels_00001_.png")) as png:
        assert np.asarray(png)[0, :, 0].tolist() == [63, 127, 255, 0, 255, 254]


def test_save_writes_prompt_and_extra_pnginfo_as_text_chunks(folders):
    prompt = {"9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "été"}}}
    SaveImage().save_images(torch.rand(1, 2, 2, 3), "meta", prompt=prompt,
                            extra_pnginfo={"workflow": {"nodes": [1, 2]}, "note": "hi"})
    path = os.path.join(folders.output, "meta_00001_.png")
    with Image.open(path) as png:
        assert json.loads(png.text["prompt"]) == prompt
        assert json.loads(png.text["workflow"]) == {"nodes": [1, 2]}
        assert json.loads(png.text["note"]) == "hi"
    raw = open(path, "rb").read()
    assert b"tEXtprompt\x00" in raw and b"tEXtworkflow\x00" in raw


COMFYUI_FACTS = json.loads((Path(__file__).parents[1] / "fixtures" / "comfyui_facts.json").read_text())


def png_text_chunks(path):
    """(type, keyword, text) of every tEXt / zTXt / iTXt chunk, in file order, read from the raw PNG."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, position = [], 8
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            keyword, _, text = data[position + 8:position + 8 + length].partition(b"\x00")
            chunks.append({"type": kind.decode(), "keyword": keyword.decode("latin-1"), "text": text.decode("latin-1")})
        position += 12 + length
    return chunks


def test_save_text_chunks_are_byte_for_byte_comfyuis(tmp_path, folders):
    """The PNG text chunks ComfyUI's SaveImage was observed to write for this prompt and workflow (fixture
    "source"): 'prompt' then each extra_pnginfo key, JSON with ASCII escapes, uncompressed tEXt; none at all
    with --disable-metadata."""
    fact = COMFYUI_FACTS["save_image"]
    images = torch.linspace(0, 1, 18).reshape(1, 2, 3, 3)
    result = SaveImage().save_images(images, "facts", prompt=fact["prompt"], extra_pnginfo=fact["extra_pnginfo"])
    assert result["ui"]["images"][0]["filename"] == fact["filename"]
    assert png_text_chunks(os.path.join(folders.output, fact["filename"])) == fact["text_chunks"]
    with server_context(base_directory=str(tmp_path), disable_metadata=True):
        plain = SaveImage().save_images(images, "plain", prompt=fact["prompt"], extra_pnginfo=fact["extra_pnginfo"])
    saved = os.path.join(folders.output, plain["ui"]["images"][0]["filename"])
    assert png_text_chunks(saved) == fact["text_chunks_with_disable_metadata"] == []


def test_save_without_metadata_when_disabled(tmp_path, folders):
    with server_context(base_directory=str(tmp_path), disable_metadata=True):
        SaveImage().save_images(torch.rand(1, 2, 2, 3), "plain", prompt={"1": {}}, extra_pnginfo={"workflow": {}})
    with Image.open(os.path.join(folders.output, "plain_00001_.png")) as png:
        assert "prompt" not in png.text and "workflow" not in png.text


def test_preview_writes_to_temp(folders):
    node = PreviewImage()
    result = node.save_images(torch.rand(2, 3, 3, 3))
    entries = result["ui"]["images"]
    assert [e["type"] for e in entries] == ["temp", "temp"]
    assert re.fullmatch(r"ComfyUI_temp_[a-z]{5}_00001_\.png", entries[0]["filename"])
    assert entries[1]["filename"].endswith("_00002_.png")
    assert saved_names(folders.temp) == sorted(e["filename"] for e in entries)
    assert os.listdir(folders.output) == []
    assert list(PreviewImage.INPUT_TYPES()["required"]) == ["images"]


# -- loading -------------------------------------------------------------------------------------------

def test_load_rgba_gives_image_and_inverted_alpha_mask(folders):
    pixels = np.zeros((3, 4, 4), dtype=np.uint8)
    pixels[..., 0] = 255
    pixels[..., 3] = [[0, 51, 255, 255]] * 3
    write_png(os.path.join(folders.input, "rgba.png"), pixels)
    image, mask = LoadImage().load_image("rgba.png")
    assert image.shape == (1, 3, 4, 3) and image.dtype == torch.float32
    assert torch.all(image[..., 0] == 1.0) and torch.all(image[..., 1:] == 0.0)
    assert mask.shape == (1, 3, 4)
    assert torch.allclose(mask[0, 0], torch.tensor([1.0, 0.8, 0.0, 0.0]))


def test_load_rgb_gives_blank_64_mask(folders):
    write_png(os.path.join(folders.input, "rgb.png"), np.full((5, 6, 3), 51, dtype=np.uint8))
    image, mask = LoadImage().load_image("rgb.png")
    assert image.shape == (1, 5, 6, 3) and torch.allclose(image, torch.full_like(image, 0.2))
    assert mask.shape == (1, 64, 64) and torch.all(mask == 0)


def test_load_multi_frame_keeps_frames_of_the_first_size(folders):
    frames = [Image.new("RGB", (4, 3), (v, v, v)) for v in (0, 100, 200)] + [Image.new("RGB", (5, 5))]
    path = os.path.join(folders.input, "pages.tiff")
    frames[0].save(path, save_all=True, append_images=frames[1:])
    image, mask = LoadImage().load_image("pages.tiff")
    assert image.shape == (3, 3, 4, 3) and mask.shape == (3, 64, 64)
    assert torch.allclose(image[:, 0, 0, 0], torch.tensor([0, 100, 200]) / 255.0)


def test_load_applies_exif_orientation(folders):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown rotated by 90 degrees
    Image.new("RGB", (4, 2)).save(os.path.join(folders.input, "turned.png"), exif=exif)
    image, _ = LoadImage().load_image("turned.png")
    assert image.shape == (1, 4, 2, 3)


def test_load_16_bit_png(folders):
    values = np.array([[0, 255 * 100, 65535]], dtype=np.uint16)
    write_png(os.path.join(folders.input, "deep.png"), values)
    image, _ = LoadImage().load_image("deep.png")
    assert torch.allclose(image[0, 0, :, 0], torch.tensor([0.0, 100 / 255, 1.0]))
    # Newer Pillow opens such files as "I;16": they must scale the same way.
    wide = image_files._scale_wide_integers(Image.fromarray(values, "I;16"))
    assert np.asarray(wide.convert("RGB"))[0, :, 0].tolist() == [0, 100, 255]


def test_load_palette_transparency_becomes_mask(folders):
    palette = Image.new("P", (3, 2), 0)
    palette.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.save(os.path.join(folders.input, "p.png"), transparency=0)
    image, mask = LoadImage().load_image("p.png")
    assert mask.shape == (1, 2, 3)
    assert mask[0].tolist() == [[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    assert image[0, 0, 1].tolist() == [1.0, 1.0, 1.0]


def test_load_annotated_and_sub_folder_names(folders):
    write_png(os.path.join(folders.output, "made.png"), np.full((2, 2, 3), 255, dtype=np.uint8))
    write_png(os.path.join(folders.input, "sub", "x.png"), np.zeros((3, 3, 3), dtype=np.uint8))
    image, _ = LoadImage().load_image("made.png [output]")
    assert torch.all(image == 1.0)
    image, _ = LoadImage().load_image("sub/x.png")
    assert image.shape == (1, 3, 3, 3)


def test_validate_inputs(folders):
    write_png(os.path.join(folders.input, "here.png"), np.zeros((2, 2, 3), dtype=np.uint8))
    write_png(os.path.join(folders.input, "sub", "x.png"), np.zeros((2, 2, 3), dtype=np.uint8))
    write_png(os.path.join(folders.output, "x.png"), np.zeros((2, 2, 3), dtype=np.uint8))
    for node in (LoadImage, LoadImageMask):
        assert node.VALIDATE_INPUTS("here.png") is True
        assert node.VALIDATE_INPUTS("sub/x.png") is True
        assert node.VALIDATE_INPUTS("x.png [output]") is True
        assert node.VALIDATE_INPUTS("x.png") == "Invalid image file: x.png"
        assert node.VALIDATE_INPUTS("here.png [temp]") == "Invalid image file: here.png [temp]"
        assert node.VALIDATE_INPUTS("../output/x.png") == "Invalid image file: ../output/x.png"


def test_is_changed_follows_file_content(folders):
    path = os.path.join(folders.input, "a.png")
    write_png(path, np.zeros((2, 2, 3), dtype=np.uint8))
    first = LoadImage.IS_CHANGED("a.png")
    assert first == LoadImage.IS_CHANGED("a.png") == LoadImageMask.IS_CHANGED("a.png", "red")
    write_png(path, np.ones((2, 2, 3), dtype=np.uint8))
    assert LoadImage.IS_CHANGED("a.png") != first


def test_image_combo_lists_top_level_images(folders):
    write_png(os.path.join(folders.input, "b.png"), np.zeros((2, 2, 3), dtype=np.uint8))
    write_png(os.path.join(folders.input, "sub", "c.png"), np.zeros((2, 2, 3), dtype=np.uint8))
    open(os.path.join(folders.input, "notes.txt"), "w").close()
    combo, options = LoadImage.INPUT_TYPES()["required"]["image"]
    assert isinstance(combo, paths.FileList) and combo.source == "input:images"
    assert list(combo) == ["b.png"] and options == {"image_upload": True}
    assert LoadImageMask.INPUT_TYPES()["required"]["channel"][0] == ["alpha", "red", "green", "blue"]


def test_load_image_mask_channels(folders):
    pixels = np.zeros((2, 3, 4), dtype=np.uint8)
    pixels[..., 0], pixels[..., 1], pixels[..., 3] = 255, 51, 204
    write_png(os.path.join(folders.input, "m.png"), pixels)
    write_png(os.path.join(folders.input, "grey.png"), np.full((2, 3), 102, dtype=np.uint8))
    node = LoadImageMask()
    (red,) = node.load_image("m.png", "red")
    (green,) = node.load_image("m.png", "green")
    (alpha,) = node.load_image("m.png", "alpha")
    assert red.shape == (1, 2, 3) and torch.all(red == 1.0)
    assert torch.allclose(green, torch.full_like(green, 0.2))
    assert torch.allclose(alpha, torch.full_like(alpha, 0.2))  # 1 - 204/255
    (opaque,) = node.load_image("grey.png", "alpha")
    (grey,) = node.load_image("grey.png", "blue")
    assert torch.all(opaque == 0.0) and torch.allclose(grey, torch.full_like(grey, 0.4))


def test_definitions_match_comfyui():
    names = image_files.NODE_DISPLAY_NAME_MAPPINGS
    assert names == {"LoadImage": "Load Image", "LoadImageMask": "Load Image (as Mask)",
                     "SaveImage": "Save Image", "PreviewImage": "Preview Image"}
    assert SaveImage.OUTPUT_NODE and SaveImage.RETURN_TYPES == () and SaveImage.CATEGORY == "image"
    spec = SaveImage.INPUT_TYPES()
    assert spec["required"]["filename_prefix"][1]["default"] == "ComfyUI"
    assert spec["hidden"] == {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
    assert LoadImage.RETURN_TYPES == ("IMAGE", "MASK") and LoadImageMask.CATEGORY == "mask"
