"""networks/cpu_kernels.py: packed oneDNN weights and Winograd convolutions give the stock layers' results
(fp32 to rounding, bf16 to bf16 tolerance), repack when a patch replaces or changes a weight, stay out of the
way of gradients, drop only pages a file can give back, and a server gives the same image with them on or off."""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from comfy_serverless.networks import cpu_kernels, file_pages, winograd
from comfy_serverless.networks.cpu_kernels import FastConv2d, FastLinear, use_fast_kernels
from test_fast_paths import _txt2img as txt2img  # the same tiny txt2img prompt
from test_fast_paths import server_images


def seeded(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def relative_error(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(autouse=True)
def pack_everything(monkeypatch):
    """COMFY_CPU_KERNELS=all: weights made in memory here are packed too (auto packs only file mappings)."""
    caches = (cpu_kernels._mode, cpu_kernels._winograd_min_pixels, cpu_kernels.transformed_winograd,
              cpu_kernels.large_tiles_sizes)
    monkeypatch.setenv(cpu_kernels.ENV, "all")
    for cache in caches:
        cache.cache_clear()
    yield
    for cache in caches:
        cache.cache_clear()


def fast_copy(layer: nn.Module, pack_after: int = 1) -> nn.Module:
    use_fast_kernels(layer)
    for module in layer.modules():
        module.__dict__["_cpu_pack_after"] = pack_after
    return layer


def conv(cin, cout, kernel=3, seed=0, **kwargs) -> nn.Conv2d:
    layer = nn.Conv2d(cin, cout, kernel, **kwargs).requires_grad_(False)
    with torch.no_grad():
        layer.weight.copy_(seeded(*layer.weight.shape, seed=seed, scale=0.05))
        layer.bias.copy_(seeded(cout, seed=seed + 1, scale=0.1))
    return layer


@pytest.mark.parametrize("kwargs", [{"padding": 1}, {"stride": 2}, {"padding": 1, "groups": 2}, {"dilation": 2}])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_packed_convolution_same_result(kwargs, dtype, tolerance):
    stock = conv(16, 32, **kwargs).to(dtype)
    fast = fast_copy(conv(16, 32, **kwargs).to(dtype))
    assert type(fast) is FastConv2d and isinstance(fast, nn.Conv2d)
    for shape in [(2, 16, 12, 12), (1, 16, 20, 9)]:  # the second shape reuses the weight packed for the first
        x = seeded(*shape, seed=3).to(dtype)
        with torch.inference_mode():
            expected, got = stock(x), fast(x)
        assert got.shape == expected.shape and got.dtype == dtype
        assert relative_error(got, expected) < tolerance
    # oneDNN packs bf16 only where it has bf16 kernels (AVX-512); elsewhere the stock path answered above
    packs = dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert (cpu_kernels.packed_weight(fast) is not None) is packs


def test_winograd_for_large_images_and_its_error(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "large_tiles_sizes", frozenset)  # NNPACK's, not F(4x4)
    stock, fast = conv(32, 32, padding=1), fast_copy(conv(32, 32, padding=1))
    x = seeded(1, 32, 128, 128, seed=5)  # over both instruction sets' size floor
    assert fast._nnpack_winograd(x) and not fast._nnpack_winograd(x[:, :, :16, :16])
    with torch.inference_mode():
        got = fast(x)
        reference = F.conv2d(x.double(), stock.weight.double(), stock.bias.double(), padding=1)
    assert cpu_kernels.packed_weight(fast) is None  # NNPACK transforms the weight itself: nothing packed
    assert 0 < relative_error(got, reference) < 1e-5


def test_packed_linear_same_result_any_rank():
    stock = nn.Linear(24, 40).requires_grad_(False)
    fast = fast_copy(nn.Linear(24, 40).requires_grad_(False))
    fast.load_state_dict(stock.state_dict())
    assert type(fast) is FastLinear and isinstance(fast, nn.Linear)
    no_bias = fast_copy(nn.Linear(24, 40, bias=False).requires_grad_(False))
    with torch.no_grad():
        no_bias.weight.copy_(stock.weight)
    for shape in [(5, 24), (2, 7, 24), (2, 3, 4, 24)]:
        x = seeded(*shape, seed=1)
        with torch.inference_mode():
            assert relative_error(fast(x), stock(x)) < 1e-6
            assert relative_error(no_bias(x), x @ stock.weight.t()) < 1e-6
    assert cpu_kernels.packed_weight(fast) is not None


def test_pack_at_first_or_second_call():
    layer = fast_copy(nn.Linear(8, 8).requires_grad_(False), pack_after=2)
    x = seeded(3, 8)
    with torch.inference_mode():
        layer(x)
        assert cpu_kernels.packed_weight(layer) is None
        layer(x)
        assert cpu_kernels.packed_weight(layer) is not None


def test_a_replaced_or_changed_weight_is_repacked():
    layer = fast_copy(conv(8, 8, padding=1))
    x = seeded(1, 8, 10, 10, seed=2)
    with torch.inference_mode():
        first = layer(x)
    layer.weight = nn.Parameter(layer.weight * 2, requires_grad=False)  # what a LoRA patch does
    with torch.inference_mode():
        doubled = layer(x)
    assert relative_error(doubled - layer.bias.view(1, -1, 1, 1), 2 * (first - layer.bias.view(1, -1, 1, 1))) < 1e-5
    with torch.no_grad():
        layer.weight.zero_()  # in place: the version counter moves
    with torch.inference_mode():
        zeroed = layer(x)
    assert torch.allclose(zeroed, layer.bias.view(1, -1, 1, 1).expand_as(zeroed))


def test_gradients_take_the_stock_path():
    layer = fast_copy(nn.Linear(6, 4))  # trainable weight
    x = seeded(2, 6).requires_grad_(True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    assert cpu_kernels.packed_weight(layer) is None


def test_off_switch_keeps_stock_layers(monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV, "0")
    cpu_kernels._mode.cache_clear()
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Linear(3, 3))
    use_fast_kernels(model)
    assert type(model[0]) is nn.Conv2d and type(model[1]) is nn.Linear


def test_packed_only_mode_has_no_winograd(monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV, "packed")
    cpu_kernels._mode.cache_clear()
    cpu_kernels._winograd_min_pixels.cache_clear()
    layer = fast_copy(conv(4, 4, padding=1))
    assert not layer._nnpack_winograd(seeded(1, 4, 128, 128))
    assert not cpu_kernels.large_tiles_sizes() and not layer._large_tiles(seeded(1, 4, 128, 128))


@pytest.fixture()
def large_tiles_from_32x32(monkeypatch):
    """As where the timing chose F(4x4) at 32x32 and 64x64 (the capped Xeon); every call of it recorded."""
    monkeypatch.setattr(cpu_kernels, "large_tiles_sizes", lambda: frozenset({32 * 32, 64 * 64}))
    calls = []
    real = winograd.convolve_large

    def recorded(x, weight, bias):
        calls.append(tuple(x.shape))
        return real(x, weight, bias)

    monkeypatch.setattr(winograd, "convolve_large", recorded)
    return calls


def test_large_tiles_for_large_images_where_nothing_packs(large_tiles_from_32x32):
    once = conv(8, 8, padding=1, seed=3)
    use_fast_kernels(once)  # a network run once per image (VAE): never packs
    every_step = use_fast_kernels(EveryStep(conv(8, 8, padding=1, seed=4)))[0]
    other_padding = use_fast_kernels(conv(8, 8, padding=2, seed=5))
    cases = [(once, (1, 8, 32, 32), True), (once, (1, 8, 33, 35), True), (once, (2, 8, 16, 16), False),
             (every_step, (2, 8, 32, 32), False),  # packs: 2048 pixels <= PACK_MAX_PIXELS
             (every_step, (2, 8, 64, 64), True), (other_padding, (1, 8, 64, 64), False)]
    for layer, shape, large in cases:
        del large_tiles_from_32x32[:]
        x = seeded(*shape, seed=6)
        with torch.inference_mode():
            out = layer(x)
        expected = F.conv2d(x.double(), layer.weight.double(), layer.bias.double(), padding=layer.padding)
        assert relative_error(out, expected) < 5e-6
        assert large_tiles_from_32x32 == ([shape] if large else []), (shape, layer.padding)


def test_large_tiles_never_for_bf16_or_gradients(large_tiles_from_32x32):
    layer = use_fast_kernels(conv(8, 8, padding=1, seed=7))
    with torch.inference_mode():
        layer.to(torch.bfloat16)(seeded(1, 8, 32, 32).bfloat16())
    layer.float().requires_grad_(True)
    layer(seeded(1, 8, 32, 32)).sum().backward()
    assert large_tiles_from_32x32 == [] and layer.weight.grad is not None


@pytest.mark.parametrize("won, at", [({64 * 64}, {64, 128, 256}), ({32 * 32}, {32, 33, 63}),
                                     ({32 * 32, 64 * 64}, {32, 33, 63, 64, 128, 256}), (set(), set())])
def test_large_tiles_follow_the_timing_per_size(monkeypatch, won, at):
    """Each timed size's answer holds up to the next size timed: F(4x4) can take the 32x32 level where it lost
    at 64x64."""
    monkeypatch.setattr(cpu_kernels.winograd_choice, "large_tiles_sizes", lambda: frozenset(won))
    cpu_kernels.large_tiles_sizes.cache_clear()
    layer = use_fast_kernels(conv(4, 4, padding=1))
    assert cpu_kernels.large_tiles_sizes() == won
    for size in (16, 31, 32, 33, 63, 64, 128, 256):
        assert layer._large_tiles(seeded(1, 4, size, size)) == (size in at), size


def _resident_kb(tensor) -> int:
    """Resident KB of the mapping holding `tensor` (/proc/self/smaps)."""
    address, lines = tensor.data_ptr(), open("/proc/self/smaps").read().splitlines()
    for index, line in enumerate(lines):
        first = line.split()[0]
        if "-" in first and all(c in "0123456789abcdef-" for c in first):
            low, high = (int(part, 16) for part in first.split("-"))
            if low <= address < high:
                return next(int(entry.split()[1]) for entry in lines[index + 1:] if entry.startswith("Rss:"))
    raise AssertionError("no mapping holds the tensor")


def test_pages_of_a_mapped_weight_are_dropped_after_packing_and_come_back(tmp_path, monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV, "auto")  # the default packs file mappings
    cpu_kernels._mode.cache_clear()
    weight = seeded(256, 1024, seed=7)  # 1 MiB
    save_file({"w": weight}, str(tmp_path / "w.safetensors"))
    mapped = load_file(str(tmp_path / "w.safetensors"))["w"]
    layer = fast_copy(nn.Linear(1024, 256, bias=False).requires_grad_(False))
    layer.weight = nn.Parameter(mapped, requires_grad=False)
    x = seeded(4, 1024, seed=8)
    mapped.sum()  # all pages resident
    before = _resident_kb(mapped)
    with torch.inference_mode():
        out = layer(x)
    assert before - _resident_kb(mapped) >= 900  # about 1 MiB left the resident set
    assert torch.equal(layer.weight, weight)  # read back from the file
    assert relative_error(out, x @ weight.t()) < 1e-6


def test_heap_weights_keep_their_pages_and_are_packed_only_when_asked(monkeypatch):
    layer = fast_copy(nn.Linear(1024, 256, bias=False).requires_grad_(False))
    kept = layer.weight.clone()
    with torch.inference_mode():
        layer(seeded(4, 1024))
    assert torch.equal(layer.weight, kept) and cpu_kernels.packed_weight(layer) is not None
    monkeypatch.setenv(cpu_kernels.ENV, "auto")
    cpu_kernels._mode.cache_clear()
    layer = fast_copy(nn.Linear(1024, 256, bias=False).requires_grad_(False))
    with torch.inference_mode():
        out = layer(seeded(4, 1024))
        layer(seeded(4, 1024))
    assert cpu_kernels.packed_weight(layer) is None  # a packed copy would double its memory
    assert torch.equal(out, seeded(4, 1024) @ layer.weight.t())


KERNELS_OFF_AND_ALL = [{cpu_kernels.ENV: "0"}, {cpu_kernels.ENV: "all"}]
# torch, oneDNN and MKL as on an AVX2-only CPU
AVX2_CAP = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def run_under_avx2_cap(code: str, kernels: str) -> list[str]:
    """`code` in a fresh interpreter under AVX2_CAP with COMFY_CPU_KERNELS=`kernels`; its printed words."""
    env = {**os.environ, cpu_kernels.ENV: kernels, **AVX2_CAP}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


@pytest.mark.parametrize("precision", ["--force-fp32", "--bf16-unet"])
def test_server_image_same_with_and_without(tmp_path, start_server, precision):
    prompts = []
    for seed in (11, 12):  # the second prompt runs every network packed
        prompts.append(txt2img())
        prompts[-1]["3"]["inputs"]["seed"] = seed
    images = server_images(start_server, tmp_path, precision, KERNELS_OFF_AND_ALL, prompts)
    assert np.abs(images[0] - images[1]).max() <= (1 if precision == "--force-fp32" else 8)


def test_a_network_built_from_weights_gets_the_fast_layers():
    """Every built network gets the layers; only the per-step ones (UNet here) pack, at their first call."""
    code = ("from comfy_serverless.networks.build import build_from_state_dict, random_state_dict\n"
            "from comfy_serverless.networks.unet import UNetModel\n"
            "from comfy_serverless.networks.vae import AutoencoderKL\n"
            "from comfy_serverless.models.random_checkpoints import tiny_unet_config, tiny_vae_config\n"
            "for build in (lambda: UNetModel(tiny_unet_config('sd15')), lambda: AutoencoderKL(tiny_vae_config())):\n"
            "    m = build_from_state_dict(build, random_state_dict(build))\n"
            "    kinds = {type(x).__name__ for x in m.modules()}\n"
            "    print('FastConv2d' in kinds, 'Conv2d' in kinds, 'Linear' in kinds,\n"
            "          {x.__dict__.get('_cpu_pack_after') for x in m.modules() if 'Fast' in type(x).__name__})\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split("\n")[:2] == ["True False False {1}", "True False False {None}"]


class EveryStep(nn.Sequential):
    CALLED_PER_STEP = True  # like the UNet: packs, and may keep Winograd-transformed weights


@pytest.fixture()
def avx2_winograd(monkeypatch):
    """As on an AVX2-only CPU, whatever this one has; a budget no layer here exceeds unless a test lowers it."""
    monkeypatch.setattr(cpu_kernels, "transformed_winograd", lambda: True)
    monkeypatch.setattr(cpu_kernels, "WINOGRAD_EXTRA_MEMORY", 10.0)


def test_every_step_networks_keep_winograd_weights_for_medium_images(avx2_winograd):
    net = use_fast_kernels(EveryStep(*(conv(8, 8, padding=1, seed=seed) for seed in range(4))))
    net[3].padding = (2, 2)  # not a "same" 3x3 convolution: packed for oneDNN
    for layer, size, transformed in ((net[0], 32, True), (net[1], 16, True), (net[2], 8, False), (net[3], 32, False)):
        for seed in (1, 2):  # the second call reuses the first call's weight
            x = seeded(2, 8, size, size, seed=seed)
            with torch.inference_mode():
                out = layer(x)
            assert relative_error(out, F.conv2d(x, layer.weight, layer.bias, padding=layer.padding)) < 1e-5
            held = cpu_kernels.packed_weight(layer)
            if seed == 1:
                first = held
            assert held is first
        assert isinstance(held, winograd.WinogradWeight if transformed else torch.Tensor)


def test_winograd_weights_stay_within_their_memory_budget_and_give_it_back(avx2_winograd, monkeypatch):
    """0.5x the weights' bytes: room for one transformed weight (7/9 extra), not two; a replaced weight returns
    its share, so its successor is transformed again."""
    monkeypatch.setattr(cpu_kernels, "WINOGRAD_EXTRA_MEMORY", 0.5)
    net = use_fast_kernels(EveryStep(conv(16, 16, padding=1, seed=1), conv(16, 16, padding=1, seed=2)))
    x = seeded(1, 16, 32, 32, seed=3)
    for replace in (False, True):
        if replace:
            net[0].weight = nn.Parameter(net[0].weight * 0.5, requires_grad=False)
        with torch.inference_mode():
            out = net(x)
        assert isinstance(cpu_kernels.packed_weight(net[0]), winograd.WinogradWeight)
        assert isinstance(cpu_kernels.packed_weight(net[1]), torch.Tensor)
        expected = F.conv2d(F.conv2d(x, net[0].weight, net[0].bias, padding=1), net[1].weight, net[1].bias, padding=1)
        assert relative_error(out, expected) < 1e-5


def test_winograd_weights_only_where_torch_runs_avx2_code_and_not_in_packed_mode():
    code = ("import os\n"
            "from comfy_serverless.networks import cpu_kernels as k\n"
            "print(k.transformed_winograd())\n"
            "os.environ[k.ENV] = 'packed'\n"
            "k._mode.cache_clear(); k.transformed_winograd.cache_clear()\n"
            "print(k.transformed_winograd())\n")
    assert run_under_avx2_cap(code, "auto") == ["True", "False"]


def test_server_image_same_on_avx2_with_winograd_weights(tmp_path, start_server):
    """torch and oneDNN capped at AVX2 and a 256 px image: the UNet's 32x32 and 16x16 levels run Winograd with
    transformed weights."""
    prompt = txt2img()
    prompt["5"]["inputs"].update(width=256, height=256)
    environments = [{**setting, **AVX2_CAP} for setting in KERNELS_OFF_AND_ALL]
    images = server_images(start_server, tmp_path, "--force-fp32", environments, [prompt])
    assert np.abs(images[0] - images[1]).max() <= 1


def test_bf16_where_onednn_cannot_pack_it_takes_the_stock_path():
    """bf16 forced on a CPU without AVX-512 (here: torch and oneDNN capped at AVX2): packing raises inside
    oneDNN; the layer must still answer, unpacked."""
    code = ("import torch\n"
            "from torch import nn\n"
            "from comfy_serverless.networks import cpu_kernels\n"
            "layer = cpu_kernels.use_fast_kernels(nn.Linear(64, 32).requires_grad_(False).to(torch.bfloat16))\n"
            "layer.__dict__['_cpu_pack_after'] = 1\n"
            "x = torch.randn(8, 64).to(torch.bfloat16)\n"
            "with torch.inference_mode():\n"
            "    out = layer(x)\n"
            "print(torch.equal(out, nn.functional.linear(x, layer.weight, layer.bias)), "
            "cpu_kernels.packed_weight(layer) is None)\n")
    assert run_under_avx2_cap(code, "all") == ["True", "True"]


def test_a_lora_on_a_mapped_weight_runs_unpacked_and_the_original_packs_again(tmp_path, monkeypatch):
    """The default (auto) with prepared weights and a LoRA: the patched weight lives in process memory and takes
    the stock path; putting the original back (another clone runs) packs the mapped weight again."""
    monkeypatch.setenv(cpu_kernels.ENV, "auto")
    cpu_kernels._mode.cache_clear()
    save_file({"w": seeded(64, 96, seed=9)}, str(tmp_path / "w.safetensors"))
    original = nn.Parameter(load_file(str(tmp_path / "w.safetensors"))["w"], requires_grad=False)
    layer = fast_copy(nn.Linear(96, 64, bias=False).requires_grad_(False))
    layer.weight = original
    x = seeded(3, 96, seed=10)
    lora = nn.Parameter(original + 0.1 * seeded(64, 1, seed=11) @ seeded(1, 96, seed=12), requires_grad=False)
    for weight, packs in ((original, True), (lora, False), (original, True)):
        layer.weight = weight
        with torch.inference_mode():
            out = layer(x)
        assert (cpu_kernels.packed_weight(layer) is not None) is packs
        assert relative_error(out, x @ weight.t()) < 1e-6


def test_a_packed_network_deep_copies_and_pickles():
    model = fast_copy(nn.Sequential(conv(4, 8, padding=1), nn.Flatten(), nn.Linear(8 * 6 * 6, 3)).requires_grad_(False))
    x = seeded(2, 4, 6, 6)
    with torch.inference_mode():
        expected = model(x)
    assert cpu_kernels.packed_weight(model[0]) is not None and cpu_kernels.packed_weight(model[2]) is not None
    copied = copy.deepcopy(model)
    restored = pickle.loads(pickle.dumps(model))
    with torch.inference_mode():
        assert relative_error(copied(x), expected) < 1e-6 and relative_error(restored(x), expected) < 1e-6
    assert cpu_kernels.packed_weight(copied[0]) is not None  # the copy packed its own weights


def test_a_stale_mapping_never_makes_heap_memory_look_like_a_file(monkeypatch):
    """An unmapped file range whose addresses the heap reuses: its pages must not be dropped (they would read
    back as zeros)."""
    heap = seeded(512, 512)
    start = heap.data_ptr()
    monkeypatch.setattr(file_pages, "_file_ranges", [(start - 4096, start + heap.numel() * 4 + 4096)])
    assert not file_pages.in_unwritten_file_mapping(heap)
    kept = heap.clone()
    file_pages.release_file_pages(heap)
    assert torch.equal(heap, kept)
