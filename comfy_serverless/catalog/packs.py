"""Finding and importing node packs: the built-in ones and ComfyUI-style custom node folders.

A pack is a module exposing `NODE_CLASS_MAPPINGS` (and optionally `NODE_DISPLAY_NAME_MAPPINGS`), the V1
protocol custom nodes written for ComfyUI use. Importing is the expensive part of a cold start, so nothing
here runs at server start unless the warm-up policy asks for it.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import threading
import traceback
from dataclasses import dataclass, field

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
)


@dataclass
class Pack:
    ref: str  # "builtin:<module>" or "custom:<absolute path>"
    classes: dict = field(default_factory=dict)
    display_names: dict = field(default_factory=dict)
    python_module: str = "nodes"

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


def import_pack(ref: str) -> Pack | None:
    """Imports one pack once (thread-safe); a pack that fails is logged with its traceback and skipped."""
    with _import_lock:
        if ref in _imported:
            return _imported[ref]
        kind, _, target = ref.partition(":")
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
            classes = dict(getattr(module, "NODE_CLASS_MAPPINGS", None) or {})
            if not classes:
                log.warning("node pack %s has no NODE_CLASS_MAPPINGS; skipped", target)
            pack = Pack(ref, classes, dict(getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", None) or {}),
                        python_module)
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
        _imported[ref] = pack
        return pack


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
