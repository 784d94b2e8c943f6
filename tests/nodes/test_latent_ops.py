"""Latent arithmetic, batch and operation nodes (nodes/latent_ops.py) called directly, checked against
hand-computed tensors and independent references (scipy's convolution for sharpen)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from comfy_serverless.nodes import latent_ops
from comfy_serverless.nodes.latent_ops import (
    LatentAdd,
    LatentApplyOperation,
    LatentBatch,
    LatentBatchSeedBehavior,
    LatentCompositeMasked,
    LatentConcat,
    LatentCut,
    LatentInterpolate,
    LatentMultiply,
    LatentOperationSharpen,
    LatentOperationTonemapReinhard,
    LatentSubtract,
    RebatchLatents,
)


def ramp(batch=1, channels=4, height=3, width=5, start=0.0):
    count = batch * channels * height * width
    return (torch.arange(count, dtype=torch.float32) + start).reshape(batch, channels, height, width)


def test_definitions():
    assert LatentAdd.CATEGORY == "latent/advanced" and LatentBatch.CATEGORY == "latent/batch"
    assert RebatchLatents.INPUT_IS_LIST is True and RebatchLatents.OUTPUT_IS_LIST == (True,)
    assert LatentOperationSharpen.RETURN_TYPES == ("LATENT_OPERATION",)
    assert all(cls.EXPERIMENTAL for cls in (LatentOperationSharpen, LatentOperationTonemapReinhard,
                                            LatentApplyOperation))
    assert latent_ops.NODE_DISPLAY_NAME_MAPPINGS["LatentAdd"] is None
    assert latent_ops.NODE_DISPLAY_NAME_MAPPINGS["RebatchLatents"] == "Rebatch Latents"
    assert "LatentCompositeMasked" not in latent_ops.NODE_DISPLAY_NAME_MAPPINGS  # shows its class name


# -- arithmetic ----------------------------------------------------------------------------------------

def test_add_subtract_multiply_by_hand():
    first = {"samples": torch.tensor([[[[1.0, 2.0]]]]), "noise_mask": torch.ones(1, 1, 8, 16), "batch_index": [3]}
    second = {"samples": torch.tensor([[[[10.0, -4.0]]]])}
    (added,) = LatentAdd().op(first, second)
    assert torch.equal(added["samples"], torch.tensor([[[[11.0, -2.0]]]]))
    assert added["batch_index"] == [3] and added["noise_mask"] is first["noise_mask"]  # samples1's keys kept
    (subtracted,) = LatentSubtract().op(first, second)
    assert torch.equal(subtracted["samples"], torch.tensor([[[[-9.0, 6.0]]]]))
    (scaled,) = LatentMultiply().op(first, -2.5)
    assert torch.equal(scaled["samples"], torch.tensor([[[[-2.5, -5.0]]]]))
    assert "samples" in first and torch.equal(first["samples"], torch.tensor([[[[1.0, 2.0]]]]))  # input untouched


def test_add_cycles_the_second_batch_and_resizes_it():
    first = {"samples": torch.zeros(3, 4, 4, 4)}
    second = {"samples": torch.stack([torch.full((4, 2, 2), 1.0), torch.full((4, 2, 2), 2.0)])}
    (out,) = LatentAdd().op(first, second)
    # 2x2 constant planes resized bilinearly stay constant; items cycle 1, 2, 1.
    assert out["samples"].shape == (3, 4, 4, 4)
    assert [float(v) for v in out["samples"][:, 0, 0, 0]] == [1.0, 2.0, 1.0]
    assert torch.equal(out["samples"][2], torch.ones(4, 4, 4))


def test_arithmetic_refuses_other_channel_counts():
    with pytest.raises(ValueError, match="4 channels cannot be combined with one of 16"):
        LatentAdd().op({"samples": torch.zeros(1, 16, 2, 2)}, {"samples": torch.zeros(1, 4, 2, 2)})


def test_interpolate_mixes_directions_and_lengths():
    """Per cell: unit vectors mixed by ratio and renormalised, length ratio*|a| + (1-ratio)*|b|."""
    torch.manual_seed(0)
    a, b = torch.randn(1, 4, 2, 3), torch.randn(1, 4, 2, 3)
    ratio = 0.3
    (out,) = LatentInterpolate().op({"samples": a}, {"samples": b}, ratio)
    for y in range(2):
        for x in range(3):
            va, vb = a[0, :, y, x].double().numpy(), b[0, :, y, x].double().numpy()
            mixed = ratio * va / np.linalg.norm(va) + (1 - ratio) * vb / np.linalg.norm(vb)
            expected = mixed / np.linalg.norm(mixed) * (ratio * np.linalg.norm(va) + (1 - ratio) * np.linalg.norm(vb))
            assert np.allclose(out["samples"][0, :, y, x].numpy(), expected, atol=1e-5)


def test_interpolate_end_points_batches_and_opposite_vectors():
    torch.manual_seed(1)
    a, b = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    assert torch.allclose(LatentInterpolate().op({"samples": a}, {"samples": b}, 1.0)[0]["samples"], a, atol=1e-5)
    assert torch.allclose(LatentInterpolate().op({"samples": a}, {"samples": b}, 0.0)[0]["samples"], b, atol=1e-5)
    # Opposite directions cancel at 0.5: no direction is left, the result is 0, not NaN.
    (out,) = LatentInterpolate().op({"samples": a}, {"samples": -2 * a}, 0.5)
    assert torch.equal(out["samples"], torch.zeros_like(a))


# -- concat and cut -------------------------------------------------------------------------------------

def test_concat_along_each_axis_and_order():
    first, second = {"samples": ramp(height=2, width=3)}, {"samples": ramp(height=2, width=3, start=100)}
    (x,) = LatentConcat().op(first, second, "x")
    assert x["samples"].shape == (1, 4, 2, 6)
    assert torch.equal(x["samples"][..., :3], first["samples"])
    assert torch.equal(x["samples"][..., 3:], second["samples"])
    (minus_y,) = LatentConcat().op(first, second, "-y")
    assert minus_y["samples"].shape == (1, 4, 4, 3) and torch.equal(minus_y["samples"][:, :, :2], second["samples"])
    (t,) = LatentConcat().op({"samples": torch.zeros(1, 4, 2, 2, 2)}, {"samples": torch.ones(1, 4, 3, 2, 2)}, "t")
    assert t["samples"].shape == (1, 4, 5, 2, 2) and float(t["samples"][0, 0, 2:].min()) == 1.0


def test_concat_cycles_batches_and_reports_bad_input():
    (out,) = LatentConcat().op({"samples": torch.zeros(3, 4, 2, 2)}, {"samples": torch.ones(1, 4, 2, 2)}, "x")
    assert out["samples"].shape == (3, 4, 2, 4)
    with pytest.raises(ValueError, match="other axes must match"):
        LatentConcat().op({"samples": torch.zeros(1, 4, 2, 2)}, {"samples": torch.ones(1, 4, 3, 2)}, "x")
    with pytest.raises(ValueError, match="dim must be one of"):
        LatentConcat().op({"samples": torch.zeros(1, 4, 2, 2)}, {"samples": torch.ones(1, 4, 2, 2)}, "z")


@pytest.mark.parametrize("dim,index,amount,expected", [
    ("x", 1, 2, slice(1, 3)),
    ("x", 4, 9, slice(4, 5)),  # amount clamped to what is left
    ("x", 99, 2, slice(4, 5)),  # start clamped to the last cell
    ("x", -2, 5, slice(3, 5)),  # negative: counted from the end, at most to the end
    ("x", -99, 2, slice(0, 2)),
    ("y", 1, 1, slice(1, 2)),
])
def test_cut_slices_like_comfyui(dim, index, amount, expected):
    latent = ramp(height=3, width=5)
    (out,) = LatentCut().op({"samples": latent, "batch_index": [7]}, dim, index, amount)
    want = latent[..., expected] if dim == "x" else latent[:, :, expected, :]
    assert torch.equal(out["samples"], want) and out["batch_index"] == [7]


def test_cut_frames_of_a_video_latent_and_bad_dim():
    video = torch.arange(2 * 6).float().reshape(1, 2, 6, 1, 1)
    (out,) = LatentCut().op({"samples": video}, "t", 2, 3)
    assert torch.equal(out["samples"], video[:, :, 2:5])
    with pytest.raises(ValueError, match="dim must be one of x, y, t"):
        LatentCut().op({"samples": video}, "-x", 0, 1)


# -- batches --------------------------------------------------------------------------------------------

def test_seed_behavior():
    latent = {"samples": torch.zeros(3, 4, 2, 2), "batch_index": [5, 6, 7]}
    (fixed,) = LatentBatchSeedBehavior().op(latent, "fixed")
    assert fixed["batch_index"] == [5, 5, 5] and latent["batch_index"] == [5, 6, 7]
    (plain_fixed,) = LatentBatchSeedBehavior().op({"samples": torch.zeros(2, 4, 2, 2)}, "fixed")
    assert plain_fixed["batch_index"] == [0, 0]
    (random,) = LatentBatchSeedBehavior().op(latent, "random")
    assert "batch_index" not in random
    with pytest.raises(ValueError, match="seed_behavior"):
        LatentBatchSeedBehavior().op(latent, "sometimes")


def test_latent_batch_joins_resizes_and_numbers_items():
    mask = torch.zeros(1, 1, 16, 16)
    first = {"samples": torch.zeros(2, 4, 2, 2), "noise_mask": mask, "batch_index": [4, 9]}
    second = {"samples": torch.ones(3, 4, 4, 4)}
    (out,) = LatentBatch().op(first, second)
    assert out["samples"].shape == (5, 4, 2, 2) and float(out["samples"][2:].min()) == 1.0
    assert out["batch_index"] == [4, 9, 0, 1, 2]
    assert out["noise_mask"] is mask  # samples1's mask, as ComfyUI
    (plain,) = LatentBatch().op({"samples": torch.zeros(1, 4, 2, 2)}, {"samples": torch.zeros(1, 4, 2, 2)})
    assert plain["batch_index"] == [0, 0]


def test_rebatch_regroups_in_order_with_indices_and_masks():
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8] = 1.0
    latents = [
        {"samples": ramp(batch=3, height=2, width=2), "noise_mask": mask},
        {"samples": ramp(batch=2, height=2, width=2, start=1000)},
        {"samples": ramp(batch=1, height=3, width=3), "batch_index": [42]},
    ]
    (out,) = RebatchLatents().rebatch(latents, [2])
    assert [tuple(o["samples"].shape) for o in out] == [(2, 4, 2, 2), (2, 4, 2, 2), (1, 4, 2, 2), (1, 4, 3, 3)]
    assert [o["batch_index"] for o in out] == [[0, 1], [2, 3], [4], [42]]
    joined = torch.cat([o["samples"] for o in out[:3]])
    assert torch.equal(joined, torch.cat([latents[0]["samples"], latents[1]["samples"]]))
    # The first input's mask is repeated to its 3 items; the second input's items get ones; all-ones batches
    # lose the key.
    assert torch.equal(out[0]["noise_mask"], mask.repeat(2, 1, 1, 1))
    assert torch.equal(out[1]["noise_mask"][0], mask[0]) and float(out[1]["noise_mask"][1].min()) == 1.0
    assert "noise_mask" not in out[2] and "noise_mask" not in out[3]


def test_rebatch_resizes_latent_resolution_masks_to_pixels():
    latents = [{"samples": torch.zeros(1, 4, 2, 2), "noise_mask": torch.zeros(1, 1, 2, 2)},
               {"samples": torch.zeros(1, 4, 2, 2), "noise_mask": torch.zeros(1, 16, 16)}]
    (out,) = RebatchLatents().rebatch(latents, [4])
    assert len(out) == 1 and out[0]["noise_mask"].shape == (2, 1, 16, 16)


# -- compositing ------------------------------------------------------------------------------------------

def test_composite_masked_pastes_in_latent_cells():
    destination = {"samples": torch.zeros(1, 4, 4, 6), "batch_index": [1]}
    source = {"samples": torch.ones(1, 4, 2, 2)}
    (out,) = LatentCompositeMasked().composite(destination, source, x=8, y=16, resize_source=False)
    expected = torch.zeros(1, 4, 4, 6)
    expected[:, :, 2:4, 1:3] = 1.0
    assert torch.equal(out["samples"], expected) and out["batch_index"] == [1]
    assert float(destination["samples"].abs().max()) == 0.0  # the input is not modified
    # Near the far edge only the part that fits is pasted.
    (edge,) = LatentCompositeMasked().composite(destination, source, x=40, y=24, resize_source=False)
    assert float(edge["samples"].sum()) == 4.0 and float(edge["samples"][0, 0, 3, 5]) == 1.0


def test_composite_masked_with_mask_and_resize():
    destination = {"samples": torch.zeros(2, 4, 2, 2)}
    source = {"samples": torch.full((1, 4, 1, 1), 4.0)}
    mask = torch.tensor([[[0.5, 0.5], [0.5, 0.5]]])  # resized to the source's 1 x 1 cell
    (half,) = LatentCompositeMasked().composite(destination, source, 0, 0, False, mask)
    assert torch.allclose(half["samples"][:, :, 0, 0], torch.full((2, 4), 2.0))
    assert float(half["samples"][:, :, 1:, :].abs().max()) == 0.0
    (resized,) = LatentCompositeMasked().composite(destination, source, 0, 0, True)
    assert torch.equal(resized["samples"], torch.full((2, 4, 2, 2), 4.0))
    with pytest.raises(ValueError, match="channels"):
        LatentCompositeMasked().composite(destination, {"samples": torch.zeros(1, 16, 1, 1)}, 0, 0, False)


# -- operations -----------------------------------------------------------------------------------------

def _gaussian(size, sigma):
    axis = np.linspace(-1, 1, size)
    ys, xs = np.meshgrid(axis, axis, indexing="ij")
    weights = np.exp(-(xs ** 2 + ys ** 2) / (2 * sigma ** 2))
    return weights / weights.sum()


def test_sharpen_matches_a_scipy_unsharp_mask_on_directions():
    torch.manual_seed(2)
    latent = torch.randn(2, 4, 7, 9)
    radius, sigma, alpha = 2, 0.8, 0.4
    (operation,) = LatentOperationSharpen().op(radius, sigma, alpha)
    (out,) = LatentApplyOperation().op({"samples": latent, "batch_index": [0, 1]}, operation)
    kernel = _gaussian(2 * radius + 1, sigma) * (-10 * alpha)
    kernel[radius, radius] += 1.0 - kernel.sum()
    values = latent.double().numpy()
    length = np.linalg.norm(values, axis=1, keepdims=True) + 1e-6
    unit = values / length
    expected = np.empty_like(values)
    for b in range(2):
        for c in range(4):  # torch's "reflect" padding is scipy's "mirror"; the kernel is symmetric
            expected[b, c] = ndimage.correlate(unit[b, c], kernel, mode="mirror")
    assert np.allclose(out["samples"].numpy(), expected * length, atol=1e-4)
    assert out["batch_index"] == [0, 1]


def test_sharpen_leaves_flat_latents_and_alpha_zero_alone():
    flat = torch.tensor([1.0, -2.0, 0.5, 3.0]).reshape(1, 4, 1, 1).expand(1, 4, 5, 5).contiguous()
    (operation,) = LatentOperationSharpen().op(2, 1.0, 2.0)
    assert torch.allclose(operation(latent=flat), flat, atol=1e-5)
    torch.manual_seed(3)
    noisy = torch.randn(1, 4, 6, 6)
    (identity,) = LatentOperationSharpen().op(3, 1.0, 0.0)
    assert torch.allclose(identity(latent=noisy), noisy, atol=1e-5)


def test_sharpen_radius_too_large_is_a_clear_error():
    (operation,) = LatentOperationSharpen().op(9, 1.0, 0.1)
    with pytest.raises(ValueError, match="sharpen_radius 9"):
        operation(latent=torch.zeros(1, 4, 8, 8))


def test_tonemap_reinhard_by_hand():
    latent = torch.zeros(1, 4, 1, 3)
    latent[0, 0, 0] = torch.tensor([1.0, 2.0, 6.0])  # lengths 1, 2, 6 along channel 0
    latent[0, 1, 0, 2] = 8.0  # the third cell: (6, 8) has length 10
    lengths = [1.0, 2.0, 10.0]
    mean = sum(lengths) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in lengths) / 2)  # torch.std: unbiased
    multiplier = 0.5
    white = (5 * std + mean) * multiplier
    (operation,) = LatentOperationTonemapReinhard().op(multiplier)
    (out,) = LatentApplyOperation().op({"samples": latent}, operation)
    new = [v * white / (v + white) for v in lengths]
    assert torch.allclose(out["samples"][0, 0, 0], torch.tensor([new[0], new[1], new[2] * 0.6]), atol=1e-5)
    assert torch.allclose(out["samples"][0, 1, 0], torch.tensor([0.0, 0.0, new[2] * 0.8]), atol=1e-5)
    (zero,) = LatentOperationTonemapReinhard().op(0.0)
    assert torch.equal(zero(latent=latent), torch.zeros_like(latent))


def test_tonemap_keeps_directions_and_compresses_lengths():
    torch.manual_seed(4)
    latent = torch.randn(2, 4, 5, 5) * torch.tensor([1.0, 4.0]).reshape(2, 1, 1, 1)
    (operation,) = LatentOperationTonemapReinhard().op(1.0)
    out = operation(latent=latent)
    before, after = latent.norm(dim=1), out.norm(dim=1)
    assert bool((after < before).all())
    assert torch.allclose(F.normalize(out, dim=1), F.normalize(latent, dim=1), atol=1e-5)
    # The white point follows each item's own lengths: scaling a latent scales the result by the same factor.
    assert torch.allclose(operation(latent=latent * 4.0), out * 4.0, atol=1e-5)
    assert torch.allclose(operation(latent=latent[1:]), out[1:], atol=1e-6)  # items do not affect each other


# -- through the server ----------------------------------------------------------------------------------

def test_latent_workflow_over_http(start_server, tmp_path):
    from safetensors.torch import load_file, save_file

    base = tmp_path / "latent-base"
    (base / "input").mkdir(parents=True)
    source = ramp(height=2, width=3)
    save_file({"latent_tensor": source, "latent_format_version_0": torch.tensor([])}, str(base / "input/a.latent"))
    srv = start_server(packs=(), base=base)
    prompt = {
        "1": {"class_type": "LoadLatent", "inputs": {"latent": "a.latent"}},
        "2": {"class_type": "LatentMultiply", "inputs": {"samples": ["1", 0], "multiplier": 2.0}},
        "3": {"class_type": "LatentAdd", "inputs": {"samples1": ["2", 0], "samples2": ["1", 0]}},
        "4": {"class_type": "LatentConcat", "inputs": {"samples1": ["3", 0], "samples2": ["1", 0], "dim": "x"}},
        "5": {"class_type": "LatentCut", "inputs": {"samples": ["4", 0], "dim": "x", "index": -4, "amount": 2}},
        "6": {"class_type": "LatentBatch", "inputs": {"samples1": ["5", 0], "samples2": ["5", 0]}},
        "7": {"class_type": "RebatchLatents", "inputs": {"latents": ["6", 0], "batch_size": 1}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": "ops/split"}},
        "9": {"class_type": "LatentOperationTonemapReinhard", "inputs": {"multiplier": 0.0}},
        "10": {"class_type": "LatentApplyOperation", "inputs": {"samples": ["5", 0], "operation": ["9", 0]}},
        "11": {"class_type": "SaveLatent", "inputs": {"samples": ["10", 0], "filename_prefix": "ops/zero"}},
    }
    entry = srv.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    files = entry["outputs"]["8"]["latents"]
    assert len(files) == 2  # RebatchLatents gave a list of two batches, each saved
    expected = torch.cat([3 * source[..., 2:3], source[..., 0:1]], dim=-1)  # columns 2, 3 of [3a | a]
    for info in files:
        saved = load_file(base / "output" / info["subfolder"] / info["filename"])["latent_tensor"]
        assert torch.equal(saved, expected)
    [zero] = entry["outputs"]["11"]["latents"]
    zeroed = load_file(base / "output" / zero["subfolder"] / zero["filename"])["latent_tensor"]
    assert zeroed.shape == expected.shape and float(zeroed.abs().max()) == 0

    bad = {"1": prompt["1"], "4": {"class_type": "LatentConcat",
                                   "inputs": {"samples1": ["1", 0], "samples2": ["1", 0], "dim": "z"}},
           "5": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": "ops/bad"}}}
    # A V3-style COMBO is not checked against its options at validation (as in ComfyUI); the node refuses it.
    failed = srv.run(bad)["status"]
    [error] = [data for kind, data in failed["messages"] if kind == "execution_error"]
    assert error["node_type"] == "LatentConcat" and "dim must be one of x, -x" in error["exception_message"]
