"""Mask nodes and alpha compositing (nodes/mask_ops.py) called directly, against scipy and hand-computed values."""

from __future__ import annotations

import os

import numpy as np
import pytest
import scipy.ndimage
import torch
from PIL import Image

from comfy_serverless.nodes.mask_ops import (
    PORTER_DUFF_MODES,
    CropMask,
    FeatherMask,
    GrowMask,
    ImageColorToMask,
    JoinImageWithAlpha,
    MaskComposite,
    MaskPreview,
    PorterDuffImageComposite,
    SplitImageWithAlpha,
    ThresholdMask,
)
from conftest import server_context


def dot(size=9, at=(4, 4)):
    mask = torch.zeros(1, size, size)
    mask[0, at[0], at[1]] = 1.0
    return mask


# -- grow -------------------------------------------------------------------------------------------------

def test_grow_a_pixel_into_a_diamond_or_a_square():
    (diamond,) = GrowMask().expand_mask(dot(), 2, tapered_corners=True)
    rows, cols = np.indices((9, 9))
    assert np.array_equal(diamond[0].numpy(), (abs(rows - 4) + abs(cols - 4) <= 2).astype(np.float32))
    (square,) = GrowMask().expand_mask(dot(), 2, tapered_corners=False)
    assert np.array_equal(square[0].numpy(), ((abs(rows - 4) <= 2) & (abs(cols - 4) <= 2)).astype(np.float32))


@pytest.mark.parametrize("expand", [3, -2])
@pytest.mark.parametrize("tapered", [True, False])
def test_grow_matches_repeated_scipy_grey_morphology(expand, tapered):
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 11, 13, generator=generator)
    corner = 0 if tapered else 1
    footprint = np.array([[corner, 1, corner], [1, 1, 1], [corner, 1, corner]], dtype=bool)
    (ours,) = GrowMask().expand_mask(mask, expand, tapered)
    for index in range(2):
        expected = mask[index].numpy()
        for _ in range(abs(expand)):
            step = scipy.ndimage.grey_dilation if expand > 0 else scipy.ndimage.grey_erosion
            expected = step(expected, footprint=footprint)
        np.testing.assert_allclose(ours[index].numpy(), expected, rtol=0, atol=0)


def test_grow_zero_is_identity_and_a_bare_mask_is_batched():
    mask = torch.rand(5, 6)
    (out,) = GrowMask().expand_mask(mask, 0, True)
    assert out.shape == (1, 5, 6) and torch.equal(out[0], mask)


# -- feather, threshold, crop, colour ---------------------------------------------------------------------

def test_feather_ramps_each_edge():
    mask = torch.ones(1, 6, 8)
    (left,) = FeatherMask().feather(mask, left=4, top=0, right=0, bottom=0)
    assert torch.allclose(left[0, 0], torch.tensor([0.25, 0.5, 0.75, 1, 1, 1, 1, 1]))
    (right,) = FeatherMask().feather(mask, left=0, top=0, right=2, bottom=0)
    assert torch.allclose(right[0, 3], torch.tensor([1, 1, 1, 1, 1, 1, 1, 0.5]))
    (both,) = FeatherMask().feather(mask, left=0, top=3, right=0, bottom=3)
    assert torch.allclose(both[0, :, 0], torch.tensor([1 / 3, 2 / 3, 1, 1, 2 / 3, 1 / 3]))
    (corner,) = FeatherMask().feather(mask, left=2, top=2, right=0, bottom=0)
    assert corner[0, 0, 0] == pytest.approx(0.25)  # the two ramps multiply
    (clamped,) = FeatherMask().feather(mask, left=100, top=0, right=0, bottom=0)
    assert torch.allclose(clamped[0, 0], torch.arange(1, 9) / 8)
    assert torch.equal(mask, torch.ones(1, 6, 8))  # the input is left alone


def test_threshold():
    (out,) = ThresholdMask().image_to_mask(torch.tensor([[[0.2, 0.5, 0.51, 0.9]]]), 0.5)
    assert out.tolist() == [[[0.0, 0.0, 1.0, 1.0]]]


def test_crop_mask_and_its_bad_corner():
    mask = torch.arange(30, dtype=torch.float32).reshape(1, 5, 6)
    (out,) = CropMask().crop(mask, x=2, y=1, width=3, height=10)
    assert torch.equal(out, mask[:, 1:, 2:5])
    with pytest.raises(ValueError, match="outside"):
        CropMask().crop(mask, x=6, y=0, width=1, height=1)


