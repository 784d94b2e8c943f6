"""Every ComfyUI module name comfy-serverless provides, imported at module level as packs do, and nodes that use
them. (This file is the pack's own `nodes` module; `import nodes` below is ComfyUI's, an absolute import.)"""

import os
import tempfile
import time

import comfy
import comfy.model_management
import comfy.model_patcher
import comfy.sample
import comfy.samplers
import comfy.sd
import comfy.utils
import execution
import folder_paths
import latent_preview
import node_helpers
import torch
from comfy.cli_args import LatentPreviewMethod, args
from comfy.comfy_types import IO, CheckLazyMixin, ComfyNodeABC, InputTypeDict
from comfy.comfy_types.node_typing import IO as NodeTypingIO
from comfy.model_management import (
    OOM_EXCEPTION,
    CPUState,
    InterruptProcessingException,
    VRAMState,
    cpu_mode,
    cpu_state,
    free_memory,
    get_free_memory,
    get_torch_device,
    get_total_memory,
    intermediate_device,
    interrupt_current_processing,
    is_device_cpu,
    load_models_gpu,
    processing_interrupted,
    should_use_bf16,
    should_use_fp16,
    soft_empty_cache,
    text_encoder_device,
    throw_exception_if_processing_interrupted,
    unet_offload_device,
    unload_all_models,
    vae_device,
    vram_state,
    xformers_enabled,
)
from comfy.model_patcher import ModelPatcher
from comfy.sample import fix_empty_latent_channels, prepare_noise, sample
from comfy.samplers import SAMPLER_NAMES, SCHEDULER_NAMES, KSampler, calculate_sigmas
from comfy.sd import CLIP, VAE, load_checkpoint_guess_config
from comfy.utils import (
    PROGRESS_BAR_ENABLED,
    ProgressBar,
    bislerp,
    common_upscale,
    copy_to_param,
    get_attr,
    get_tiled_scale_steps,
    lanczos,
    load_torch_file,
    repeat_to_batch_size,
    save_torch_file,
    set_attr,
    set_progress_bar_enabled,
    tiled_scale,
)
from comfy_execution.graph import DynamicPrompt, ExecutionBlocker
from comfy_execution.graph_utils import GraphBuilder, is_link
from comfy_extras.nodes_images import ImageCrop
from comfy_extras.nodes_mask import ImageCompositeMasked, ImageToMask, InvertMask, MaskToImage, SolidMask
from comfy_extras.nodes_post_processing import Blur, Sharpen
from comfy_extras.nodes_primitive import Int, String
from comfy_extras.nodes_rebatch import ImageRebatch
from execution import CacheType, ExecutionResult, full_type_name
from folder_paths import (
    add_model_folder_path,
    annotated_filepath,
    exists_annotated_filepath,
    filter_files_content_types,
    filter_files_extensions,
    folder_names_and_paths,
    get_annotated_filepath,
    get_directory_by_type,
    get_filename_list,
    get_folder_paths,
    get_full_path,
    get_full_path_or_raise,
    get_input_directory,
    get_output_directory,
    get_save_image_path,
    get_temp_directory,
    get_user_directory,
    map_legacy,
    recursive_search,
    supported_pt_extensions,
)
from latent_preview import get_previewer, prepare_callback
from node_helpers import conditioning_set_values, hasher, image_alpha_fix, pillow, string_to_torch_dtype

import nodes
from nodes import (
    MAX_RESOLUTION,
    CLIPTextEncode,
    LoraLoader,
    SaveImage,
    VAEDecode,
    before_node_execution,
    common_ksampler,
    interrupt_processing,
)
from nodes import NODE_CLASS_MAPPINGS as ALL_NODE_CLASS_MAPPINGS
from nodes import NODE_DISPLAY_NAME_MAPPINGS as ALL_NODE_DISPLAY_NAME_MAPPINGS
from nodes import KSampler as CoreKSampler

IMPORTED_AT_LOAD = (comfy, execution, ExecutionBlocker, DynamicPrompt, GraphBuilder, InterruptProcessingException,
                    interrupt_current_processing, interrupt_processing, unload_all_models, load_models_gpu,
                    CLIPTextEncode, LoraLoader, VAEDecode, CoreKSampler, NodeTypingIO, CheckLazyMixin,
                    InputTypeDict, OOM_EXCEPTION, add_model_folder_path, KSampler, VAE, CLIP, latent_preview,
                    node_helpers, throw_exception_if_processing_interrupted)


