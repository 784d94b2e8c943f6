"""Where a network's time goes: its convolutions, linears and attention, timed call by call, and the rest.

Used by kernel_peak.py: it answers how close the step could come to the convolution peak at all, by pricing every
convolution and linear at the peak and keeping the measured attention and other time (norms, activations,
additions, layout copies). Timing each call adds a perf_counter pair per layer (about 350 in SD1.5's UNet), well
under 1 % of a step.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

PARTS = ("convolutions", "linears", "attention")


@dataclass
class Breakdown:
    peak_flops: float  # FLOP/s
    total: float = 0.0
    layers_at_peak: float = 0.0  # seconds of the convolutions and linears, each call at most flops / peak
    seconds: dict = field(default_factory=lambda: dict.fromkeys(PARTS, 0.0))
    flops: dict = field(default_factory=lambda: dict.fromkeys(PARTS, 0.0))

    @property
    def other(self) -> float:
        return self.total - sum(self.seconds.values())

    def bound_at_peak(self) -> float:
        """The call's time with every convolution and linear at the peak (or as measured where faster: Winograd
        layers) and attention and the rest as measured."""
        return self.layers_at_peak + self.seconds["attention"] + self.other

    def table(self, label: str) -> str:
        lines = [f"{label}: {self.total:.3f} s"]
        for part in (part for part in PARTS if self.seconds[part]):
            rate = self.flops[part] / self.seconds[part] / 1e9
            lines.append(f"  {part}: {self.seconds[part]:.3f} s ({100 * self.seconds[part] / self.total:.0f} %), "
                         f"{self.flops[part] / 1e9:.0f} GFLOP at {rate:.0f} GFLOP/s")
        lines.append(f"  other (norms, activations, additions, copies): {self.other:.3f} s "
                     f"({100 * self.other / self.total:.0f} %)")
        # FLOPs as kernel_peak's table counts them (torch's FlopCounterMode counts no attention on the CPU)
        layer_flops = self.flops["convolutions"] + self.flops["linears"]
        bound = self.bound_at_peak()
        lines.append(f"  with every convolution and linear at the peak: {bound:.3f} s, "
                     f"{100 * layer_flops / bound / self.peak_flops:.0f} % of peak")
        return "\n".join(lines)


def _part_of(module) -> str | None:
    from torch import nn

    if isinstance(module, nn.Conv2d):
        return "convolutions"
    if isinstance(module, nn.Linear):
        return "linears"
    return None


def _layer_flops(module, out) -> float:
    """2 FLOPs per multiply-add: each output value sums in_channels/groups x kernel area (or in_features)."""
    if _part_of(module) == "convolutions":
        return float(2 * out.numel() * (module.in_channels // module.groups) * module.kernel_size[0]
                     * module.kernel_size[1])
    return float(2 * out.numel() * module.in_features)


@contextmanager
def timed_parts(model, breakdown: Breakdown):
    """Adds each convolution's, linear's and scaled_dot_product_attention's seconds and FLOPs to `breakdown`
    while the block runs."""
    import torch.nn.functional as F

    started: dict[int, float] = {}

    def before(module, _inputs):
        started[id(module)] = time.perf_counter()

    def after(module, _inputs, out):
        elapsed = time.perf_counter() - started.pop(id(module))
        part, flops = _part_of(module), _layer_flops(module, out)
        breakdown.seconds[part] += elapsed
        breakdown.flops[part] += flops
        breakdown.layers_at_peak += min(elapsed, flops / breakdown.peak_flops)

    handles = []
    for module in model.modules():
        if _part_of(module) is not None:
            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    attention = F.scaled_dot_product_attention

    def timed_attention(q, k, v, *args, **kwargs):
        start = time.perf_counter()
        out = attention(q, k, v, *args, **kwargs)
        breakdown.seconds["attention"] += time.perf_counter() - start
        # q @ k^T and the weights @ v: 2 FLOPs per multiply-add each
        breakdown.flops["attention"] += 4.0 * q.numel() * k.shape[-2]
        return out

    F.scaled_dot_product_attention = timed_attention
    try:
        yield breakdown
    finally:
        F.scaled_dot_product_attention = attention
        for handle in handles:
            handle.remove()


def measure(model, run, runs: int, peak_flops: float) -> Breakdown:
    """The per-call average over `runs` calls of run() (after one untimed call); peak_flops in FLOP/s."""
    run()
    total = Breakdown(peak_flops)
    with timed_parts(model, total):
        start = time.perf_counter()
        for _ in range(runs):
            run()
        total.total = time.perf_counter() - start
    total.total /= runs
    total.layers_at_peak /= runs
    for part in PARTS:
        total.seconds[part] /= runs
        total.flops[part] /= runs
    return total
