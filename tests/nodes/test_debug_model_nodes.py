"""ModelComputeDtype and TorchCompileModel (nodes/debug_model_nodes.py) on a tiny random SD1.5 checkpoint:
a clone's compute dtype against the network converted by hand, the shared network and other clones untouched,
torch.compile against the plain UNet, clear errors for backends that cannot run here, and runs over HTTP."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

from comfy_serverless.models.loading import load_checkpoint
from comfy_serverless.models.patching import ComputeCast
from comfy_serverless.models.random_checkpoints import make_test_checkpoint
from comfy_serverless.nodes import debug_model_nodes
from comfy_serverless.nodes.debug_model_nodes import ModelComputeDtype, TorchCompileModel
from conftest import server_context


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("debug-model")
    checkpoints = root / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    make_test_checkpoint("sd15", "tiny", checkpoints / "a.safetensors", seed=1)
    return root


@pytest.fixture(scope="module")
def model(base):
    with server_context(base_directory=str(base), force_fp32=True):
        yield load_checkpoint(str(base / "models" / "checkpoints" / "a.safetensors"))[0]


def unet_inputs():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 3, 32, generator=generator)
    return x, torch.tensor([900.0, 20.0]), context


def by_hand(model, dtype):
    """The clone's network, deep-copied and converted with Module.to: what the clone must compute."""
    network = copy.deepcopy(model.network()).to(dtype)
    x, t, context = unet_inputs()
    with torch.no_grad():
        return network(x.to(dtype), t, context.to(dtype)).float()


def network_dtypes(model) -> set:
    return {p.dtype for p in model.network().parameters()}


@pytest.mark.parametrize("name, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_clone_computes_in_its_dtype_as_the_network_converted_by_hand(model, name, dtype):
    plain = model.unet_apply(*unet_inputs())
    (clone,) = ModelComputeDtype().patch(model, name)
    assert clone.dtype == dtype and clone.model_dtype() == dtype and model.dtype == torch.float32
    out = clone.unet_apply(*unet_inputs())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, by_hand(model, dtype), rtol=0, atol=0)
    assert not torch.equal(out, plain)  # lower precision really ran...
    torch.testing.assert_close(out, plain, rtol=0.1, atol=0.1)  # ...on the same weights
    assert network_dtypes(clone) == {dtype}
    # The original clone is untouched: float32 weights and its exact output again.
    assert network_dtypes(model) == {torch.float32}
    assert torch.equal(model.unet_apply(*unet_inputs()), plain)


def test_fp32_on_an_fp32_network_and_default_restore_the_load_dtype(model):
    plain = model.unet_apply(*unet_inputs())
    (same,) = ModelComputeDtype().patch(model, "fp32")
    assert same.patches == model.patches  # nothing to convert
    assert torch.equal(same.unet_apply(*unet_inputs()), plain)
    (half,) = ModelComputeDtype().patch(model, "bf16")
    (back,) = ModelComputeDtype().patch(half, "default")
    assert back.dtype == torch.float32 and not any(isinstance(p, ComputeCast) for p in back.patches)
    assert torch.equal(back.unet_apply(*unet_inputs()), plain)
    assert half.dtype == torch.bfloat16 and network_dtypes(half) == {torch.bfloat16}  # its input unchanged


def test_weight_patches_apply_before_the_cast(model):
    """As ComfyUI: a patched weight is stored in the load dtype, then converted for computing."""
    key = "diffusion_model.out.2.weight"
    weight = model.model_state_dict()[key].clone()
    delta = torch.full_like(weight, 0.01)
    patched = model.clone()
    patched.add_patches({key: (delta,)}, 1.0)
    (half,) = ModelComputeDtype().patch(patched, "bf16")
    torch.testing.assert_close(half.model_state_dict()[key], (weight + delta).to(torch.bfloat16), rtol=0, atol=0)
    torch.testing.assert_close(half.unet_apply(*unet_inputs()), by_hand(half, torch.bfloat16), rtol=0, atol=0)
    assert torch.equal(model.model_state_dict()[key], weight)


def test_bad_dtype_is_refused(model):
    with pytest.raises(ValueError, match="dtype must be one of"):
        ModelComputeDtype().patch(model, "fp8")


def test_cudagraphs_without_cuda_fails_clearly(model, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU server, whatever this machine has
    with pytest.raises(RuntimeError, match="cudagraphs backend needs a CUDA device"):
        TorchCompileModel().patch(model, "cudagraphs")


def test_inductor_without_a_compiler_fails_clearly(model, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # on CUDA inductor needs triton instead
    monkeypatch.setattr(debug_model_nodes.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        TorchCompileModel().patch(model, "inductor")


def test_unknown_backend_is_refused(model):
    with pytest.raises(ValueError, match="backend must be one of"):
        TorchCompileModel().patch(model, "eager")


def test_inductor_clone_matches_the_plain_model(model):
    # This project's machines have g++ (inductor's CPU backend compiles C++); without one the node refuses clearly.
    assert any(shutil.which(c) for c in debug_model_nodes.C_COMPILERS), "no C++ compiler for inductor"
    plain = model.unet_apply(*unet_inputs())
    (compiled,) = TorchCompileModel().patch(model, "inductor")
    assert "torch_compile_backend" not in model.model_options
    torch.testing.assert_close(compiled.unet_apply(*unet_inputs()), plain, rtol=1e-4, atol=1e-4)


def test_over_http_bf16_runs_and_cudagraphs_fails_with_its_reason(start_server, tmp_path, base):
    srv = start_server("--force-fp32", base=tmp_path / "srv")
    models = srv.base / "models" / "checkpoints"
    models.mkdir(parents=True, exist_ok=True)
    (models / "a.safetensors").hardlink_to(base / "models" / "checkpoints" / "a.safetensors")

    def prompt(patch: dict, prefix: str) -> dict:
        return {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a.safetensors"}},
            "2": patch,
            "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cat", "clip": ["1", 1]}},
            "3": {"class_type": "KSampler", "inputs": {
                "seed": 3, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1,
                "model": ["2", 0], "positive": ["6", 0], "negative": ["6", 0], "latent_image": ["5", 0]}},
            "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 2]}},
            "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["8", 0]}},
        }

    bf16 = {"class_type": "ModelComputeDtype", "inputs": {"model": ["1", 0], "dtype": "bf16"}}
    entry = srv.run(prompt(bf16, "bf16"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert (srv.base / "output" / "bf16_00001_.png").is_file()
    if torch.cuda.is_available():
        return
    graphs = {"class_type": "TorchCompileModel", "inputs": {"model": ["1", 0], "backend": "cudagraphs"}}
    entry = srv.run(prompt(graphs, "graphs"))
    assert entry["status"]["status_str"] == "error"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_type"] == "TorchCompileModel"
    assert "needs a CUDA device" in errors[0]["exception_message"]
