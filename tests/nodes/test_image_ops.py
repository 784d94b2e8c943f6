"""Image batch, post-processing, filter and transform nodes called directly, against scipy, torch and values
worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import torch

from comfy_serverless.nodes.image_filters import Canny, Morphology, gaussian_blur, hysteresis, sobel
from comfy_serverless.nodes.image_ops import (
    GetImageSize,
    ImageAddNoise,
    ImageBlend,
    ImageFromBatch,
    ImageQuantize,
    ImageRGBToYUV,
    ImageScaleToTotalPixels,
    ImageYUVToRGB,
    RepeatImageBatch,
)
from comfy_serverless.nodes.image_transform import (
    ImageFlip,
    ImageRotate,
    ImageScaleToMaxDimension,
    ImageStitch,
    ResizeAndPadImage,
)


def ramp_image(batch=1, height=4, width=6, channels=3):
    count = batch * height * width * channels
    return (torch.arange(count, dtype=torch.float32) / count).reshape(batch, height, width, channels)


def noise_image(batch=1, height=12, width=10, channels=3, seed=0):
    return torch.rand(batch, height, width, channels, generator=torch.Generator().manual_seed(seed))


# -- batch ------------------------------------------------------------------------------------------------

def test_image_from_batch_and_repeat():
    image = ramp_image(batch=4)
    (picked,) = ImageFromBatch().frombatch(image, batch_index=1, length=2)
    assert torch.equal(picked, image[1:3])
    (last,) = ImageFromBatch().frombatch(image, batch_index=99, length=5)
    assert torch.equal(last, image[3:])  # past the end: the last frame
    (repeated,) = RepeatImageBatch().repeat(image[:2], 3)
    assert repeated.shape[0] == 6 and torch.equal(repeated[4:], image[:2])


def test_get_image_size():
    assert GetImageSize().get_size(torch.zeros(3, 5, 7, 3)) == (7, 5, 3)


def test_add_noise_is_seeded_torch_noise_and_clamped():
    image = torch.full((1, 3, 4, 3), 0.5)
    (out,) = ImageAddNoise().repeat(image, seed=42, strength=0.25)
    torch.manual_seed(42)
    expected = (image + 0.25 * torch.randn(image.shape)).clamp(0, 1)
    assert torch.equal(out, expected)
    (again,) = ImageAddNoise().repeat(image, seed=42, strength=0.25)
    assert torch.equal(out, again)
    (zero,) = ImageAddNoise().repeat(image, seed=1, strength=0.0)
    assert torch.equal(zero, image)


def test_yuv_planes_and_round_trip():
    red = torch.tensor([1.0, 0.0, 0.0]).expand(1, 2, 2, 3)
    luma, cb, cr = ImageRGBToYUV().execute(red)
    assert luma.shape == red.shape and torch.allclose(luma, torch.full_like(red, 0.299))
    assert torch.allclose(cb, torch.full_like(red, 0.5 - 0.299 * 0.564))
    assert torch.allclose(cr, torch.full_like(red, 0.5 + 0.701 * 0.713))
    image = noise_image()
    (back,) = ImageYUVToRGB().execute(*ImageRGBToYUV().execute(image))
    assert torch.allclose(back, image, atol=2e-3)  # the published 3-digit coefficients are not exact inverses


# -- blend ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, expected", [
    ("normal", 0.8),
    ("multiply", 0.16),
    ("screen", 1 - 0.8 * 0.2),
    ("overlay", 2 * 0.2 * 0.8),                   # base 0.2 <= 0.5
    ("soft_light", 0.2 + 0.6 * (((16 * 0.2 - 12) * 0.2 + 4) * 0.2 - 0.2)),  # layer > 0.5, base <= 0.25
    ("difference", 0.0),                          # 0.2 - 0.8 clamps to 0
])
def test_blend_modes_at_full_factor(mode, expected):
    base, layer = torch.full((1, 2, 2, 3), 0.2), torch.full((1, 2, 2, 3), 0.8)
    (out,) = ImageBlend().blend_images(base, layer, 1.0, mode)
    assert torch.allclose(out, torch.full_like(base, expected), atol=1e-6)


def test_blend_factor_mixes_and_sizes_are_matched():
    base, layer = torch.full((1, 4, 4, 3), 0.2), torch.full((1, 2, 2, 4), 0.8)
    (out,) = ImageBlend().blend_images(base, layer, 0.25, "normal")
    assert out.shape == base.shape  # alpha dropped, resized to image1
    assert torch.allclose(out, torch.full_like(base, 0.75 * 0.2 + 0.25 * 0.8), atol=1e-5)
    with pytest.raises(ValueError, match="blend_mode"):
        ImageBlend().blend_images(base, base, 0.5, "dodge")


# -- quantize ---------------------------------------------------------------------------------------------

def test_quantize_two_colours_is_exact_and_dithers_use_the_palette():
    image = torch.zeros(1, 8, 8, 3)
    image[:, :, 4:] = torch.tensor([1.0, 0.0, 0.0])
    for dither in ("none", "floyd-steinberg", "bayer-2", "bayer-16"):
        (out,) = ImageQuantize().quantize(image, 2, dither)
        assert torch.equal(out, image), dither
    grey = torch.full((1, 16, 16, 3), 0.5)
    grey[:, :, :8] = 0.0
    grey[:, :, 12:] = 1.0
    (plain,) = ImageQuantize().quantize(grey, 2, "none")
    (dithered,) = ImageQuantize().quantize(grey, 2, "bayer-4")
    palette = {tuple(pixel) for pixel in plain.reshape(-1, 3).tolist()}
    assert len(palette) == 2
    assert {tuple(pixel) for pixel in dithered.reshape(-1, 3).tolist()} <= palette
    # the middle band is one colour without dithering and a mix of both with an ordered dither
    assert len({tuple(pixel) for pixel in plain[0, :, 8:12].reshape(-1, 3).tolist()}) == 1
    assert len({tuple(pixel) for pixel in dithered[0, :, 8:12].reshape(-1, 3).tolist()}) == 2
    with pytest.raises(ValueError, match="dither"):
        ImageQuantize().quantize(image, 2, "bayer-3")


# -- morphology -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [3, 5])
def test_erode_and_dilate_match_scipy(size):
    image = noise_image(batch=2, channels=3)
    (eroded,) = Morphology().process(image, "erode", size)
    (dilated,) = Morphology().process(image, "dilate", size)
    for b in range(2):
        for c in range(3):
            plane = image[b, :, :, c].numpy()
            np.testing.assert_array_equal(eroded[b, :, :, c].numpy(),
                                          scipy.ndimage.grey_erosion(plane, size=(size, size), mode="nearest"))
            np.testing.assert_array_equal(dilated[b, :, :, c].numpy(),
                                          scipy.ndimage.grey_dilation(plane, size=(size, size), mode="nearest"))


def test_even_kernel_window_and_compound_operations():
    image = noise_image(channels=1)
    plane = image[0, :, :, 0].numpy()
    (eroded,) = Morphology().process(image, "erode", 4)
    np.testing.assert_array_equal(eroded[0, :, :, 0].numpy(), scipy.ndimage.minimum_filter(plane, 4, mode="nearest"))
    erode = scipy.ndimage.grey_erosion(plane, size=(3, 3), mode="nearest")
    dilate = scipy.ndimage.grey_dilation(plane, size=(3, 3), mode="nearest")
    opened = scipy.ndimage.grey_dilation(erode, size=(3, 3), mode="nearest")
    closed = scipy.ndimage.grey_erosion(dilate, size=(3, 3), mode="nearest")
    expected = {"open": opened, "close": closed, "gradient": dilate - erode, "top_hat": plane - opened,
                "bottom_hat": closed - plane}
    for operation, want in expected.items():
        (out,) = Morphology().process(image, operation, 3)
        np.testing.assert_allclose(out[0, :, :, 0].numpy(), want, atol=1e-7, err_msg=operation)
    with pytest.raises(ValueError, match="operation"):
        Morphology().process(image, "skeleton", 3)


# -- Canny ------------------------------------------------------------------------------------------------

def square_image(size=24, low=6, high=18):
    """A white square whose one-pixel grey rim (rows/columns low-1 and high) centres each edge on a pixel."""
    image = torch.zeros(1, size, size, 3)
    image[:, low - 1:high + 1, low - 1:high + 1] = 0.5
    image[:, low:high, low:high] = 1.0
    return image


def test_sobel_and_blur_match_scipy():
    plane = noise_image(channels=1)[:, :, :, 0][:, None]
    d_dx, d_dy = sobel(plane)
    np.testing.assert_allclose(d_dx[0, 0].numpy(), scipy.ndimage.sobel(plane[0, 0].numpy(), axis=1, mode="nearest"),
                               atol=1e-5)
    np.testing.assert_allclose(d_dy[0, 0].numpy(), scipy.ndimage.sobel(plane[0, 0].numpy(), axis=0, mode="nearest"),
                               atol=1e-5)
    blurred = gaussian_blur(plane)[0, 0].numpy()
    # a 5-tap Gaussian of sigma 1 is scipy's with truncate = 2 sigma; scipy's "mirror" is torch's "reflect"
    expected = scipy.ndimage.gaussian_filter(plane[0, 0].numpy(), sigma=1.0, truncate=2.0, mode="mirror")
    np.testing.assert_allclose(blurred, expected, atol=1e-5)


def test_canny_finds_the_edges_of_a_square():
    (edges,) = Canny().detect_edge(square_image(), 0.4, 0.8)
    assert edges.shape == (1, 24, 24, 3) and torch.equal(edges[..., 0], edges[..., 2])
    found = edges[0, :, :, 0]
    assert set(found.unique().tolist()) == {0.0, 1.0}
    rows, cols = torch.nonzero(found, as_tuple=True)
    # Every edge pixel lies within one pixel of the square's outline, and the four sides are all found.
    on_outline = ((rows - 5).abs() <= 1) | ((rows - 18).abs() <= 1) | ((cols - 5).abs() <= 1) | (
        (cols - 18).abs() <= 1)
    assert bool(on_outline.all())
    assert found[2:22, 2:22].sum() > 0 and found[9:15, 9:15].sum() == 0 and found[:3].sum() == 0
    for line in (found[12, :12], found[12, 12:], found[:12, 12], found[12:, 12]):
        assert line.sum() >= 1  # a crossing through each side meets the edge
        assert line.sum() <= 2  # and the edge is thin (non-maximum suppression)


def test_canny_thresholds_and_hysteresis():
    faint = square_image() * 0.15  # thinned edge magnitudes between about 0.30 and 0.39
    (edges,) = Canny().detect_edge(faint, 0.1, 0.25)
    assert edges[0, :, :, 0].sum() == 52  # the outline of the 14 x 14 rim, corners cut diagonally
    (none,) = Canny().detect_edge(faint, 0.5, 0.6)
    assert none.sum() == 0
    (weak_only,) = Canny().detect_edge(faint, 0.1, 0.5)
    assert weak_only.sum() == 0  # weak edges with no strong one to hold on to are dropped
    with pytest.raises(ValueError, match="must not exceed"):
        Canny().detect_edge(faint, 0.8, 0.2)


def test_hysteresis_keeps_weak_pixels_connected_to_strong_ones():
    strong = torch.zeros(1, 1, 6, 8, dtype=torch.bool)
    weak = torch.zeros(1, 1, 6, 8, dtype=torch.bool)
    strong[0, 0, 0, 0] = True
    for row, col in ((1, 1), (2, 2), (2, 3), (3, 4)):  # a diagonal then straight chain from the strong pixel
        weak[0, 0, row, col] = True
    weak[0, 0, 5, 6] = weak[0, 0, 5, 7] = True  # a weak pair touching nothing strong
    edges = hysteresis(strong, weak)[0, 0]
    expected = torch.zeros(6, 8)
    for row, col in ((0, 0), (1, 1), (2, 2), (2, 3), (3, 4)):
        expected[row, col] = 1.0
    assert torch.equal(edges, expected)


# -- transforms -------------------------------------------------------------------------------------------

def test_flip_and_rotate():
    image = ramp_image(height=2, width=3)
    (upside_down,) = ImageFlip().flip(image, "x-axis: vertically")
    assert torch.equal(upside_down[0, 0], image[0, 1])
    (mirrored,) = ImageFlip().flip(image, "y-axis: horizontally")
    assert torch.equal(mirrored[0, :, 0], image[0, :, 2])
    (quarter,) = ImageRotate().rotate(image, "90 degrees")
    assert quarter.shape == (1, 3, 2, 3)
    assert torch.equal(quarter[0, 0, 1], image[0, 0, 0])  # clockwise: top-left goes to top-right
    assert torch.equal(quarter[0, 0, 0], image[0, 1, 0])
    (half,) = ImageRotate().rotate(image, "180 degrees")
    assert torch.equal(half, image.flip(1).flip(2))
    (back,) = ImageRotate().rotate(ImageRotate().rotate(image, "270 degrees")[0], "90 degrees")
    assert torch.equal(back, image)
    (same,) = ImageRotate().rotate(image, "none")
    assert torch.equal(same, image)


def test_stitch_directions_spacing_and_padding():
    left, right = torch.zeros(1, 4, 3, 3), torch.ones(1, 4, 2, 3)
    (side,) = ImageStitch().stitch(left, "right", False, 2, "red", right)
    assert side.shape == (1, 4, 7, 3)
    assert torch.equal(side[0, :, 3:5], torch.tensor([1.0, 0.0, 0.0]).expand(4, 2, 3))
    assert torch.equal(side[0, :, 5:], right[0])
    (flipped,) = ImageStitch().stitch(left, "left", False, 0, "white", right)
    assert torch.equal(flipped[0, :, :2], right[0])
    (stacked,) = ImageStitch().stitch(left, "down", False, 0, "white", torch.zeros(2, 1, 5, 4))
    assert stacked.shape == (2, 5, 5, 4)  # batch grown by repeating, width padded, alpha added
    assert torch.equal(stacked[1, :4, 1:4, 3], torch.ones(4, 3))
    assert torch.equal(stacked[0, :4, 0, :3], torch.ones(4, 3))  # white padding on the left of image1
    (matched,) = ImageStitch().stitch(left, "right", True, 0, "white", torch.ones(1, 2, 2, 3))
    assert matched.shape == (1, 4, 7, 3)  # image2 scaled to height 4, keeping its square shape
    (alone,) = ImageStitch().stitch(left, "up", True, 0, "white")
    assert alone is left


def test_resize_and_pad_centres_the_scaled_image():
    image = torch.full((1, 2, 4, 3), 0.5)
    (out,) = ResizeAndPadImage().resize_and_pad(image, 8, 8, "black", "nearest-exact")
    assert out.shape == (1, 8, 8, 3)
    assert torch.equal(out[0, 2:6], torch.full((4, 8, 3), 0.5))
    assert out[0, :2].sum() == 0 and out[0, 6:].sum() == 0


def test_scale_to_max_dimension_and_total_pixels():
    image = torch.rand(1, 20, 40, 3)
    (out,) = ImageScaleToMaxDimension().upscale(image, "bilinear", 10)
    assert out.shape == (1, 5, 10, 3)
    (tall,) = ImageScaleToMaxDimension().upscale(image.transpose(1, 2), "area", 8)
    assert tall.shape == (1, 8, 4, 3)
    (total,) = ImageScaleToTotalPixels().upscale(image, "nearest-exact", 0.01)
    # 0.01 "megapixels" = int(0.01 * 1024 * 1024) = 10485 pixels at a 2:1 aspect: 145 x 72
    assert total.shape == (1, 72, 145, 3)
    with pytest.raises(ValueError, match="empty"):
        ImageScaleToMaxDimension().upscale(image, "bilinear", 0)
