"""c_concat of inpainting and instruct-pix2pix UNets (ComfyUI's concat_cond behaviour), checked by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from comfy_serverless.models.extra_inputs import BLANK_INPAINT_LATENT, SDModel, extra_unet_inputs

LATENT = torch.Size([1, 4, 8, 8])


def model(concat_kind, family="sd15", adm_channels=None):
    return SDModel(handle=None, family=family, prediction="eps", dtype=torch.float32, adm_channels=adm_channels,
                   concat_kind=concat_kind)


def concat(concat_kind, options, shape=LATENT, **sampling):
    return extra_unet_inputs(model(concat_kind), options, shape, **sampling)["c_concat"]


def test_plain_models_take_no_concat():
    assert extra_unet_inputs(model(None), {"concat_latent_image": torch.ones(1, 4, 8, 8)}, LATENT) == {}


def test_inpaint_concat_is_the_downscaled_rounded_mask_and_the_scaled_image_latent():
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(1, 4, 8, 8, generator=generator)
    mask = (torch.rand(1, 16, 16, generator=generator) > 0.5).float()  # pixel mask, twice the latent size
    got = concat("inpaint", {"concat_latent_image": image, "concat_mask": mask})
    assert got.shape == (1, 5, 8, 8)
    # Bilinear halving (no corner alignment) averages each 2 x 2 block; ComfyUI rounds the result.
    torch.testing.assert_close(got[:, :1], torch.round(F.avg_pool2d(mask[:, None], 2)))
    torch.testing.assert_close(got[:, 1:], image * 0.18215)  # process_latent_in of SD1


def test_inpaint_without_concat_takes_the_noise_mask_and_the_sampled_latent():
    latent = torch.randn(1, 4, 8, 8)
    noise_mask = torch.zeros(1, 4, 8, 8)
    noise_mask[..., 2:5] = 0.75
    got = concat("inpaint", {}, latent_image=latent, denoise_mask=noise_mask)
    torch.testing.assert_close(got[:, :1], (noise_mask[:, :1] > 0.5).float())
    torch.testing.assert_close(got[:, 1:], latent)
    with pytest.raises(ValueError, match="needs the masked image"):
        concat("inpaint", {}, denoise_mask=noise_mask)


def test_inpaint_without_any_mask_is_all_ones_and_a_blank_image():
    got = concat("inpaint", {"concat_latent_image": torch.randn(1, 4, 8, 8)}, torch.Size([2, 4, 8, 6]))
    assert got.shape == (2, 5, 8, 6)
    assert torch.equal(got[:, 0], torch.ones(2, 8, 6))
    for channel, value in enumerate(BLANK_INPAINT_LATENT):
        assert torch.equal(got[:, 1 + channel], torch.full((2, 8, 6), value))


def test_concat_inputs_are_centre_cropped_resized_and_stretched_to_the_batch():
    # 8 x 16 image onto an 8 x 8 latent: the middle 8 columns, unchanged.
    image = torch.arange(2 * 4 * 8 * 16, dtype=torch.float32).reshape(2, 4, 8, 16)
    got = concat("ip2p", {"concat_latent_image": image}, torch.Size([4, 4, 8, 8]))
    # A batch of 2 stretched to 4 is a a b b (ComfyUI's resize_to_batch_size), not a b a b.
    torch.testing.assert_close(got, image[[0, 0, 1, 1], :, :, 4:12])


def test_ip2p_concat_is_the_unscaled_image_latent_or_zeros():
    image = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(concat("ip2p", {"concat_latent_image": image}), image)
    assert torch.equal(concat("ip2p", {}), torch.zeros(LATENT))


def test_sdxl_inpaint_model_gets_y_and_c_concat():
    inputs = extra_unet_inputs(model("inpaint", "sdxl", 2816), {"pooled_output": torch.zeros(1, 1280)}, LATENT)
    assert inputs["y"].shape == (1, 2816) and inputs["c_concat"].shape == (1, 5, 8, 8)
