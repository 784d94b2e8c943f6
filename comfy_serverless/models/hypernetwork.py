"""A1111 hypernetworks (models/hypernetworks/*.pt) as ComfyUI applies them.

The file is a pickled dict: per attention input width (int keys, e.g. 320, 640, 1280, 768) a pair of layer
state dicts, one transforming the attention's key input and one its value input; plus options
"activation_func", "is_layer_norm", "use_dropout", "activate_output", "last_layer_dropout".

Each pair entry is a stack of linear layers (in the file's order), each followed by the activation (except the
last, unless activate_output) and, with is_layer_norm, by the LayerNorm stored right after it. As in ComfyUI,
"last" means the last stored layer, so with layer norms the last linear layer is activated too. Dropout is a
training-time layer and is left out. The patch adds ``strength * net(k)`` to k and ``strength * net(v)`` to v of
every self- and cross-attention whose input width has an entry.
"""

from __future__ import annotations

import os

import torch
from torch import nn

ACTIVATIONS = {
    "linear": None, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU,
    "swish": nn.Hardswish,  # as ComfyUI maps it
    "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "softsign": nn.Softsign, "mish": nn.Mish,
}


def _layer_stack(weights: dict, activation: str, layer_norm: bool, activate_output: bool) -> nn.Sequential:
    names = [key[:-len(".weight")] for key in weights if key.endswith(".weight")]
    layers: list[nn.Module] = []
    index = 0
    while index < len(names):
        weight, bias = weights[names[index] + ".weight"], weights.get(names[index] + ".bias")
        if weight.ndim != 2 or bias is None:
            raise ValueError(f"hypernetwork layer {names[index]!r}: expected a linear weight and bias, got "
                             f"shape {tuple(weight.shape)}")
        linear = nn.Linear(weight.shape[1], weight.shape[0])
        linear.load_state_dict({"weight": weight, "bias": bias})
        layers.append(linear)
        last = index == len(names) - 1
        if ACTIVATIONS[activation] is not None and (not last or activate_output):
            layers.append(ACTIVATIONS[activation]())
        if layer_norm:
            index += 1
            if index >= len(names) or weights[names[index] + ".weight"].ndim != 1:
                raise ValueError("hypernetwork says is_layer_norm, but a linear layer has no LayerNorm after it")
            norm_weight = weights[names[index] + ".weight"]
            norm = nn.LayerNorm(norm_weight.shape[0])
            norm.load_state_dict({"weight": norm_weight, "bias": weights[names[index] + ".bias"]})
            layers.append(norm)
        index += 1
    return nn.Sequential(*layers).float().eval()


class HypernetworkPatch:
    """attn1/attn2 patch: (n, context, value, extra) -> (n, context + s*net_k(context), value + s*net_v(value))."""

    def __init__(self, networks: dict[int, tuple[nn.Module, nn.Module]], strength: float):
        self.networks = networks
        self.strength = float(strength)

    def __call__(self, q, k, v, extra_options):
        pair = self.networks.get(k.shape[-1])
        if pair is None:
            return q, k, v
        with torch.no_grad():
            k = k + pair[0](k.float()).to(k.dtype) * self.strength
            v = v + pair[1](v.float()).to(v.dtype) * self.strength
        return q, k, v


def read_hypernetwork(state: dict, strength: float) -> HypernetworkPatch:
    activation = state.get("activation_func", "linear")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unsupported hypernetwork activation {activation!r}; supported: {', '.join(ACTIVATIONS)}")
    layer_norm = bool(state.get("is_layer_norm", False))
    activate_output = bool(state.get("activate_output", False))
    networks = {}
    for key, value in state.items():
        try:
            width = int(key)
        except (TypeError, ValueError):
            continue
        if not isinstance(value, (list, tuple)) or len(value) < 2:
            raise ValueError(f"hypernetwork entry {key!r}: expected a pair of layer dicts (key and value)")
        networks[width] = tuple(_layer_stack(value[i], activation, layer_norm, activate_output) for i in (0, 1))
    if not networks:
        raise ValueError("not a hypernetwork: no entries keyed by attention width (e.g. 320, 768)")
    return HypernetworkPatch(networks, strength)


def load_hypernetwork(path: str, strength: float) -> HypernetworkPatch:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"{os.path.basename(path)}: cannot read as a hypernetwork (.pt): {exc}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{os.path.basename(path)}: not a hypernetwork (holds a {type(state).__name__})")
    try:
        return read_hypernetwork(state, strength)
    except ValueError as exc:
        raise ValueError(f"{os.path.basename(path)}: {exc}") from None


def make_test_hypernetwork(out_path, widths=(32, 64), hidden_mult: int = 2, activation: str = "relu",
                           layer_norm: bool = True, seed: int = 0, std: float = 0.2) -> dict:
    """A tiny random hypernetwork file in A1111's layout (for tests); returns the saved dict."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator) * std

    state: dict = {}
    for width in widths:
        pair = []
        for _ in range(2):
            layers, index = {}, 0
            sizes = [width, width * hidden_mult, width]
            for n_in, n_out in zip(sizes[:-1], sizes[1:]):
                layers[f"linear.{index}.weight"] = randn(n_out, n_in)
                layers[f"linear.{index}.bias"] = randn(n_out)
                index += 2 if activation != "linear" else 1
                if layer_norm:  # A1111 puts one after every linear layer, the last included
                    layers[f"linear.{index}.weight"] = 1 + randn(n_out)
                    layers[f"linear.{index}.bias"] = randn(n_out)
                    index += 1
            pair.append(layers)
        state[width] = pair
    state.update({"activation_func": activation, "is_layer_norm": layer_norm, "use_dropout": True,
                  "activate_output": False, "last_layer_dropout": False})
    torch.save(state, str(out_path))
    return state
