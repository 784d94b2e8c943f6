"""GLIGEN network: Fourier box features, the position net, gated self-attention against hand-written math, file
loading, and the fusers driving a real tiny SD 1.5 UNet through the "middle_patch" hook."""

from __future__ import annotations

import math

import pytest
import torch

from comfy_serverless.models.random_checkpoints import tiny_unet_config
from comfy_serverless.models.random_gligen import random_gligen_weights, transformer_block_names
from comfy_serverless.networks.build import random_state_dict
from comfy_serverless.networks.gligen import (
    GatedSelfAttention,
    PositionNet,
    fourier_box_features,
    gligen_from_state_dict,
)
from comfy_serverless.networks.unet import UNetModel


def test_fourier_features_by_hand():
    box = torch.tensor([0.1, 0.2, 0.7, 0.9])
    features = fourier_box_features(box)
    assert features.shape == (64,)
    for i in range(8):
        f = 100.0 ** (i / 8)
        for c in range(4):
            assert features[i * 8 + c].item() == pytest.approx(math.sin(f * box[c].item()), abs=1e-5)
            assert features[i * 8 + 4 + c].item() == pytest.approx(math.cos(f * box[c].item()), abs=1e-5)


def _reference_gated_attention(w: dict, x: torch.Tensor, objs: torch.Tensor, heads: int) -> torch.Tensor:
    """GLIGEN's gated self-attention written out with plain tensor operations."""
    def layer_norm(t, prefix):
        mean = t.mean(-1, keepdim=True)
        var = t.var(-1, unbiased=False, keepdim=True)
        return (t - mean) / torch.sqrt(var + 1e-5) * w[prefix + ".weight"] + w[prefix + ".bias"]

    objs = objs @ w["linear.weight"].T + w["linear.bias"]
    tokens = layer_norm(torch.cat([x, objs], 1), "norm1")
    q, k, v = (tokens @ w[f"attn.to_{n}.weight"].T for n in "qkv")
    b, t, d = q.shape
    dh = d // heads
    q, k, v = (m.reshape(b, t, heads, dh).permute(0, 2, 1, 3) for m in (q, k, v))
    scores = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1)
    attended = (scores @ v).permute(0, 2, 1, 3).reshape(b, t, d)
    attended = attended @ w["attn.to_out.0.weight"].T + w["attn.to_out.0.bias"]
    x = x + math.tanh(w["alpha_attn"].item()) * attended[:, :x.shape[1]]
    h = layer_norm(x, "norm2") @ w["ff.net.0.proj.weight"].T + w["ff.net.0.proj.bias"]
    value, gate = h.chunk(2, dim=-1)
    h = (value * torch.nn.functional.gelu(gate)) @ w["ff.net.2.weight"].T + w["ff.net.2.bias"]
    return x + math.tanh(w["alpha_dense"].item()) * h


