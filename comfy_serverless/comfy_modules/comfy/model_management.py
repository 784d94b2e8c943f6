"""ComfyUI's `comfy.model_management` for custom node packs, on this CPU-only server.

Every device is the CPU; loading "to the GPU" does nothing (our model handles load themselves on first use and
live in the loaded-model cache, comfy_serverless/models/model_cache.py). Interrupts are the running server's
(comfy_serverless.progress): `throw_exception_if_processing_interrupted` raises the exception the engine reports
as `execution_interrupted`. Freeing memory unloads what the server's packs registered with comfy_serverless.memory.
"""

from __future__ import annotations

import enum
import gc
import os

from comfy_serverless import memory, progress, settings
from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.progress import InterruptProcessingException  # noqa: F401  (the engine's own class)


class VRAMState(enum.Enum):
    DISABLED = 0  # no VRAM: the CPU computes
    NO_VRAM = 1
    LOW_VRAM = 2
    NORMAL_VRAM = 3
    HIGH_VRAM = 4
    SHARED = 5


class CPUState(enum.Enum):
    GPU = 0
    CPU = 1
    MPS = 2


vram_state = VRAMState.DISABLED
set_vram_to = VRAMState.DISABLED
cpu_state = CPUState.CPU
XFORMERS_IS_AVAILABLE = False
XFORMERS_ENABLED_VAE = False
ENABLE_PYTORCH_ATTENTION = True
directml_enabled = False
current_loaded_models: list = []  # our loaded models live in comfy_serverless.models.model_cache


def __getattr__(name: str):
    """DISABLE_SMART_MEMORY is the current server's --disable-smart-memory; OOM_EXCEPTION imports torch."""
    if name == "DISABLE_SMART_MEMORY":
        return settings.current().disable_smart_memory
    if name == "OOM_EXCEPTION":
        import torch

        return torch.cuda.OutOfMemoryError
    return missing_attribute(__name__, name)



# -- devices ----------------------------------------------------------------------------------------------

def _cpu():
    import torch

    return torch.device("cpu")


def get_torch_device():
    return _cpu()


def intermediate_device():
    return _cpu()


def unet_offload_device():
    return _cpu()


def unet_inital_load_device(parameters=0, dtype=None):
    return _cpu()


def vae_device():
    return _cpu()


def vae_offload_device():
    return _cpu()


def text_encoder_device():
    return _cpu()


def text_encoder_offload_device():
    return _cpu()


def text_encoder_initial_device(load_device=None, offload_device=None, model_size=0):
    return _cpu()


def get_torch_device_name(device=None) -> str:
    return "cpu"


def get_autocast_device(device) -> str:
    return getattr(device, "type", "cpu")


def cpu_mode() -> bool:
    return True


def mps_mode() -> bool:
    return False


def is_device_type(device, kind: str) -> bool:
    return getattr(device, "type", device) == kind


def is_device_cpu(device) -> bool:
    return is_device_type(device, "cpu")


def is_device_mps(device) -> bool:
    return is_device_type(device, "mps")


def is_device_cuda(device) -> bool:
    return is_device_type(device, "cuda")


def is_directml_enabled() -> bool:
    return False


def is_intel_xpu() -> bool:
    return False


def is_nvidia() -> bool:
    return False


def is_amd() -> bool:
    return False


def xformers_enabled() -> bool:
    return False


def xformers_enabled_vae() -> bool:
    return False


def pytorch_attention_enabled() -> bool:
    return True


def pytorch_attention_enabled_vae() -> bool:
    return True


def pytorch_attention_flash_attention() -> bool:
    return False


def sage_attention_enabled() -> bool:
    return False


def flash_attention_enabled() -> bool:
    return False


def device_supports_non_blocking(device) -> bool:
    return False


def device_should_use_non_blocking(device) -> bool:
    return False


def supports_cast(device, dtype) -> bool:
    return True


def supports_dtype(device, dtype) -> bool:
    return True


def cast_to_device(tensor, device, dtype, copy: bool = False):
    return tensor.to(device=device, dtype=dtype, copy=copy)


