"""Image and mask nodes called directly: shapes, values, and the ComfyUI behaviours they copy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from comfy_serverless.nodes import images, masks
from comfy_serverless.nodes.images import (
    EmptyImage,
    ImageBatch,
    ImageBlur,
    ImageCompositeMasked,
    ImageCrop,
    ImageInvert,
    ImagePadForOutpaint,
    ImageScale,
    ImageScaleBy,
    ImageSharpen,
    RebatchImages,
)
from comfy_serverless.nodes.masks import ImageToMask, InvertMask, MaskToImage, SolidMask


def ramp_image(batch=1, height=6, width=8, channels=3):
    count = batch * height * width * channels
    return (torch.arange(count, dtype=torch.float32) / count).reshape(batch, height, width, channels)


# -- definitions ---------------------------------------------------------------------------------------

def test_definitions_match_comfyui():
    assert images.NODE_DISPLAY_NAME_MAPPINGS["ImageScale"] == "Upscale Image"
    assert images.NODE_DISPLAY_NAME_MAPPINGS["ImagePadForOutpaint"] == "Pad Image for Outpainting"
    assert masks.NODE_DISPLAY_NAME_MAPPINGS == {"MaskToImage": "Convert Mask to Image",
                                                "ImageToMask": "Convert Image to Mask"}
    assert ImageScale.CATEGORY == "image/upscaling" and ImageCrop.CATEGORY == "image/transform"
    assert ImageBlur.CATEGORY == "image/postprocessing" and RebatchImages.CATEGORY == "image/batch"
    assert SolidMask.CATEGORY == "mask" and ImageCompositeMasked.CATEGORY == "image"
    scale = ImageScale.INPUT_TYPES()["required"]
    assert scale["upscale_method"][0] == ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
    assert scale["crop"][0] == ["disabled", "center"]
    assert scale["width"][1] == {"default": 512, "min": 0, "max": 16384, "step": 1}
    assert ImageScaleBy.INPUT_TYPES()["required"]["scale_by"][1]["max"] == 8.0
    assert EmptyImage.INPUT_TYPES()["required"]["color"][1]["max"] == 0xFFFFFF
    assert ImagePadForOutpaint.INPUT_TYPES()["required"]["feathering"][1]["default"] == 40
    assert list(ImageCompositeMasked.INPUT_TYPES()["optional"]) == ["mask"]
    assert ImageToMask.INPUT_TYPES()["required"]["channel"][0] == ["red", "green", "blue", "alpha"]
    assert RebatchImages.INPUT_IS_LIST is True and RebatchImages.OUTPUT_IS_LIST == (True,)


# -- simple transforms ---------------------------------------------------------------------------------

def test_invert():
    image = ramp_image()
    (out,) = ImageInvert().invert(image)
    assert torch.allclose(out, 1.0 - image)


def test_empty_image_color():
    (out,) = EmptyImage().generate(width=5, height=3, batch_size=2, color=0xFF8000)
    assert out.shape == (2, 3, 5, 3) and out.dtype == torch.float32
    assert torch.equal(out[1, 2, 4], torch.tensor([1.0, 128 / 255, 0.0]))


def test_crop_inside_and_past_the_edge():
    image = ramp_image(height=6, width=8)
    (out,) = ImageCrop().crop(image, width=3, height=2, x=1, y=2)
    assert torch.equal(out, image[:, 2:4, 1:4, :])
    (edge,) = ImageCrop().crop(image, width=4, height=4, x=100, y=100)
    assert torch.equal(edge, image[:, 5:, 7:, :])  # the origin is clamped to the last pixel


def test_rebatch_regroups_frames_in_order():
    first, second = ramp_image(batch=3), ramp_image(batch=2) + 1
    (out,) = RebatchImages().rebatch([first, second], batch_size=[2])
    assert [b.shape[0] for b in out] == [2, 2, 1]
    assert torch.equal(torch.cat(out), torch.cat([first, second]))


def test_batch_resizes_second_image_and_matches_channels():
    image1, image2 = ramp_image(batch=1, height=8, width=8), ramp_image(batch=2, height=4, width=6)
    (out,) = ImageBatch().batch(image1, image2)
    assert out.shape == (3, 8, 8, 3)
    assert torch.equal(out[:1], image1)
    expected = images.upscale(image2.movedim(-1, 1), 8, 8, "bilinear", "center").movedim(1, -1)
    assert torch.allclose(out[1:], expected)
    (mixed,) = ImageBatch().batch(ramp_image(channels=4), ramp_image(channels=3))
    assert mixed.shape[-1] == 4 and torch.all(mixed[1, ..., 3] == 1.0)


# -- scaling -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"])
def test_scale_methods_and_kept_aspect(method):
    image = ramp_image(batch=2, height=6, width=8)
    (out,) = ImageScale().upscale(image, method, width=16, height=0, crop="disabled")
    assert out.shape == (2, 12, 16, 3)
    (out,) = ImageScale().upscale(image, method, width=0, height=3, crop="disabled")
    assert out.shape == (2, 3, 4, 3)
    (same,) = ImageScale().upscale(image, method, width=0, height=0, crop="disabled")
    assert same is image
    (by,) = ImageScaleBy().upscale(image, method, scale_by=1.5)
    assert by.shape == (2, 9, 12, 3)


def test_lanczos_goes_through_pil_per_image():
    image = ramp_image(batch=1, height=6, width=8)
    (out,) = ImageScale().upscale(image, "lanczos", width=5, height=4, crop="disabled")
    pixels = np.clip(255.0 * image[0].numpy(), 0, 255).astype(np.uint8)
    reference = np.asarray(Image.fromarray(pixels).resize((5, 4), Image.Resampling.LANCZOS)) / 255.0
    assert torch.allclose(out[0], torch.from_numpy(reference).float())


def test_center_crop_trims_to_target_aspect():
    image = torch.zeros(1, 4, 8, 3)
    image[:, :, 2:6, :] = 1.0  # only the middle square is white
    (out,) = ImageScale().upscale(image, "nearest-exact", width=4, height=4, crop="center")
    assert torch.all(out == 1.0)
    (wide,) = ImageScale().upscale(image, "nearest-exact", width=4, height=4, crop="disabled")
    assert not torch.all(wide == 1.0)


# -- padding, blur, sharpen ----------------------------------------------------------------------------

def reference_feather(height, width, left, top, right, bottom, feathering):
    inside = np.zeros((height, width), dtype=np.float32)
    if feathering > 0 and feathering * 2 < height and feathering * 2 < width:
        for i in range(height):
            for j in range(width):
                d = min(i if top else height, height - i if bottom else height,
                        j if left else width, width - j if right else width)
                if d < feathering:
                    inside[i, j] = ((feathering - d) / feathering) ** 2
    return inside


@pytest.mark.parametrize("sides", [(8, 0, 4, 16), (0, 8, 0, 0), (3, 5, 7, 2)])
def test_pad_for_outpaint_image_and_feathered_mask(sides):
    left, top, right, bottom = sides
    image = ramp_image(batch=2, height=20, width=24)
    canvas, mask = ImagePadForOutpaint().expand_image(image, left, top, right, bottom, feathering=6)
    assert canvas.shape == (2, 20 + top + bottom, 24 + left + right, 3)
    assert mask.shape == (1, 20 + top + bottom, 24 + left + right)
    assert torch.equal(canvas[:, top:top + 20, left:left + 24], image)
    padding = torch.ones(canvas.shape[1:3], dtype=torch.bool)
    padding[top:top + 20, left:left + 24] = False
    assert torch.all(canvas[:, padding] == 0.5) and torch.all(mask[0][padding] == 1.0)
    expected = torch.from_numpy(reference_feather(20, 24, left, top, right, bottom, 6))
    assert torch.equal(mask[0, top:top + 20, left:left + 24], expected)


def test_pad_without_room_to_feather_leaves_inside_clear():
    _, mask = ImagePadForOutpaint().expand_image(ramp_image(height=6, width=8), 8, 8, 8, 8, feathering=40)
    assert torch.all(mask[0, 8:14, 8:16] == 0.0)


def test_blur_matches_comfyui_padding_scheme_and_keeps_flat_images():
    image = torch.rand(2, 9, 11, 3)
    (out,) = ImageBlur().blur(image, blur_radius=2, sigma=1.5)
    kernel = images._gaussian_kernel(5, 1.5).repeat(3, 1, 1).unsqueeze(1)
    padded = F.pad(image.permute(0, 3, 1, 2), (2, 2, 2, 2), mode="reflect")
    reference = F.conv2d(padded, kernel, padding=2, groups=3)[:, :, 2:-2, 2:-2].permute(0, 2, 3, 1)
    assert torch.allclose(out, reference, atol=1e-6)
    assert out.std() < image.std()
    (flat,) = ImageBlur().blur(torch.full((1, 5, 5, 3), 0.3), blur_radius=1, sigma=1.0)
    assert torch.allclose(flat, torch.full_like(flat, 0.3))


def test_sharpen_keeps_flat_images_and_clamps():
    (flat,) = ImageSharpen().sharpen(torch.full((1, 6, 6, 3), 0.4), sharpen_radius=1, sigma=1.0, alpha=1.0)
    assert torch.allclose(flat, torch.full_like(flat, 0.4), atol=1e-5)
    edge = torch.zeros(1, 6, 6, 3)
    edge[:, :, 3:] = 1.0
    (out,) = ImageSharpen().sharpen(edge, sharpen_radius=2, sigma=1.0, alpha=2.0)
    assert out.min() >= 0.0 and out.max() <= 1.0 and out.shape == edge.shape


# -- compositing ---------------------------------------------------------------------------------------

def test_composite_pastes_and_clips_at_the_edge():
    destination, source = torch.zeros(1, 6, 6, 3), torch.ones(1, 4, 4, 3)
    (out,) = ImageCompositeMasked().composite(destination, source, x=4, y=1, resize_source=False)
    expected = torch.zeros(1, 6, 6, 3)
    expected[:, 1:5, 4:6] = 1.0
    assert torch.equal(out, expected)
    assert torch.all(destination == 0)  # the input is not modified


def test_composite_with_mask_batch_and_resize():
    destination, source = torch.zeros(2, 4, 4, 3), torch.ones(1, 2, 2, 3)
    mask = torch.tensor([[1.0, 0.0], [0.5, 0.0]])
    (out,) = ImageCompositeMasked().composite(destination, source, x=0, y=0, resize_source=False, mask=mask)
    assert out.shape == (2, 4, 4, 3)
    assert torch.allclose(out[:, :2, :2, 0], mask.expand(2, 2, 2))
    (resized,) = ImageCompositeMasked().composite(destination, source, 0, 0, resize_source=True)
    assert torch.all(resized == 1.0)


def test_composite_rgb_source_on_rgba_destination_is_opaque():
    destination, source = torch.zeros(1, 3, 3, 4), torch.full((1, 3, 3, 3), 0.5)
    (out,) = ImageCompositeMasked().composite(destination, source, 0, 0, resize_source=False)
    assert out.shape == (1, 3, 3, 4) and torch.all(out[..., 3] == 1.0) and torch.all(out[..., :3] == 0.5)


# -- masks ---------------------------------------------------------------------------------------------

def test_solid_and_invert_mask():
    (solid,) = SolidMask().solid(value=0.25, width=5, height=3)
    assert solid.shape == (1, 3, 5) and torch.all(solid == 0.25)
    (inverted,) = InvertMask().invert(solid)
    assert torch.all(inverted == 0.75)


def test_mask_to_image_accepts_bare_masks():
    (from_bare,) = MaskToImage().mask_to_image(torch.rand(4, 5))
    assert from_bare.shape == (1, 4, 5, 3)
    batch = torch.rand(2, 4, 5)
    (out,) = MaskToImage().mask_to_image(batch)
    assert out.shape == (2, 4, 5, 3) and torch.equal(out[..., 1], batch)


def test_image_to_mask_channels():
    image = ramp_image(batch=2, channels=4)
    for index, channel in enumerate(["red", "green", "blue", "alpha"]):
        (mask,) = ImageToMask().image_to_mask(image, channel)
        assert torch.equal(mask, image[..., index])
    with pytest.raises(ValueError):
        ImageToMask().image_to_mask(ramp_image(channels=3), "alpha")
