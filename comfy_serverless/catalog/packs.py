"""Finding and importing node packs: the built-in ones and ComfyUI-style custom node folders.

A pack is a module exposing `NODE_CLASS_MAPPINGS` (and optionally `NODE_DISPLAY_NAME_MAPPINGS`), the V1
protocol custom nodes written for ComfyUI use, or else a `comfy_entrypoint()` (sync or async) returning a V3
`ComfyExtension` whose `get_node_list()` names V3 node classes. V3 classes, from either place, are turned into
V1 classes by v3.adapt. Importing is the expensive part of a cold start, so nothing here runs at server start
unless the warm-up policy asks for it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import importlib
import importlib.util
import inspect
import logging
import os
import sys
import threading
import traceback
from dataclasses import dataclass, field

from . import v3

log = logging.getLogger(__name__)

BUILTIN_PACKS = (
    "comfy_serverless.nodes.primitives",
    "comfy_serverless.nodes.images",
    "comfy_serverless.nodes.masks",
    "comfy_serverless.nodes.image_files",
    "comfy_serverless.nodes.loaders",
    "comfy_serverless.nodes.conditioning",
    "comfy_serverless.nodes.latents",
    "comfy_serverless.nodes.sampling_nodes",
    "comfy_serverless.nodes.vae_nodes",
    "comfy_serverless.nodes.mask_ops",
    "comfy_serverless.nodes.image_ops",
    "comfy_serverless.nodes.image_transform",
    "comfy_serverless.nodes.image_filters",
    "comfy_serverless.nodes.image_saving",
    "comfy_serverless.nodes.strings",
    "comfy_serverless.nodes.latent_ops",
    "comfy_serverless.nodes.custom_sampling",
    "comfy_serverless.nodes.custom_sampling_samplers",
    "comfy_serverless.nodes.custom_sampling_schedulers",
    "comfy_serverless.nodes.controlnet_nodes",
    "comfy_serverless.nodes.upscale_nodes",
    "comfy_serverless.nodes.clip_vision_nodes",
    "comfy_serverless.nodes.model_patches",
    "comfy_serverless.nodes.model_merging",
    "comfy_serverless.nodes.sdxl_nodes",
    "comfy_serverless.nodes.gligen_nodes",
    "comfy_serverless.nodes.model_sampling_extra",
    "comfy_serverless.nodes.loaders_extra",
    "comfy_serverless.nodes.training_data",
    "comfy_serverless.nodes.websocket_save",
    "comfy_serverless.nodes.lora_extract_nodes",
    "comfy_serverless.nodes.guidance_extra",
    "comfy_serverless.nodes.hook_nodes",
    "comfy_serverless.nodes.unclip_loader",
    "comfy_serverless.nodes.differential_diffusion",
    "comfy_serverless.nodes.upscale_diffusion",
    "comfy_serverless.nodes.loaders_deprecated",
    "comfy_serverless.nodes.debug_model_nodes",
    "comfy_serverless.nodes.webcam",
    "comfy_serverless.nodes.photomaker_nodes",
)


@dataclass
class Pack:
    ref: str  # "builtin:<module>" or "custom:<absolute path>"
    classes: dict = field(default_factory=dict)
    display_names: dict = field(default_factory=dict)
    python_module: str = "nodes"
    routes: list = field(default_factory=list)  # HTTP routes it registered: [method or "STATIC", path, under /api]

    @property
    def is_builtin(self) -> bool:
        return self.ref.startswith("builtin:")


def custom_pack_paths(custom_node_dirs: list[str], disable_all: bool, whitelist=()) -> list[str]:
    """Every .py file and package directly inside the custom_nodes folders, in load order."""
    allowed = set(whitelist or ())
    found = []
    for folder in custom_node_dirs:
        try:
            entries = sorted(os.listdir(folder))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in entries:
            path = os.path.join(folder, name)
            if name.startswith(".") or name == "__pycache__" or name.endswith(".disabled"):
                continue
            if os.path.isdir(path):
                if not os.path.isfile(os.path.join(path, "__init__.py")):
                    continue
                stem = name
            elif name.endswith(".py"):
                stem = name[:-3]
            else:
                continue
            if disable_all and stem not in allowed:
                continue
            found.append(path)
    return found


def _import_custom(path: str):
    """Imports a custom node file or package under its own name, as ComfyUI does."""
    is_package = os.path.isdir(path)
    name = os.path.basename(path.rstrip(os.sep))
    name = name if is_package else name[:-3]
    location = os.path.join(path, "__init__.py") if is_package else path
    spec = importlib.util.spec_from_file_location(
        name, location, submodule_search_locations=[path] if is_package else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module, name


_import_lock = threading.RLock()
_imported: dict[str, Pack | None] = {}
_routes_of_import: contextvars.ContextVar[list | None] = contextvars.ContextVar("pack_routes_seen", default=None)


def note_route(method: str, path: str, api_alias: bool) -> None:
    """Records an HTTP route the pack being imported registers (server/pack_routes.py calls this). The catalogue
    snapshot keeps them, so a lazy server can serve a pack's route before anything else imported the pack."""
    routes = _routes_of_import.get()
    if routes is not None:
        routes.append([method, path, api_alias])