@pytest.mark.parametrize("heads", [1, 4])
def test_gated_self_attention_matches_the_math(heads):
    torch.manual_seed(0)
    weights = random_state_dict(lambda: GatedSelfAttention(16, 12, heads, 16 // heads), std=0.3, affine_std=0.1)
    weights["alpha_attn"] = torch.tensor(0.7)
    weights["alpha_dense"] = torch.tensor(-0.4)
    module = GatedSelfAttention(16, 12, heads, 16 // heads)
    module.load_state_dict(weights)
    x, objs = torch.randn(2, 9, 16), torch.randn(2, 5, 12)
    with torch.no_grad():
        ours = module(x, objs)
    torch.testing.assert_close(ours, _reference_gated_attention(weights, x, objs, heads), atol=1e-5, rtol=1e-5)


def test_position_net_uses_null_features_for_empty_slots():
    net = PositionNet(6, 5, hidden=8)
    with torch.no_grad():
        net.null_positive_feature.normal_()
        net.null_position_feature.normal_()
    boxes = torch.rand(1, 3, 4)
    embeddings = torch.randn(1, 3, 6)
    masks = torch.tensor([[1.0, 0.0, 0.0]])
    with torch.no_grad():
        out = net(boxes, masks, embeddings)
        expected_empty = net.linears(torch.cat([net.null_positive_feature, net.null_position_feature])[None])
        expected_used = net.linears(torch.cat([embeddings[0, 0], fourier_box_features(boxes[0, 0])])[None])
    torch.testing.assert_close(out[0, 1:], expected_empty.expand(2, -1))
    torch.testing.assert_close(out[0, 0], expected_used[0])


def test_loading_finds_one_fuser_per_transformer_block_in_order():
    weights = random_gligen_weights()
    gligen = gligen_from_state_dict(weights)
    names = transformer_block_names()
    assert len(gligen.module_list) == len(names) == 7
    for fuser, (name, width) in zip(gligen.module_list, names):
        torch.testing.assert_close(fuser.linear.weight, weights[f"{name}.fuser.linear.weight"])
        assert fuser.linear.out_features == width


def test_bad_files_give_clear_errors():
    weights = random_gligen_weights()
    with pytest.raises(ValueError, match="position_net"):
        gligen_from_state_dict({k: v for k, v in weights.items() if not k.startswith("position_net.")})
    with pytest.raises(ValueError, match="fuser"):
        gligen_from_state_dict({k: v for k, v in weights.items() if ".fuser." not in k})
    broken = {k: v for k, v in weights.items() if not k.endswith("fuser.attn.to_q.weight")}
    with pytest.raises(ValueError, match="lacks"):
        gligen_from_state_dict(broken)


@pytest.fixture(scope="module")
def unet():
    config = tiny_unet_config("sd15")
    model = UNetModel(config)
    model.load_state_dict(random_state_dict(lambda: UNetModel(config), generator=torch.Generator().manual_seed(1),
                                            std=0.1, affine_std=0.1))
    return model.eval()


def _run(unet, patch=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, 5, 32, generator=generator)
    options = {"patches": {"middle_patch": [patch]}} if patch is not None else {}
    with torch.no_grad():
        return unet(x, torch.tensor([500.0, 500.0]), context, transformer_options=options)


def _box(text_seed, h, w, y, x):
    return (torch.randn(1, 32, generator=torch.Generator().manual_seed(text_seed)), h, w, y, x)


def test_boxes_change_the_unet_output_and_closed_gates_do_not(unet):
    plain = _run(unet)
    weights = random_gligen_weights()
    gligen = gligen_from_state_dict(weights)
    shape = (2, 4, 16, 16)
    left = _run(unet, gligen.set_position(shape, [_box(0, 8, 8, 0, 0)]))
    right = _run(unet, gligen.set_position(shape, [_box(0, 8, 8, 8, 8)]))
    other_text = _run(unet, gligen.set_position(shape, [_box(5, 8, 8, 0, 0)]))
    assert (left - plain).abs().max() > 1e-3
    assert (left - right).abs().max() > 1e-4
    assert (left - other_text).abs().max() > 1e-4
    closed = {k: (torch.zeros(()) if k.endswith(("alpha_attn", "alpha_dense")) else v) for k, v in weights.items()}
    shut = gligen_from_state_dict(closed)
    torch.testing.assert_close(_run(unet, shut.set_position(shape, [_box(0, 8, 8, 0, 0)])), plain)


def test_patch_is_called_per_transformer_block_with_its_index(unet):
    gligen = gligen_from_state_dict(random_gligen_weights())
    inner = gligen.set_empty((2, 4, 16, 16))
    seen = []

    def recording(x, extra):
        seen.append((extra["transformer_index"], x.shape[-1]))
        return inner(x, extra)

    _run(unet, recording)
    assert [index for index, _ in seen] == list(range(7))
    assert [width for _, width in seen] == [width for _, width in transformer_block_names()]


def test_too_many_boxes_is_an_error():
    gligen = gligen_from_state_dict(random_gligen_weights())
    with pytest.raises(ValueError, match="at most 30"):
        gligen.set_position((1, 4, 8, 8), [_box(0, 1, 1, 0, 0)] * 31)
