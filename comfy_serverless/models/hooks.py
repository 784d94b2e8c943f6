"""ComfyUI's hooks (HOOKS, HOOK_KEYFRAMES): weight patches a conditioning entry or a CLIP carries with it.

A hook is one weight source (a LoRA file, or another checkpoint used "as a LoRA": weight += s * (its weight -
ours)) with a model and a CLIP strength, and a keyframe group that scales both over the sampling progress.
Hooks are immutable; "clones" share `ref` (ComfyUI's hook identity), so combining groups drops duplicates.

The sampler runs each group of chunks with the same hooks through the UNet with the model's own patches plus
the hooks' patches at the strength of the keyframe active at that step (see KeyframeTracker). Patch objects are
cached per (network, strength), so an unchanged set of hook patches costs nothing (patching.patched_module
compares patch identities).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace

log = logging.getLogger(__name__)

INTERPOLATIONS = ("linear", "ease_in", "ease_out", "ease_in_out")


@dataclass(frozen=True)
class HookKeyframe:
    strength: float
    start_percent: float = 0.0
    guarantee_steps: int = 1  # steps this keyframe stays active once reached, even if later ones are due


class HookKeyframeGroup:
    """HOOK_KEYFRAMES: keyframes sorted by start_percent (equal starts keep their order)."""

    def __init__(self, keyframes=()):
        self.keyframes = sorted(keyframes, key=lambda k: k.start_percent)  # sorted() is stable

    def clone(self) -> HookKeyframeGroup:
        return HookKeyframeGroup(self.keyframes)

    def add(self, keyframe: HookKeyframe) -> None:
        self.keyframes = sorted([*self.keyframes, keyframe], key=lambda k: k.start_percent)

    def is_empty(self) -> bool:
        return not self.keyframes

    @property
    def first_strength(self) -> float:
        """Strength outside a sampling run (ComfyUI starts on the first keyframe, or 1.0 without any)."""
        return self.keyframes[0].strength if self.keyframes else 1.0


def interpolated(start: float, end: float, count: int, method: str) -> list[float]:
    """`count` values from start to end along ComfyUI's interpolation curves."""
    if method not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {method!r}; expected one of {INTERPOLATIONS}")
    values = []
    for i in range(count):
        t = i / (count - 1) if count > 1 else 0.0
        if method == "ease_in":
            t = t * t
        elif method == "ease_out":
            t = 1 - (1 - t) ** 2
        elif method == "ease_in_out":
            t = (1 - math.cos(t * math.pi)) / 2
        values.append(start + (end - start) * t)
    if method == "linear" and count > 1:
        values[-1] = end
    return values


@dataclass(frozen=True, eq=False)
class LoraSource:
    path: str


@dataclass(frozen=True, eq=False)
class ModelSource:
    """Another checkpoint's MODEL and CLIP (either None), applied as weight differences."""
    name: str
    model: object
    clip: object


@dataclass(frozen=True, eq=False)
class WeightHook:
    source: LoraSource | ModelSource
    strength_model: float
    strength_clip: float
    keyframes: HookKeyframeGroup = field(default_factory=HookKeyframeGroup)
    ref: object = field(default_factory=object)
    _patches: dict = field(default_factory=dict, repr=False)  # (target, network key, strength) -> patch or None

    def with_keyframes(self, keyframes: HookKeyframeGroup) -> WeightHook:
        return replace(self, keyframes=keyframes)

    def model_patch(self, model, strength: float):
        """The patch for `model`'s UNet at `strength` (this hook's strength_model times the keyframe's)."""
        return self._patch("model", model, strength)

    def clip_patch(self, clip, strength: float):
        return self._patch("clip", clip, strength)

    def _patch(self, target: str, owner, strength: float):
        if strength == 0:
            return None
        key = (target, owner.handle.key, strength)
        if key not in self._patches:
            if len(self._patches) > 64:  # interpolated keyframes: keep the cache bounded
                self._patches.pop(next(iter(self._patches)))
            self._patches[key] = _build_patch(self.source, target, owner, strength)
        return self._patches[key]