def test_image_colour_to_mask_matches_exact_8_bit_colours():
    image = torch.zeros(1, 2, 2, 3)
    image[0, 0, 0] = torch.tensor([1.0, 128 / 255, 0.0])
    image[0, 1, 1] = torch.tensor([1.0, 129 / 255, 0.0])
    (out,) = ImageColorToMask().image_to_mask(image, 0xFF8000)
    assert out.tolist() == [[[1.0, 0.0], [0.0, 0.0]]]


# -- composite --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("operation, row", [
    ("multiply", [0.5, 0.0]),
    ("add", [1.0, 0.9]),        # 1.5 clamps to 1
    ("subtract", [0.5, 0.0]),   # -0.9 clamps to 0
    ("and", [0.0, 0.0]),        # logic on rounded masks: 0.5 rounds to 0 (half to even)
    ("or", [1.0, 1.0]),
    ("xor", [1.0, 1.0]),
])
def test_mask_composite_operations_on_the_overlap(operation, row):
    destination = torch.tensor([[[0.5, 0.4], [1.0, 0.0]]])
    source = torch.tensor([[[0.5, 0.9]]])  # one row, pasted at y=1
    (out,) = MaskComposite().combine(destination, source, 0, 1, operation)
    assert torch.equal(out[0, 0], destination[0, 0])  # outside the source: unchanged
    assert out[0, 1].tolist() == pytest.approx(row)


def test_mask_composite_clips_at_the_edge_and_ignores_a_source_outside():
    destination = torch.zeros(1, 3, 3)
    (out,) = MaskComposite().combine(destination, torch.ones(1, 3, 3), 2, 1, "add")
    expected = torch.zeros(1, 3, 3)
    expected[0, 1:, 2] = 1.0
    assert torch.equal(out, expected)
    (outside,) = MaskComposite().combine(destination, torch.ones(1, 3, 3), 5, 0, "add")
    assert torch.equal(outside, destination)
    with pytest.raises(ValueError, match="unknown operation"):
        MaskComposite().combine(destination, destination, 0, 0, "divide")


# -- Porter-Duff, split and join --------------------------------------------------------------------------

def _pd(mode, src_colour, src_alpha, dst_colour, dst_alpha):
    """One pixel through the node; alphas given as alpha (the node takes masks, 1 - alpha)."""
    source = torch.tensor(src_colour, dtype=torch.float32).view(1, 1, 1, 3)
    destination = torch.tensor(dst_colour, dtype=torch.float32).view(1, 1, 1, 3)
    image, mask = PorterDuffImageComposite().composite(source, torch.tensor([[[1 - src_alpha]]]), destination,
                                                       torch.tensor([[[1 - dst_alpha]]]), mode)
    return image[0, 0, 0].tolist(), 1 - mask[0, 0, 0].item()


@pytest.mark.parametrize("mode, colour, alpha", [
    # source red at alpha 0.5 over/with destination blue at alpha 0.8, worked out on paper (premultiplied):
    # src = (0.5, 0, 0), dst = (0, 0, 0.8)
    ("SRC", [1, 0, 0], 0.5),
    ("DST", [0, 0, 1], 0.8),
    ("CLEAR", [0, 0, 0], 0.0),
    ("SRC_OVER", [0.5 / 0.9, 0, 0.4 / 0.9], 0.9),        # a = 0.5 + 0.5 * 0.8
    ("DST_OVER", [0.1 / 0.9, 0, 0.8 / 0.9], 0.9),        # c = dst + 0.2 * src
    ("SRC_IN", [1, 0, 0], 0.4),                          # c = 0.8 * src
    ("DST_IN", [0, 0, 1], 0.4),
    ("SRC_OUT", [1, 0, 0], 0.1),                         # a = 0.2 * 0.5
    ("DST_OUT", [0, 0, 1], 0.4),                         # a = 0.5 * 0.8
    ("SRC_ATOP", [0.4 / 0.8, 0, 0.4 / 0.8], 0.8),        # c = 0.8 * src + 0.5 * dst
    ("DST_ATOP", [0.1 / 0.5, 0, 0.4 / 0.5], 0.5),        # c = 0.2 * src + 0.5 * dst
    ("XOR", [0.1 / 0.5, 0, 0.4 / 0.5], 0.5),             # a = 0.2 * 0.5 + 0.5 * 0.8
    ("ADD", [0.5, 0, 0.8], 1.0),                         # c = (0.5, 0, 0.8), a = min(1.3, 1)
    ("MULTIPLY", [0, 0, 0], 0.4),
    ("SCREEN", [0.5 / 0.9, 0, 0.8 / 0.9], 0.9),
])
def test_porter_duff_modes_on_a_hand_made_pixel(mode, colour, alpha):
    got_colour, got_alpha = _pd(mode, [1, 0, 0], 0.5, [0, 0, 1], 0.8)
    assert got_alpha == pytest.approx(alpha, abs=1e-6)
    assert got_colour == pytest.approx(colour, abs=1e-6)