class SurfaceReport(ComfyNodeABC):
    """Output node: runs the module functions and shows what they returned, for the test to check."""

    @classmethod
    def INPUT_TYPES(cls) -> InputTypeDict:
        return {"required": {"width": (IO.INT, {"default": 16, "min": 8, "max": MAX_RESOLUTION})}}

    RETURN_TYPES = ()
    FUNCTION = "report"
    OUTPUT_NODE = True
    CATEGORY = "comfy_style"

    def report(self, width):
        before_node_execution()
        facts = {}
        image = torch.rand(1, 3, 8, 8)
        facts["common_upscale"] = list(common_upscale(image, width, 12, "bilinear", "center").shape)
        facts["lanczos"] = list(lanczos(image, 4, 4).shape)
        facts["bislerp"] = list(bislerp(torch.rand(1, 4, 8, 8), 16, 16).shape)
        facts["tiled"] = list(tiled_scale(image, lambda t: t.repeat_interleave(2, -1).repeat_interleave(2, -2),
                                          tile_x=4, tile_y=4, overlap=1, upscale_amount=2).shape)
        facts["tiled_same"] = bool(torch.allclose(
            tiled_scale(image, lambda t: t * 1.0, tile_x=4, tile_y=4, overlap=2, upscale_amount=1), image,
            atol=1e-5))
        facts["tiled_steps"] = get_tiled_scale_steps(8, 8, 4, 4, 1)
        facts["repeat"] = list(repeat_to_batch_size(torch.zeros(2, 3), 5).shape)
        layer = torch.nn.Linear(2, 2)
        set_attr(layer, "bias", torch.nn.Parameter(torch.ones(2)))
        copy_to_param(layer, "weight", torch.full((2, 2), 3.0))
        facts["attrs"] = [float(get_attr(layer, "bias").sum()), float(layer.weight.sum())]
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "t.safetensors")
            save_torch_file({"a": torch.arange(3.0)}, path)
            facts["torch_file"] = load_torch_file(path, safe_load=True)["a"].tolist()
        facts["devices"] = [str(d) for d in (get_torch_device(), intermediate_device(), unet_offload_device(),
                                              vae_device(), text_encoder_device())]
        facts["cpu"] = [cpu_mode(), is_device_cpu(get_torch_device()), cpu_state == CPUState.CPU,
                        vram_state == VRAMState.DISABLED, xformers_enabled(), should_use_fp16(),
                        isinstance(should_use_bf16(), bool), processing_interrupted()]
        facts["memory"] = [get_free_memory() > 0, get_total_memory() >= get_free_memory()]
        free_memory(0, get_torch_device())
        soft_empty_cache()
        facts["samplers"] = [SAMPLER_NAMES == comfy.samplers.KSampler.SAMPLERS, "euler" in SAMPLER_NAMES,
                             "karras" in SCHEDULER_NAMES]
        facts["args"] = [args.preview_method == LatentPreviewMethod.NoPreviews, args.cpu, args.disable_metadata]
        facts["io"] = [IO.ANY != "MODEL", IO.NUMBER != "INT", IO.IMAGE != "MASK", str(IO.LATENT)]
        facts["execution"] = [ExecutionResult.SUCCESS.value, CacheType.CLASSIC.name, full_type_name(ValueError)]
        facts["is_link"] = [is_link(["1", 0]), is_link("x")]
        facts["progress_bar"] = [PROGRESS_BAR_ENABLED, ProgressBar is comfy.utils.ProgressBar]
        set_progress_bar_enabled(True)
        cond = conditioning_set_values([[torch.zeros(1), {"a": 1}]], {"strength": 0.5})
        facts["conditioning"] = sorted(cond[0][1])
        facts["helpers"] = [hasher()().name,
                            str(string_to_torch_dtype("bf16")),
                            list(image_alpha_fix(torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 2, 3))[1].shape),
                            pillow(lambda v: v + 1, 1)]
        facts["mappings"] = ["KSampler" in ALL_NODE_CLASS_MAPPINGS, "SurfaceReport" in ALL_NODE_CLASS_MAPPINGS,
                             ALL_NODE_CLASS_MAPPINGS["SaveImage"] is SaveImage,
                             nodes.NODE_CLASS_MAPPINGS["ImageCrop"] is ImageCrop,
                             ALL_NODE_DISPLAY_NAME_MAPPINGS.get("KSamplerAdvanced"),
                             ALL_NODE_DISPLAY_NAME_MAPPINGS.get("SurfaceReport")]
        facts["extras"] = [SolidMask.__name__, InvertMask.__name__, MaskToImage.__name__, ImageToMask.__name__,
                           ImageCompositeMasked.__name__, Blur.__name__, Sharpen.__name__, ImageRebatch.__name__,
                           Int.__name__, String.__name__]
        facts["folders"] = {
            "output": get_output_directory(), "input": get_input_directory(), "temp": get_temp_directory(),
            "user": get_user_directory(), "models_dir": folder_paths.models_dir,
            "base_path": folder_paths.base_path, "output_directory": folder_paths.output_directory,
            "by_type": get_directory_by_type("output"),
            "checkpoints": get_folder_paths("checkpoints"),
            "checkpoint_list": list(get_filename_list("checkpoints")),
            "full_path": get_full_path("checkpoints", "nothing.safetensors"),
            "legacy": [map_legacy("unet"), "clip" in folder_names_and_paths],
            "annotated": list(annotated_filepath("a.png [output]")),
            "annotated_path": get_annotated_filepath("b.png [temp]"),
            "annotated_exists": exists_annotated_filepath("missing.png"),
            "extensions": filter_files_extensions(["a.PT", "b.txt", "c.safetensors"], supported_pt_extensions),
            "content": filter_files_content_types(["a.png", "b.mp4", "c.txt", "d.wav"], ["image", "audio"]),
            "search": sorted(recursive_search(get_folder_paths("checkpoints")[0])[0]),
            "save": list(get_save_image_path("sub/pic_%width%", get_output_directory(), 32, 16))[1:],
        }
        try:
            get_full_path_or_raise("checkpoints", "nothing.safetensors")
        except FileNotFoundError as exc:
            facts["raise"] = str(exc)
        return {"ui": {"facts": [facts]}}