def _build_patch(source, target: str, owner, strength: float):
    from .patching import KeyPatch, LoraPatch

    if isinstance(source, LoraSource):
        from .loading import apply_lora_file

        if target == "model":
            patched = apply_lora_file(source.path, owner, None, 1.0, 0)[0]
        else:
            patched = apply_lora_file(source.path, None, owner, 0, 1.0)[1]
        if len(patched.patches) == len(owner.patches):
            return None  # nothing of this network in the file (logged by apply_lora_file)
        found = patched.patches[-1]
        return LoraPatch(found.name, found.targets, strength)
    other = source.model if target == "model" else source.clip
    if other is None:
        return None
    targets = _model_as_lora_targets(owner, other, target)
    return KeyPatch(targets) if targets else None


def _model_as_lora_targets(owner, other, target: str) -> dict:
    """{submodule: {name: ("model_as_lora", other's weight, 1, 1)}} for the weights both networks have."""
    from .clip_patcher_api import ENCODER_NAMES

    ours, theirs = owner.handle.get(), other.handle.get()
    pairs = [("", ours, theirs)] if target == "model" else [
        (name, getattr(ours, name), getattr(theirs, name)) for name in ENCODER_NAMES
        if hasattr(ours, name) and hasattr(theirs, name)]
    targets = {}
    for submodule, mine, source in pairs:
        shapes = {name: p.shape for name, p in mine.named_parameters()}
        entries = {}
        for name, weight in source.state_dict().items():
            if name not in shapes:
                continue
            if weight.shape != shapes[name]:
                raise ValueError(f"model-as-LoRA hook: {name} has shape {tuple(weight.shape)} in the hook's "
                                 f"checkpoint but {tuple(shapes[name])} in the model (different architectures?)")
            entries[name] = ("model_as_lora", weight, 1.0, 1.0)
        if entries:
            targets[submodule] = entries
    return targets


class HookGroup:
    """HOOKS: hooks in order, each at most once (by ref)."""

    def __init__(self, hooks=()):
        self.hooks: list[WeightHook] = []
        for hook in hooks:
            self.add(hook)

    def __len__(self) -> int:
        return len(self.hooks)

    def add(self, hook: WeightHook) -> None:
        if not any(h.ref is hook.ref for h in self.hooks):
            self.hooks.append(hook)

    def clone(self) -> HookGroup:
        return HookGroup(self.hooks)

    def clone_and_combine(self, other: HookGroup | None) -> HookGroup:
        return HookGroup([*self.hooks, *(other.hooks if other is not None else ())])

    def set_keyframes_on_hooks(self, hook_kf: HookKeyframeGroup | None) -> None:
        keyframes = hook_kf.clone() if hook_kf is not None else HookKeyframeGroup()
        self.hooks = [hook.with_keyframes(keyframes) for hook in self.hooks]

    @property
    def key(self) -> tuple:
        """Chunks batch together only when their hooks (and keyframes) are the same."""
        return tuple((id(h.ref), id(h.keyframes)) for h in self.hooks)

    @staticmethod
    def combine_all_hooks(groups, require_count: int = 0) -> HookGroup | None:
        actual = [g for g in groups if g is not None]
        if len(actual) < require_count:
            raise ValueError(f"need at least {require_count} hooks to combine, got {len(actual)}")
        if not actual:
            return None
        if len(actual) == 1:
            return actual[0]
        combined = actual[0].clone()
        for group in actual[1:]:
            combined = combined.clone_and_combine(group)
        return combined


def hooks_key(hooks) -> tuple:
    return hooks.key if hooks is not None else ()


