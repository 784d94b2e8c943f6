"""Where a network's time goes: its convolutions, linears and attention, timed call by call, and the rest.

Used by kernel_peak.py: it answers how close the step could come to the convolution peak at all, by pricing every
convolution and linear at the peak and keeping the measured attention and other time (norms, activations,
additions, layout copies). Each round re-measures the peak (its fastest convolution, best of 3 calls) right
before the timed call and sets the call against that reading: a machine whose speed drifts 3x within a minute
(the AMX Xeon) otherwise compares a fast phase's peak with a slow phase's step. Timing each call adds a
perf_counter pair per layer (about 350 in SD1.5's UNet), well under 1 % of a step.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

PARTS = ("convolutions", "linears", "attention")


@dataclass
class Breakdown:
    """One call's seconds and FLOPs by part, and the peak measured just before it."""

    peak_flops: float  # FLOP/s
    total: float = 0.0
    layers_at_peak: float = 0.0  # seconds of the convolutions and linears, each call at most flops / peak
    seconds: dict = field(default_factory=lambda: dict.fromkeys(PARTS, 0.0))
    flops: dict = field(default_factory=lambda: dict.fromkeys(PARTS, 0.0))

    @property
    def other(self) -> float:
        return self.total - sum(self.seconds.values())

    @property
    def layer_flops(self) -> float:
        """FLOPs as kernel_peak's table counts them (torch's FlopCounterMode counts no attention on the CPU)."""
        return self.flops["convolutions"] + self.flops["linears"]

    def of_peak(self) -> float:
        return self.layer_flops / self.total / self.peak_flops

    def bound_of_peak(self) -> float:
        """The share of the peak with every convolution and linear at the peak (or as measured where faster:
        Winograd layers), attention and the rest as measured."""
        return self.layer_flops / (self.layers_at_peak + self.seconds["attention"] + self.other) / self.peak_flops


def table(label: str, rounds: list[Breakdown]) -> str:
    """Medians over the rounds: each figure against the peak measured next to it, so drift cancels."""
    def median(value) -> float:
        return statistics.median(value(one) for one in rounds)

    total = median(lambda one: one.total)
    lines = [f"{label}: {total:.3f} s at {100 * median(Breakdown.of_peak):.0f} % of a peak of "
             f"{median(lambda one: one.peak_flops) / 1e9:.0f} GFLOP/s (medians of {len(rounds)} rounds)"]
    for part in (part for part in PARTS if rounds[0].seconds[part]):
        seconds = median(lambda one: one.seconds[part])
        rate = median(lambda one: one.flops[part] / one.seconds[part]) / 1e9
        lines.append(f"  {part}: {seconds:.3f} s ({100 * seconds / total:.0f} %), "
                     f"{rounds[0].flops[part] / 1e9:.0f} GFLOP at {rate:.0f} GFLOP/s")
    other = median(lambda one: one.other)
    lines.append(f"  other (norms, activations, additions, copies): {other:.3f} s ({100 * other / total:.0f} %)")
    lines.append(f"  with every convolution and linear at the peak: {100 * median(Breakdown.bound_of_peak):.0f} % "
                 "of peak")
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


def measure(model, run, rounds: int, current_peak) -> list[Breakdown]:
    """`rounds` calls of run() (after one untimed call), each right after current_peak() (GFLOP/s) re-measures
    the peak."""
    run()
    measured = []
    for _ in range(rounds):
        breakdown = Breakdown(current_peak() * 1e9)
        with timed_parts(model, breakdown):
            start = time.perf_counter()
            run()
            breakdown.total = time.perf_counter() - start
        measured.append(breakdown)
    return measured
