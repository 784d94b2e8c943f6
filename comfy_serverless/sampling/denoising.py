"""The denoiser a sampler calls: model parameterisation and classifier-free guidance over ComfyUI conditioning.

* :class:`ModelSampling` turns a raw UNet (eps- or v-prediction) into a denoiser D(x, sigma) -> x_0.
* :class:`CFGDenoiser` (via :func:`cfg_denoiser`) runs every active conditioning entry, positive and negative,
  batched into as few UNet calls as possible, composes them per area/mask/strength, and applies guidance.

UNet contract: ``unet_apply(x, timesteps, context=..., **model_kwargs) -> model_output`` where ``x`` is already
scaled by 1/sqrt(sigma²+1), ``timesteps`` is a float tensor of table indices (one per batch item) and
``context`` the batched cross-attention conditioning; ``control`` and ``transformer_options`` are passed too
when the UNet takes them (a ControlNet's residuals, the model's attention and block patches).

Conditioning: a list of entries in ComfyUI's CONDITIONING form ``[tensor, options]`` (a bare tensor means
no options); the options are read in conditions.py.  An ``encode_extra(options, latent_shape) -> dict`` hook
computes per-entry UNet inputs (SDXL's ``y``); negative entries reach it with ``prompt_type`` "negative".

Hooks (models/hooks.py): chunks of entries with "hooks" run apart from others, and ``unet_apply`` gets
``weight_patches=`` (the hooks' patches at this step's keyframe strengths); it must be a DiffusionModel's
bound method then.  Entries with "default" fill, per conditioning list, the weight the others leave.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Optional

import torch

from .conditions import (
    Chunk,
    ConditioningEntry,
    ResolvedEntry,
    add_matching_areas,
    chunks_concatenable,
    concat_contexts,
    feathered_weights,
    normalise_conditioning,
    repeat_to_batch,
    resolve_entry,
)
from .schedules import SD_BETA_END, SD_BETA_START, SD_TRAIN_TIMESTEPS, DiscreteSchedule

UnetApply = Callable[..., torch.Tensor]

PREDICTION_TYPES = ("eps", "v_prediction")

# Start value of the per-pixel weight sums, so pixels no entry covers divide to 0 instead of NaN.
EMPTY_WEIGHT = 1e-37


def per_item_view(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(sigma.shape[:1] + (1,) * (like.ndim - 1))


class ModelSampling(DiscreteSchedule):
    """A discrete-time model's noise table plus its output parameterisation (eps or v), ComfyUI-compatible.

    Sampling happens in the variance-exploding scale x = x_0 + sigma * eps; the UNet was trained in the
    variance-preserving scale, which is x / sqrt(sigma² + 1).
    """

    def __init__(self, prediction_type: str = "eps", *, beta_start: float = SD_BETA_START,
                 beta_end: float = SD_BETA_END, num_timesteps: int = SD_TRAIN_TIMESTEPS,
                 betas: Optional[torch.Tensor] = None, sigma_data: float = 1.0):
        if prediction_type == "v":
            prediction_type = "v_prediction"
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
        super().__init__(beta_start, beta_end, num_timesteps, betas)
        self.prediction_type = prediction_type
        self.sigma_data = sigma_data

    def calculate_input(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The UNet's input: x rescaled to unit variance (c_in of Karras et al.)."""
        sigma = per_item_view(sigma, x)
        return x / (sigma ** 2 + self.sigma_data ** 2) ** 0.5

    def calculate_denoised(self, sigma: torch.Tensor, model_output: torch.Tensor,
                           model_input: torch.Tensor) -> torch.Tensor:
        """x_0 estimate from the UNet output and the (unscaled) noisy input."""
        sigma = per_item_view(sigma, model_output)
        if self.prediction_type == "eps":
            return model_input - model_output * sigma
        # v = alpha*eps - sigma_vp*x_0 in the VP scale; solving for x_0 in the VE scale gives:
        total = sigma ** 2 + self.sigma_data ** 2
        return (model_input * self.sigma_data ** 2 / total
                - model_output * sigma * self.sigma_data / total ** 0.5)

    def noise_scaling(self, sigma: torch.Tensor, noise: torch.Tensor, latent_image: torch.Tensor,
                      max_denoise: bool = False) -> torch.Tensor:
        """The starting point: the latent noised to ``sigma``.  At full denoise ComfyUI scales the noise by
        sqrt(1 + sigma²) (the VP prior's spread, seen in the VE scale) rather than sigma."""
        sigma = torch.as_tensor(sigma, dtype=noise.dtype, device=noise.device)
        sigma = sigma.reshape(sigma.shape[:1] + (1,) * (noise.ndim - 1)) if sigma.ndim else sigma
        scale = torch.sqrt(1.0 + sigma ** 2.0) if max_denoise else sigma
        return noise * scale + latent_image

    def inverse_noise_scaling(self, sigma: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        return latent

    def apply_model(self, unet_apply: UnetApply, x: torch.Tensor, sigma: torch.Tensor,
                    model_dtype: Optional[torch.dtype] = None, **model_kwargs) -> torch.Tensor:
        """Denoise ``x`` at ``sigma`` (one per batch item) with a raw UNet; returns float32 x_0."""
        x_in = self.calculate_input(sigma, x)
        timesteps = self.timestep(sigma).float()
        if model_dtype is not None:
            x_in = x_in.to(model_dtype)
            model_kwargs = {k: v.to(model_dtype) if torch.is_tensor(v) and v.is_floating_point() else v
                            for k, v in model_kwargs.items()}
        output = unet_apply(x_in, timesteps, **model_kwargs).float()
        return self.calculate_denoised(sigma, output, x)


class CFGDenoiser:
    """Denoiser D(x, sigma) with classifier-free guidance over ComfyUI conditioning lists.

    D = D_neg + cfg * (D_pos - D_neg), where D_pos / D_neg are the weighted compositions of the active
    positive / negative entries.  With cfg == 1 the negative side is skipped entirely (unless the model options
    say "disable_cfg1_optimization").

    ``model_options`` is ComfyUI's dict of model patches (DiffusionModel.model_options) and is honoured as
    ComfyUI's sampler does: "sampler_pre_cfg_function" (list), "sampler_cfg_function", "sampler_post_cfg_function"
    (list), "model_function_wrapper", "disable_cfg1_optimization", and "transformer_options" (its "patches" /
    "patches_replace" reach the UNet, see networks/unet.py).  The functions get ComfyUI's argument dicts; their
    "model" is this denoiser, which answers ``apply_model`` and :func:`calc_cond_batch` like ComfyUI's model.

    A conditioning entry's "control" option (ControlNet-style object) is asked once per UNet batch:
    ``control.get_control(x, sigma, cond, batched_number, transformer_options)`` with the unscaled noisy batch,
    ``cond`` holding "c_crossattn" (and "y"), returning {"input"/"middle"/"output": [tensors]} for the UNet; each
    distinct control gets ``pre_run(self, percent_to_sigma)`` before the first step.
    """

    def __init__(self, unet_apply: UnetApply, positive, negative, cfg: float, *,
                 model_sampling: Optional[ModelSampling] = None,
                 encode_extra: Optional[Callable[[dict, torch.Size], dict]] = None,
                 model_dtype: Optional[torch.dtype] = None, max_batch_chunks: Optional[int] = None,
                 model_options: Optional[dict] = None):
        self.unet_apply = unet_apply
        self.model_options = model_options or {}
        self.positive = normalise_conditioning(positive)
        self.negative = normalise_conditioning(negative)
        self._negative_given = negative
        _share_controls_with_uncond(self.positive, self.negative)
        self.cfg = float(cfg)
        self.model_sampling = model_sampling if model_sampling is not None else ModelSampling()
        self.encode_extra = encode_extra
        self.model_dtype = model_dtype
        self.max_batch_chunks = max_batch_chunks
        self._resolved: dict[tuple, list[list[ResolvedEntry]]] = {}
        self._controls_ready = False
        self._passes_options = _accepts_keyword(unet_apply, "transformer_options")
        self._sampling_context: dict = {}
        self._keyframes = None  # models.hooks.KeyframeTracker of the current sampling run
        self.unet_calls = 0

    def begin_sampling(self, latent_image: Optional[torch.Tensor] = None, denoise_mask: Optional[torch.Tensor] = None,
                       seed: Optional[int] = None) -> None:
        """What the conditioning's extra inputs may depend on (ComfyUI's encode_model_conds): the sampled latent
        in model space, the denoise mask and the seed; call before the first step."""
        context = {"latent_image": latent_image, "denoise_mask": denoise_mask, "seed": seed}
        accepted = [name for name in context if self.encode_extra is not None
                    and _accepts_keyword(self.encode_extra, name)]
        self._sampling_context = {name: context[name] for name in accepted}
        self._resolved.clear()
        self._keyframes = None

    def end_sampling(self) -> None:
        """Let each ControlNet-style object drop what it prepared (ComfyUI's cleanup after sampling)."""
        for control in self._controls():
            if hasattr(control, "cleanup"):
                control.cleanup()
        self._controls_ready = False

    @property
    def skips_negative(self) -> bool:
        return self._skips_negative(self.model_options)

    def _skips_negative(self, options: dict) -> bool:
        return math.isclose(self.cfg, 1.0) and not options.get("disable_cfg1_optimization", False)

    # ---- conditioning for a latent shape ----------------------------------------------------------------

    def _resolve(self, conds: list, x: torch.Tensor) -> list[Optional[list[ResolvedEntry]]]:
        """Each conditioning list resolved for x's shape (cached); the standard [positive, negative] pair also
        gets ComfyUI's matching areas."""
        key = (tuple(id(c) for c in conds), tuple(x.shape), x.device)
        if key not in self._resolved:
            height, width = x.shape[-2], x.shape[-1]
            sides = []
            for index, entries in enumerate(conds):
                if entries is None:
                    sides.append(None)
                    continue
                # The negative prompt (the SDXL refiner's aesthetic score depends on it), known by identity.
                negative = entries is self.negative or entries is self._negative_given
                entries = normalise_conditioning(entries)
                resolved = []
                for entry in entries:
                    if self.encode_extra is not None:
                        options = {**entry.options, "prompt_type": "negative"} if negative else entry.options
                        extra = self.encode_extra(options, x.shape, **self._sampling_context) or {}
                        entry = ConditioningEntry(entry.context, entry.options, {**entry.model_kwargs, **extra})
                    resolved.append(resolve_entry(entry, height, width, x.device, self.model_sampling))
                sides.append(resolved)
            if len(sides) == 2 and sides[0] is not None and sides[1] is not None:
                add_matching_areas(sides[0], sides[1])
                add_matching_areas(sides[1], sides[0])
            self._resolved[key] = sides
        return self._resolved[key]

    def _chunk(self, kind: int, resolved: ResolvedEntry, x: torch.Tensor, sigma: torch.Tensor) -> Optional[Chunk]:
        current = float(sigma.reshape(-1)[0])
        if resolved.sigma_start is not None and current > resolved.sigma_start:
            return None
        if resolved.sigma_end is not None and current < resolved.sigma_end:
            return None
        height, width = x.shape[-2], x.shape[-1]
        if resolved.area is None:
            region = (0, height, 0, width)
        else:
            h, w, y, x0 = resolved.area
            region = (y, min(y + h, height), x0, min(x0 + w, width))
        y0, y1, x0, x1 = region
        x_part = x[:, :, y0:y1, x0:x1]
        if resolved.mask is not None:
            mask = repeat_to_batch(resolved.mask[:, y0:y1, x0:x1], x.shape[0]).to(x.dtype)
            weights = mask.unsqueeze(1).expand(-1, x.shape[1], -1, -1) * resolved.strength
        else:
            weights = feathered_weights(x_part.shape, region, height, width, x.device) * resolved.strength
        entry = resolved.entry
        context = entry.context
        if context is not None:
            context = repeat_to_batch(context.to(x.device), x.shape[0])
        model_kwargs = {k: repeat_to_batch(_crop_latent_shaped(v, region, height, width).to(x.device), x.shape[0])
                        if torch.is_tensor(v) else v for k, v in entry.model_kwargs.items()}
        for option, name in (("cross_attn_controlnet", "crossattn_controlnet"),):  # a ControlNet's own text
            if torch.is_tensor(entry.options.get(option)):
                model_kwargs[name] = repeat_to_batch(entry.options[option].to(x.device), x.shape[0])
        return Chunk(kind, region, x_part, weights, context, model_kwargs, entry.options.get("control"),
                     entry.options.get("gligen"), entry.options.get("hooks") or None)

    # ---- the model ------------------------------------------------------------------------------------

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, c_crossattn=None, control=None,
                    transformer_options=None, **kwargs) -> torch.Tensor:
        """ComfyUI's model.apply_model: the x_0 estimate of noisy ``x`` at sigmas ``t`` (float32)."""
        if c_crossattn is not None:
            kwargs["context"] = c_crossattn
        if control is not None:
            kwargs["control"] = control
        if transformer_options is not None and self._passes_options:
            kwargs["transformer_options"] = transformer_options
        self.unet_calls += 1
        return self.model_sampling.apply_model(self.unet_apply, x, t, model_dtype=self.model_dtype, **kwargs)

    def _run_batch(self, chunks: list[Chunk], sigma: torch.Tensor, options: dict) -> list[torch.Tensor]:
        x = torch.cat([c.x for c in chunks])
        sigmas = torch.cat([sigma.reshape(-1)] * len(chunks))
        cond_or_uncond = [c.kind for c in chunks]
        c: dict[str, Any] = {}
        if chunks[0].context is not None:
            c["c_crossattn"] = concat_contexts([chunk.context for chunk in chunks])
        for key, value in chunks[0].model_kwargs.items():
            c[key] = torch.cat([chunk.model_kwargs[key] for chunk in chunks]) if torch.is_tensor(value) else value
        transformer_options = dict(options.get("transformer_options", {}))
        if chunks[0].gligen is not None:
            transformer_options = _with_gligen(transformer_options, chunks[0].gligen, x)
        transformer_options["cond_or_uncond"] = cond_or_uncond
        transformer_options["sigmas"] = sigmas
        if chunks[0].control is not None:
            c["control"] = chunks[0].control.get_control(x, sigmas, c, len(chunks), transformer_options)
        c["transformer_options"] = transformer_options
        if chunks[0].hooks is not None:
            c["weight_patches"] = self._hook_patches(chunks[0].hooks, sigma)
        wrapper = options.get("model_function_wrapper")
        if wrapper is not None:
            denoised = wrapper(self.apply_model, {"input": x, "timestep": sigmas, "c": c,
                                                  "cond_or_uncond": cond_or_uncond})
        else:
            denoised = self.apply_model(x, sigmas, **c)
        return list(denoised.float().chunk(len(chunks)))

    def calc_cond_batch(self, conds: list, x: torch.Tensor, sigma: torch.Tensor,
                        model_options: Optional[dict] = None) -> list[torch.Tensor]:
        """ComfyUI's calc_cond_batch: the composed x_0 estimate for each conditioning list (None -> zeros),
        entries of all lists batched into as few UNet calls as possible."""
        options = self.model_options if model_options is None else model_options
        pending, defaults = [], []
        for kind, side in enumerate(self._resolve(list(conds), x)):
            for resolved in side or ():
                chunk = self._chunk(kind, resolved, x, sigma)
                if chunk is not None:
                    (defaults if resolved.entry.options.get("default") else pending).append(chunk)
        pending += _default_chunks(defaults, pending, x, len(conds))
        totals = [torch.zeros_like(x) for _ in conds]
        weight_sums = [torch.full_like(x, EMPTY_WEIGHT) for _ in conds]
        while pending:
            batch = [c for c in pending if chunks_concatenable(c, pending[0])]
            if self.max_batch_chunks:
                batch = batch[:self.max_batch_chunks]
            pending = [c for c in pending if not any(c is b for b in batch)]
            for chunk, denoised in zip(batch, self._run_batch(batch, sigma, options)):
                y0, y1, x0, x1 = chunk.region
                totals[chunk.kind][:, :, y0:y1, x0:x1] += denoised * chunk.weights
                weight_sums[chunk.kind][:, :, y0:y1, x0:x1] += chunk.weights
        return [total / weight_sum for total, weight_sum in zip(totals, weight_sums)]

    def _hook_patches(self, hooks, sigma: torch.Tensor) -> tuple:
        """The UNet weight patches of a chunk's hooks at this step (keyframes tracked per sampling run)."""
        from ..models.hooks import KeyframeTracker, model_patches

        model = getattr(self.unet_apply, "__self__", None)
        if model is None or not hasattr(model, "handle"):
            raise TypeError("conditioning with hooks needs a MODEL to sample with (its unet_apply takes the hooks' "
                            "weight_patches)")
        if self._keyframes is None:
            self._keyframes = KeyframeTracker(self.model_sampling.percent_to_sigma)
        return model_patches(hooks, model, self._keyframes, float(sigma.reshape(-1)[0]))

    def predictions(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The composed positive and negative x_0 estimates (negative None when cfg == 1)."""
        skip = self.skips_negative
        positive, negative = self.calc_cond_batch([self.positive, None if skip else self.negative], x, sigma)
        return positive, None if skip else negative

    # ---- guidance ---------------------------------------------------------------------------------------

    def _controls(self) -> list:
        controls = {id(e.options["control"]): e.options["control"] for e in self.positive + self.negative
                    if e.options.get("control") is not None}
        return list(controls.values())

    def _pre_run_controls(self) -> None:
        self._controls_ready = True
        for control in self._controls():
            if hasattr(control, "pre_run"):
                control.pre_run(self, self.model_sampling.percent_to_sigma)

    def cfg_function(self, cond_pred, uncond_pred, x, sigma, options: dict, cond=None, uncond=None):
        if "sampler_cfg_function" in options:
            args = {"cond": x - cond_pred, "uncond": x - uncond_pred, "cond_scale": self.cfg, "timestep": sigma,
                    "input": x, "sigma": sigma, "cond_denoised": cond_pred, "uncond_denoised": uncond_pred,
                    "model": self, "model_options": options}
            result = x - options["sampler_cfg_function"](args)
        else:
            result = uncond_pred + (cond_pred - uncond_pred) * self.cfg
        for function in options.get("sampler_post_cfg_function", ()):
            result = function({"denoised": result, "cond": cond, "uncond": uncond, "cond_scale": self.cfg,
                               "model": self, "uncond_denoised": uncond_pred, "cond_denoised": cond_pred,
                               "sigma": sigma, "model_options": options, "input": x})
        return result

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, model_options: Optional[dict] = None) -> torch.Tensor:
        """The guided x_0.  ``model_options`` (per call, e.g. a cfg++ sampler's post-cfg hook) is added to the
        model's: its function lists are appended, other keys override."""
        options = _merged_options(self.model_options, model_options)
        if not self._controls_ready:
            self._pre_run_controls()
        uncond = None if self._skips_negative(options) else self.negative
        conds = [self.positive, uncond]
        out = self.calc_cond_batch(conds, x, sigma, options)
        for function in options.get("sampler_pre_cfg_function", ()):
            out = function({"conds": conds, "conds_out": out, "cond_scale": self.cfg, "timestep": sigma,
                            "input": x, "sigma": sigma, "model": self, "model_options": options})
        return self.cfg_function(out[0], out[1], x, sigma, options, self.positive, uncond)


def calc_cond_batch(model: CFGDenoiser, conds: list, x: torch.Tensor, sigma: torch.Tensor,
                    model_options: Optional[dict] = None) -> list[torch.Tensor]:
    """ComfyUI's comfy.samplers.calc_cond_batch for a cfg function's "model" (a CFGDenoiser)."""
    return model.calc_cond_batch(conds, x, sigma, model_options)


_FUNCTION_LISTS = ("sampler_pre_cfg_function", "sampler_post_cfg_function")


def _merged_options(base: dict, extra: Optional[dict]) -> dict:
    if not extra:
        return base
    merged = {**base, **extra}
    for key in _FUNCTION_LISTS:
        if key in base and key in extra:
            merged[key] = list(base[key]) + list(extra[key])
    return merged


def _share_controls_with_uncond(positive: list[ConditioningEntry], negative: list[ConditioningEntry]) -> None:
    """ComfyUI gives negative entries without a ControlNet the one of a positive entry that asks for it
    ("control_apply_to_uncond", set by the old ControlNetApply)."""
    shared = [e.options["control"] for e in positive
              if e.options.get("control_apply_to_uncond") and e.options.get("control") is not None]
    if not shared:
        return
    for index, entry in enumerate(negative):
        if entry.options.get("control") is None:
            negative[index] = ConditioningEntry(entry.context, {**entry.options, "control": shared[0]},
                                                entry.model_kwargs)


def _default_chunks(defaults: list[Chunk], others: list[Chunk], x: torch.Tensor, kinds: int) -> list[Chunk]:
    """ComfyUI's default conditioning: per list, weight 1 minus what the other entries cover (not below 0); an
    entry is dropped where nothing is left."""
    if not defaults:
        return []
    left = [torch.ones_like(x) for _ in range(kinds)]
    for chunk in others:
        y0, y1, x0, x1 = chunk.region
        left[chunk.kind][:, :, y0:y1, x0:x1] -= chunk.weights
    chunks = []
    for chunk in defaults:
        remaining = left[chunk.kind].clamp(min=0)
        if float(remaining.max()) == 0.0:
            continue
        y0, y1, x0, x1 = chunk.region
        chunk.weights = remaining[:, :, y0:y1, x0:x1]
        chunks.append(chunk)
    return chunks


def _with_gligen(transformer_options: dict, gligen, x: torch.Tensor) -> dict:
    """GLIGEN's boxes run as a "middle_patch" (between self- and cross-attention) for this batch only."""
    from ..models.gligen import gligen_patches

    extra = gligen_patches({"gligen": gligen}, x.shape, x.device) or {}
    patches = dict(transformer_options.get("patches") or {})
    patches["middle_patch"] = list(patches.get("middle_patch", ())) + extra.get("middle_patch", [])
    return {**transformer_options, "patches": patches}


def _crop_latent_shaped(value: torch.Tensor, region: tuple, height: int, width: int) -> torch.Tensor:
    """Inputs shaped like the latent (c_concat) follow an area entry to its region, as ComfyUI crops them."""
    if value.ndim == 4 and tuple(value.shape[-2:]) == (height, width):
        y0, y1, x0, x1 = region
        return value[:, :, y0:y1, x0:x1]
    return value


def _accepts_keyword(function, name: str) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind == p.VAR_KEYWORD or p.name == name for p in parameters)


def cfg_denoiser(unet_apply: UnetApply, cond, uncond, cfg: float, **options) -> CFGDenoiser:
    """Build the guided denoiser ``D(x, sigma)``; ``options`` as for :class:`CFGDenoiser`."""
    return CFGDenoiser(unet_apply, cond, uncond, cfg, **options)
