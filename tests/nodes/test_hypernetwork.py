"""HypernetworkLoader: A1111 hypernetwork files read into layer stacks checked against hand-written math, applied
to a tiny SD 1.5 model's attention inputs, bad files, and once through the server."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_serverless.models.hypernetwork import load_hypernetwork, make_test_hypernetwork, read_hypernetwork
from comfy_serverless.models.random_checkpoints import make_test_checkpoint
from comfy_serverless.nodes.loaders_extra import HypernetworkLoader
from conftest import Server, server_context


def _by_hand(layers: dict, x: torch.Tensor, activation, layer_norm: bool) -> torch.Tensor:
    """Linear -> activation -> LayerNorm, in the file's key order; no activation after the last linear layer,
    except with layer norms (ComfyUI counts the last LayerNorm as the last layer)."""
    names = [k[:-7] for k in layers if k.endswith(".weight")]
    linears = [n for n in names if layers[n + ".weight"].ndim == 2]
    for i, name in enumerate(linears):
        x = x @ layers[name + ".weight"].T + layers[name + ".bias"]
        if i < len(linears) - 1 or layer_norm:
            x = activation(x)
        if layer_norm:
            norm = names[names.index(name) + 1]
            x = torch.nn.functional.layer_norm(x, x.shape[-1:], layers[norm + ".weight"], layers[norm + ".bias"])
    return x


@pytest.mark.parametrize("activation, function, layer_norm", [
    ("relu", torch.relu, True), ("tanh", torch.tanh, False), ("linear", lambda t: t, False),
    ("swish", torch.nn.functional.hardswish, True)])
def test_layer_stacks_match_the_math(tmp_path, activation, function, layer_norm):
    state = make_test_hypernetwork(tmp_path / "h.pt", activation=activation, layer_norm=layer_norm)
    patch = load_hypernetwork(str(tmp_path / "h.pt"), strength=0.7)
    q, k, v = torch.randn(2, 5, 64), torch.randn(2, 5, 64), torch.randn(2, 7, 64)
    q2, k2, v2 = patch(q, k, v, {})
    assert q2 is q
    torch.testing.assert_close(k2, k + 0.7 * _by_hand(state[64][0], k, function, layer_norm), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v2, v + 0.7 * _by_hand(state[64][1], v, function, layer_norm), atol=1e-5, rtol=1e-5)
    other = torch.randn(1, 3, 48)  # no entry for this width: unchanged
    assert patch(other, other, other, {})[1] is other


def test_bad_files_give_clear_errors(tmp_path):
    state = make_test_hypernetwork(tmp_path / "h.pt")
    with pytest.raises(ValueError, match="activation"):
        read_hypernetwork({**state, "activation_func": "gelu-ish"}, 1.0)
    with pytest.raises(ValueError, match="no entries"):
        read_hypernetwork({"activation_func": "relu"}, 1.0)
    norms = {k[:-7] for k, v in state[32][0].items() if k.endswith(".weight") and v.ndim == 1}
    no_norms = {32: [{k: v for k, v in layers.items() if k.rsplit(".", 1)[0] not in norms} for layers in state[32]],
                "is_layer_norm": True}
    with pytest.raises(ValueError, match="no LayerNorm"):
        read_hypernetwork(no_norms, 1.0)
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="junk.pt"):
        load_hypernetwork(str(tmp_path / "junk.pt"), 1.0)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("hypernetwork")
    (root / "models" / "checkpoints").mkdir(parents=True)
    (root / "models" / "hypernetworks").mkdir(parents=True)
    make_test_checkpoint("sd15", "tiny", root / "models" / "checkpoints" / "tiny.safetensors", seed=2)
    make_test_hypernetwork(root / "models" / "hypernetworks" / "tiny-hn.pt", std=0.5)
    return root


def test_loader_patches_a_clone_that_changes_the_unet(base):
    from comfy_serverless.models.loading import load_checkpoint

    with server_context(base_directory=str(base), force_fp32=True):
        model = load_checkpoint(str(base / "models" / "checkpoints" / "tiny.safetensors"), want_clip=False,
                                want_vae=False)[0]
        (patched,) = HypernetworkLoader().load_hypernetwork(model, "tiny-hn.pt", 1.0)
        (zero,) = HypernetworkLoader().load_hypernetwork(model, "tiny-hn.pt", 0.0)
        with pytest.raises(FileNotFoundError, match="hypernetworks"):
            HypernetworkLoader().load_hypernetwork(model, "missing.pt", 1.0)
    patches = patched.model_options["transformer_options"]["patches"]
    assert len(patches["attn1_patch"]) == 1 and len(patches["attn2_patch"]) == 1
    assert "patches" not in model.model_options["transformer_options"]
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 32)
    t = torch.tensor([300.0])

    def run(m):
        return m.unet_apply(x, t, context=context, transformer_options=m.model_options["transformer_options"])

    plain = run(model)
    assert (run(patched) - plain).abs().max() > 1e-3
    torch.testing.assert_close(run(zero), plain)


def _workflow(strength: float | None) -> dict:
    model = ["1", 0]
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red cube"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"filename_prefix": "hn", "images": ["6", 0]}},
    }
    if strength is not None:
        prompt["8"] = {"class_type": "HypernetworkLoader", "inputs": {
            "model": ["1", 0], "hypernetwork_name": "tiny-hn.pt", "strength": strength}}
        model = ["8", 0]
    prompt["5"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": 4, "steps": 3, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
        "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}}
    return prompt


def _pixels(srv: Server, entry: dict) -> np.ndarray:
    assert entry["status"]["status_str"] == "success", entry["status"]
    [image] = entry["outputs"]["7"]["images"]
    return np.asarray(Image.open(io.BytesIO(srv.get("/view", params=image).content))).astype(np.int16)


def test_hypernetwork_through_the_server(base, tmp_path):
    root = tmp_path / "srv"
    shutil.copytree(base / "models", root / "models")
    srv = Server(root, args=("--force-fp32",), packs=())
    try:
        plain = _pixels(srv, srv.run(_workflow(None)))
        assert np.array_equal(_pixels(srv, srv.run(_workflow(0.0))), plain)
        assert np.abs(_pixels(srv, srv.run(_workflow(1.0))) - plain).max() > 0
    finally:
        srv.stop()