class SaveViaNodes(SaveImage):
    """`from nodes import SaveImage`, subclassed as packs do: saves into the server's output folder."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "comfy_style"})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    CATEGORY = "comfy_style"


class ProgressSteps:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"steps": ("INT", {"default": 5, "min": 1, "max": 100})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "comfy_style"

    def run(self, steps):
        bar = comfy.utils.ProgressBar(steps)
        for _ in range(steps):
            time.sleep(0.01)
            bar.update(1)
        return (steps,)


class WaitForInterrupt:
    """Loops until /interrupt (checked with comfy.model_management), at most 60 s."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "comfy_style"

    def run(self, value):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            comfy.model_management.throw_exception_if_processing_interrupted()
            time.sleep(0.01)
        return (value,)


class SurfaceCheckpointLoader:
    """A loader of the kind packs write: a combo from folder_paths, comfy.sd to load."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": (folder_paths.get_filename_list("checkpoints"),)}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "comfy_style"

    def load(self, ckpt_name):
        model, clip, vae, clip_vision = load_checkpoint_guess_config(
            folder_paths.get_full_path_or_raise("checkpoints", ckpt_name), output_vae=True, output_clip=True)
        assert isinstance(model, ModelPatcher) and isinstance(model, comfy.model_patcher.ModelPatcher)
        assert isinstance(vae, comfy.sd.VAE) and isinstance(clip, comfy.sd.CLIP) and clip_vision is None
        return model, clip, vae


class SurfaceSampler:
    """Samples with nodes.common_ksampler and again with comfy.sample.sample (same seed): both must agree."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",), "positive": ("CONDITIONING",), "negative": ("CONDITIONING",),
            "latent_image": ("LATENT",), "seed": ("INT", {"default": 0}), "steps": ("INT", {"default": 2}),
            "sampler_name": (comfy.samplers.KSampler.SAMPLERS,), "scheduler": (comfy.samplers.KSampler.SCHEDULERS,),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    CATEGORY = "comfy_style"
    OUTPUT_NODE = True

    def sample(self, model, positive, negative, latent_image, seed, steps, sampler_name, scheduler):
        (first,) = common_ksampler(model, seed, steps, 7.0, sampler_name, scheduler, positive, negative,
                                   latent_image, denoise=1.0)
        latent = fix_empty_latent_channels(model, latent_image["samples"])
        noise = prepare_noise(latent, seed, latent_image.get("batch_index"))
        x0 = {}
        callback = prepare_callback(model, steps, x0)
        second = sample(model, noise, steps, 7.0, sampler_name, scheduler, positive, negative, latent,
                        denoise=1.0, callback=callback, seed=seed)
        sigmas = calculate_sigmas(model.model_sampling, scheduler, steps)
        facts = {"same": bool(torch.allclose(first["samples"], second, atol=1e-5)),
                 "sigmas": len(sigmas), "x0": list(x0["x0"].shape), "previewer": get_previewer() is None}
        return {"ui": {"facts": [facts]}, "result": (first,)}


NODE_CLASS_MAPPINGS = {
    "SurfaceReport": SurfaceReport,
    "SaveViaNodes": SaveViaNodes,
    "ProgressSteps": ProgressSteps,
    "WaitForInterrupt": WaitForInterrupt,
    "SurfaceCheckpointLoader": SurfaceCheckpointLoader,
    "SurfaceSampler": SurfaceSampler,
}
NODE_DISPLAY_NAME_MAPPINGS = {"SurfaceReport": "Surface Report (comfy style)"}