def route_table(refs: list[str]) -> dict[str, list]:
    """ref -> the routes of each imported pack that registered any (for the catalogue snapshot)."""
    table = {}
    for ref in refs:
        pack = _imported.get(ref)
        if pack is not None and pack.routes:
            table[ref] = [list(route) for route in pack.routes]
    return table


def import_pack(ref: str) -> Pack | None:
    """Imports one pack once (thread-safe); a pack that fails is logged with its traceback and skipped."""
    with _import_lock:
        if ref in _imported:
            return _imported[ref]
        kind, _, target = ref.partition(":")
        routes: list = []
        token = _routes_of_import.set(routes)
        try:
            if kind == "builtin":
                module, python_module = importlib.import_module(target), "nodes"
            else:
                from . import comfy_modules  # ComfyUI's module names (folder_paths, nodes, comfy...)

                comfy_modules.install()
                with comfy_modules.recording() as touched:
                    module, name = _import_custom(target)
                if touched:
                    log.warning("pack %s uses ComfyUI names this server lacks: %s", name,
                                ", ".join(comfy_modules.summarize(touched)))
                python_module = f"custom_nodes.{name}"
            classes = _node_classes(module, target)
            if not classes:
                log.warning("node pack %s has no NODE_CLASS_MAPPINGS (nor comfy_entrypoint nodes); skipped", target)
            pack = Pack(ref, classes, dict(getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", None) or {}),
                        python_module, routes)
            if kind == "custom":
                for cls in classes.values():
                    if not getattr(cls, "RELATIVE_PYTHON_MODULE", None):
                        try:
                            cls.RELATIVE_PYTHON_MODULE = python_module
                        except (AttributeError, TypeError):
                            pass
        except Exception:
            log.error("cannot import node pack %s; skipped:\n%s", target, traceback.format_exc())
            pack = None
        finally:
            _routes_of_import.reset(token)
        _imported[ref] = pack
        return pack


def _node_classes(module, target: str) -> dict:
    """name -> V1 class: NODE_CLASS_MAPPINGS when the module has it (as ComfyUI, which then ignores
    comfy_entrypoint), else the nodes of its V3 extension. A V3 class that cannot describe itself is logged and
    left out; the rest of the pack still loads."""
    mapping = getattr(module, "NODE_CLASS_MAPPINGS", None)
    if mapping is not None:
        listed = list(dict(mapping).items())
    else:
        entrypoint = getattr(module, "comfy_entrypoint", None)
        listed = [(None, cls) for cls in _extension_nodes(entrypoint)] if callable(entrypoint) else []
    classes = {}
    for name, cls in listed:
        if not v3.is_v3(cls):
            classes[name] = cls
            continue
        try:
            adapter = v3.adapt(cls)
            classes[name if name is not None else v3.node_id(adapter)] = adapter
        except Exception:
            log.error("V3 node %s of pack %s cannot describe itself; left out:\n%s",
                      getattr(cls, "__name__", cls), target, traceback.format_exc())
    return classes


def _extension_nodes(entrypoint) -> list:
    """The node classes of a pack's V3 extension: comfy_entrypoint(), on_load(), get_node_list()."""

    async def collect():
        extension = entrypoint()
        if inspect.isawaitable(extension):
            extension = await extension
        on_load = getattr(extension, "on_load", None)
        if callable(on_load):
            loaded = on_load()
            if inspect.isawaitable(loaded):
                await loaded
        nodes = extension.get_node_list()
        if inspect.isawaitable(nodes):
            nodes = await nodes
        if not isinstance(nodes, (list, tuple)):
            raise TypeError(f"get_node_list() returned {type(nodes).__name__}, not a list of node classes")
        return list(nodes)

    return _run_coroutine(collect())


def _run_coroutine(coroutine):
    """Runs a pack's coroutine to completion from the importing thread. A thread whose event loop is running
    (the prompt worker imports packs lazily from inside one) hands it to a helper thread, context included."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pack-entrypoint") as pool:
        return pool.submit(contextvars.copy_context().run, asyncio.run, coroutine).result()


def is_imported(ref: str) -> bool:
    return ref in _imported


def all_pack_refs(custom_node_dirs: list[str], disable_all: bool, whitelist=()) -> list[str]:
    refs = [f"builtin:{m}" for m in BUILTIN_PACKS]
    refs += [f"custom:{p}" for p in custom_pack_paths(custom_node_dirs, disable_all, whitelist)]
    return refs


def import_all(refs: list[str]) -> dict[str, tuple[type, Pack]]:
    """Imports every pack; returns class name -> (class, pack). Built-in names can't be overridden."""
    classes: dict[str, tuple[type, Pack]] = {}
    for ref in refs:
        pack = import_pack(ref)
        if pack is None:
            continue
        for name, cls in pack.classes.items():
            existing = classes.get(name)
            if existing and existing[1].is_builtin and not pack.is_builtin:
                log.warning("custom node %s from %s ignored: a built-in node has that name", name, ref)
                continue
            classes[name] = (cls, pack)
    return classes