def test_porter_duff_darken_lighten_overlay_by_hand():
    # grey 0.6 at alpha 1 against grey 0.3 at alpha 1: darken keeps 0.3, lighten 0.6, overlay 2*s*d (2d < 1).
    assert _pd("DARKEN", [0.6] * 3, 1.0, [0.3] * 3, 1.0)[0] == pytest.approx([0.3] * 3)
    assert _pd("LIGHTEN", [0.6] * 3, 1.0, [0.3] * 3, 1.0)[0] == pytest.approx([0.6] * 3)
    assert _pd("OVERLAY", [0.6] * 3, 1.0, [0.3] * 3, 1.0)[0] == pytest.approx([0.36] * 3)
    assert _pd("OVERLAY", [0.6] * 3, 1.0, [0.7] * 3, 1.0)[0] == pytest.approx([1 - 2 * 0.4 * 0.3] * 3)


def test_porter_duff_fits_sizes_and_checks_channels():
    source, destination = torch.rand(2, 4, 4, 3), torch.rand(2, 8, 6, 3)
    image, mask = PorterDuffImageComposite().composite(source, torch.zeros(1, 2, 2), destination,
                                                       torch.zeros(2, 8, 6), "SRC_OVER")
    assert image.shape == (1, 8, 6, 3) and mask.shape == (1, 8, 6)  # shortest batch of the four
    assert torch.allclose(mask, torch.zeros(1, 8, 6))
    with pytest.raises(ValueError, match="channels"):
        PorterDuffImageComposite().composite(torch.rand(1, 2, 2, 4), torch.zeros(1, 2, 2), torch.rand(1, 2, 2, 3),
                                             torch.zeros(1, 2, 2), "SRC")
    with pytest.raises(ValueError, match="unknown mode"):
        PorterDuffImageComposite().composite(source, torch.zeros(1, 2, 2), destination, torch.zeros(2, 8, 6), "X")
    assert PorterDuffImageComposite.INPUT_TYPES()["required"]["mode"][1]["options"] == PORTER_DUFF_MODES


def test_split_and_join_alpha_round_trip():
    rgba = torch.rand(2, 3, 4, 4)
    rgb, mask = SplitImageWithAlpha().split(rgba)
    assert torch.equal(rgb, rgba[..., :3]) and torch.allclose(mask, 1 - rgba[..., 3])
    (joined,) = JoinImageWithAlpha().join(rgb, mask)
    assert torch.allclose(joined, rgba, atol=1e-6)
    _, opaque = SplitImageWithAlpha().split(rgb)
    assert torch.equal(opaque, torch.zeros(2, 3, 4))
    # A smaller single mask is resized (bilinear) and repeated over the batch.
    (stretched,) = JoinImageWithAlpha().join(rgb, torch.full((1, 1, 1), 0.25))
    assert stretched.shape == (2, 3, 4, 4) and torch.allclose(stretched[..., 3], torch.full((2, 3, 4), 0.75))


def test_mask_preview_writes_a_grey_png_to_temp(tmp_path):
    with server_context(base_directory=str(tmp_path)) as server:
        result = MaskPreview().execute(torch.tensor([[[0.0, 1.0]]]))
        [entry] = result["ui"]["images"]
        assert entry["type"] == "temp"
        with Image.open(os.path.join(server.folders.temp, entry["filename"])) as png:
            assert np.array(png.convert("RGB")).tolist() == [[[0, 0, 0], [255, 255, 255]]]