# -- precision --------------------------------------------------------------------------------------------

def should_use_fp16(device=None, model_params=0, prioritize_performance=True, manual_cast=False) -> bool:
    """fp16 is emulated on CPUs (hundreds of times slower): only when --force-fp16 asks for it."""
    return bool(settings.current().force_fp16)


def should_use_bf16(device=None, model_params=0, prioritize_performance=True, manual_cast=False) -> bool:
    """Whether this server computes UNets in bf16 (flags first, else measured on this CPU)."""
    import torch

    from comfy_serverless.models.precision import unet_dtype

    return unet_dtype() == torch.bfloat16


def unet_dtype(device=None, model_params=0, supported_dtypes=None, weight_dtype=None):
    from comfy_serverless.models.precision import unet_dtype as ours

    return ours()


def text_encoder_dtype(device=None):
    from comfy_serverless.models.precision import text_encoder_dtype as ours

    return ours()


def vae_dtype(device=None, allowed_dtypes=()):
    from comfy_serverless.models.precision import vae_dtype as ours

    return ours()


def unet_manual_cast(weight_dtype, inference_device, supported_dtypes=()):
    return None


def dtype_size(dtype) -> int:
    import torch

    return torch.empty(0, dtype=dtype).element_size()


# -- memory -----------------------------------------------------------------------------------------------

def _meminfo(field: str) -> int:
    try:
        with open("/proc/meminfo", "rb") as fh:
            for line in fh:
                if line.startswith(field.encode() + b":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    pages = os.sysconf("SC_AVPHYS_PAGES" if field == "MemAvailable" else "SC_PHYS_PAGES")
    return pages * os.sysconf("SC_PAGE_SIZE")


def get_free_memory(dev=None, torch_free_too: bool = False):
    """Available RAM in bytes (the CPU's memory is the "device" memory here)."""
    free = _meminfo("MemAvailable")
    return (free, free) if torch_free_too else free


def get_total_memory(dev=None, torch_total_too: bool = False):
    total = _meminfo("MemTotal")
    return (total, total) if torch_total_too else total


# In MB, as ComfyUI has them; the CPU's memory is the "VRAM" here (packs size their tiles by it).
total_ram = get_total_memory() / (1024 * 1024)
total_vram = total_ram


def minimum_inference_memory() -> int:
    return 1024 * 1024 * 1024


def extra_reserved_memory() -> int:
    return 0


def free_memory(memory_required, device=None, keep_loaded=()) -> list:
    """Unloads the server's loaded models when less than memory_required bytes are available."""
    if get_free_memory() < memory_required:
        memory.unload_models()
        gc.collect()
    return []


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False) -> None:
    """Nothing to move: our models load on first use, in RAM."""


def load_model_gpu(model) -> None:
    """Nothing to move: our models load on first use, in RAM."""


def loaded_models(only_currently_used: bool = False) -> list:
    return []


def unload_all_models() -> None:
    memory.unload_models()


def unload_model_clones(model, unload_weights_only=True, force_unload=True) -> None:
    pass


def cleanup_models(keep_clone_weights_loaded: bool = False) -> None:
    pass


def cleanup_models_gc() -> None:
    gc.collect()


def soft_empty_cache(force: bool = False) -> None:
    """No GPU cache to empty here: collects garbage."""
    gc.collect()


def module_size(module) -> int:
    return sum(t.nelement() * t.element_size() for t in module.state_dict().values())


def archive_model_dtypes(model) -> None:
    pass


# -- interrupt --------------------------------------------------------------------------------------------

def interrupt_current_processing(value: bool = True) -> None:
    """Interrupts (or, with False, un-interrupts) the current server's running prompt."""
    if value:
        progress.request_interrupt()
    else:
        progress.clear_interrupt()


def processing_interrupted() -> bool:
    return progress.is_interrupted()


def throw_exception_if_processing_interrupted() -> None:
    """Raises InterruptProcessingException (and clears the flag) when /interrupt was called."""
    progress.throw_exception_if_processing_interrupted()
