"""Cross-attention projects a sampling's constant text context once (networks/projection_memo.py): later steps
reuse the key and value while the context's values and the projection layers' weights are unchanged, and get
the same output bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from comfy_serverless.models.random_checkpoints import tiny_unet_config
from comfy_serverless.networks import projection_memo
from comfy_serverless.networks.build import build_from_state_dict, random_state_dict
from comfy_serverless.networks.cpu_kernels import FastLinear
from comfy_serverless.networks.unet import UNetModel


@pytest.fixture
def unet():
    cfg = tiny_unet_config("sd15")
    weights = random_state_dict(lambda: UNetModel(cfg), generator=torch.Generator().manual_seed(2), std=0.1)
    return build_from_state_dict(lambda: UNetModel(cfg), weights)


@pytest.fixture
def projections(unet, monkeypatch):
    """Counts the calls of every cross-attention key/value layer (by patching the class, not with hooks: a hooked
    layer is never memoised)."""
    layers = {id(m.to_k) for n, m in unet.named_modules() if n.endswith("attn2")}
    layers |= {id(m.to_v) for n, m in unet.named_modules() if n.endswith("attn2")}
    assert layers
    calls = []
    forward = FastLinear.forward

    def counting(self, x):
        if id(self) in layers:
            calls.append(self)
        return forward(self, x)

    monkeypatch.setattr(FastLinear, "forward", counting)
    return calls


def inputs(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([10.0, 901.0]),
            torch.randn(2, 7, 32, generator=generator))


def reference(unet, latents, timesteps, context):
    with torch.enable_grad():  # no reuse while gradients are on
        return unet(latents, timesteps, context)


def test_a_sampling_projects_its_context_once_and_gets_the_same_result(unet, projections):
    latents, timesteps, context = inputs()
    with torch.no_grad():
        first = unet(latents, timesteps, context)
        per_call = len(projections)
        assert per_call > 0
        for step in range(3):  # a new tensor of the same values at every step, as the sampler passes it
            latents = latents * 0.9
            assert torch.equal(unet(latents, timesteps, context.clone()), reference(unet, latents, timesteps, context))
        assert len(projections) == per_call + 3 * per_call  # the reference calls project; the steps do not
        other = torch.randn_like(context)
        assert torch.equal(unet(latents, timesteps, other), reference(unet, latents, timesteps, other))
    assert not torch.equal(first, unet(latents, timesteps, other).detach())


def test_a_replaced_or_changed_weight_is_projected_again(unet):
    latents, timesteps, context = inputs()
    attention = next(m for n, m in unet.named_modules() if n.endswith("attn2"))
    with torch.no_grad():
        unet(latents, timesteps, context)
        # a patch (LoRA, hook keyframe) replaces the parameter
        attention.to_k.weight = nn.Parameter(attention.to_k.weight * 1.5, requires_grad=False)
        assert torch.equal(unet(latents, timesteps, context), reference(unet, latents, timesteps, context))
        attention.to_v.weight.mul_(0.5)  # an in-place change moves the version
        assert torch.equal(unet(latents, timesteps, context), reference(unet, latents, timesteps, context))


def test_nothing_is_reused_with_hooks_gradients_or_past_the_size_limit(unet, projections, monkeypatch):
    latents, timesteps, context = inputs()
    attention = next(m for n, m in unet.named_modules() if n.endswith("attn2"))
    seen = []
    handle = attention.to_k.register_forward_hook(lambda module, args, output: seen.append(output))
    with torch.no_grad():
        unet(latents, timesteps, context)
        unet(latents, timesteps, context)
    assert len(seen) == 2
    handle.remove()
    projections.clear()
    with torch.enable_grad():
        unet(latents, timesteps, context)
        count = len(projections)
        unet(latents, timesteps, context)
        assert len(projections) == 2 * count
    monkeypatch.setattr(projection_memo, "MAX_BYTES", 0)
    other = torch.randn_like(context)  # the memos of `context` do not hold for it, and none is kept for it
    with torch.no_grad():
        unet(latents, timesteps, other)
        before = len(projections)
        unet(latents, timesteps, other)
        assert len(projections) - before == count