class KeyframeTracker:
    """One sampling run's keyframe state (ComfyUI's HookKeyframeGroup.prepare_current_keyframe): per keyframe
    group, the active keyframe advances at each new sigma to the last keyframe whose start it has reached,
    stopping at one with guarantee steps; a keyframe stays at least its guarantee_steps steps (those that start
    before the run's first sigma guarantee nothing)."""

    def __init__(self, percent_to_sigma):
        self.percent_to_sigma = percent_to_sigma
        self.max_sigma = None
        self._states: dict[int, list] = {}  # id(group) -> [group, start sigmas, index, used steps, last sigma]

    def strength(self, group: HookKeyframeGroup, sigma: float) -> float:
        if group.is_empty():
            return 1.0
        if self.max_sigma is None or sigma > self.max_sigma:
            self.max_sigma = sigma  # the first step's sigma: the top of the schedule
        state = self._states.get(id(group))
        if state is None:
            starts = [float(self.percent_to_sigma(k.start_percent)) for k in group.keyframes]
            state = self._states[id(group)] = [group, starts, 0, 0, None]
        _, starts, index, used, last = state
        keyframes = group.keyframes
        if sigma != last:
            if used >= self._guaranteed(keyframes[index], starts[index]):
                for i in range(index + 1, len(keyframes)):
                    if starts[i] < sigma:
                        break
                    index, used = i, 0
                    if self._guaranteed(keyframes[i], starts[i]) > 0:
                        break
            state[2:] = [index, used + 1, sigma]
        return keyframes[state[2]].strength

    def _guaranteed(self, keyframe: HookKeyframe, start_sigma: float) -> int:
        return 0 if start_sigma > self.max_sigma else keyframe.guarantee_steps


def model_patches(hooks: HookGroup, model, tracker: KeyframeTracker, sigma: float) -> tuple:
    """The hooks' UNet patches at this step."""
    patches = (hook.model_patch(model, hook.strength_model * tracker.strength(hook.keyframes, sigma))
               for hook in hooks.hooks)
    return tuple(p for p in patches if p is not None)


def clip_patches(hooks: HookGroup | None, clip, multipliers: dict | None = None) -> tuple:
    """The hooks' CLIP patches; each hook's keyframe multiplier from `multipliers` (by ref) or its first."""
    if hooks is None:
        return ()
    patches = []
    for hook in hooks.hooks:
        multiplier = (multipliers or {}).get(id(hook.ref), hook.keyframes.first_strength)
        patch = hook.clip_patch(clip, hook.strength_clip * multiplier)
        if patch is not None:
            patches.append(patch)
    return tuple(patches)


def clip_schedule(hooks: HookGroup) -> list[tuple[tuple[float, float], dict]]:
    """ComfyUI's CLIP schedule: ranges of percent over which every hook's keyframe strength is constant, each with
    {id(hook.ref): multiplier}; before a hook's first keyframe (and without keyframes) the multiplier is 1."""
    ranges = {}
    for hook in hooks.hooks:
        keyframes = hook.keyframes.keyframes
        if not keyframes:
            ranges[id(hook.ref)] = [((0.0, 1.0), 1.0)]
            continue
        own, current = [], keyframes[0]
        for keyframe in keyframes[1:]:
            if keyframe.start_percent == current.start_percent:
                current = keyframe
            elif not math.isclose(keyframe.strength, current.strength):
                own.append(((current.start_percent, keyframe.start_percent), current.strength))
                current = keyframe
        if not math.isclose(current.start_percent, 1.0):
            own.append(((current.start_percent, 1.0), current.strength))
        ranges[id(hook.ref)] = own
    bounds = sorted({0.0, *(v for own in ranges.values() for span, _ in own for v in span)})
    schedule = []
    for start, end in zip(bounds, bounds[1:]):
        multipliers = {}
        for ref, own in ranges.items():
            multipliers[ref] = next((s for (a, b), s in own if a < end and b > start), 1.0)
        schedule.append(((start, end), multipliers))
    return schedule
