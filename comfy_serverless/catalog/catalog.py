"""The node catalogue the front works from: specs for validation, `/object_info` bytes, lazy class loading."""

from __future__ import annotations

import json

from .. import paths
from . import packs
from .describe import FILES_MARKER

BACKEND_PACK = "comfyui-backend"  # the pack of every node the ComfyUI backend runs (--comfyui, --comfyui-url)


class NodeSpec:
    """What is known about a node class from the snapshot, without importing it."""

    __slots__ = ("name", "info", "facts", "pack", "has_file_lists")

    def __init__(self, name: str, entry: dict):
        self.name = name
        self.info = entry["info"]
        self.facts = entry["exec"]
        self.pack = entry["pack"]
        # the backend's combos are concrete lists (its own files): nothing to fill from our folders
        self.has_file_lists = self.pack != BACKEND_PACK and f'"{FILES_MARKER}"' in json.dumps(self.info["input"])

    @property
    def on_backend(self) -> bool:
        """Runs on the ComfyUI backend, not in this process."""
        return self.pack == BACKEND_PACK

    @property
    def output_node(self) -> bool:
        return self.info["output_node"]

    @property
    def return_types(self) -> list:
        return self.info["output"]

    @property
    def output_is_list(self) -> list:
        return self.info["output_is_list"]

    def input_types(self, folders) -> dict:
        """INPUT_TYPES as declared, with disk-backed combo lists read now."""
        raw = self.info["input"]
        return fill_file_lists(raw, folders) if self.has_file_lists else raw


def fill_file_lists(value, folders):
    if isinstance(value, dict):
        if FILES_MARKER in value and set(value) <= {FILES_MARKER, "before", "after"}:
            return value.get("before", []) + list(folders.file_list(value[FILES_MARKER])) + value.get("after", [])
        return {k: fill_file_lists(v, folders) for k, v in value.items()}
    if isinstance(value, list):
        return [fill_file_lists(v, folders) for v in value]
    return value


def backend_entry(info) -> dict | None:
    """A snapshot entry for a node of the backend's /object_info, or None when the entry is unusable."""
    if not isinstance(info, dict) or not isinstance(info.get("input"), dict) or not isinstance(
            info.get("output"), list):
        return None
    info = dict(info)
    info.setdefault("output_is_list", [False] * len(info["output"]))
    info["output_node"] = bool(info.get("output_node"))
    return {"info": info, "exec": {}, "pack": BACKEND_PACK}


def apply_model_folders(folders, recorded: dict) -> None:
    """Puts the model folders packs registered (as the snapshot recorded them) into a server's registry, so
    /models, /models/<folder> and the packs' combos know them before (or without) importing the packs. An
    entry is replaced whole: the recorded one is what the registry became after the import did its edits."""
    for name, entry in recorded.items():
        if entry is None:
            folders.models.pop(name, None)
        elif isinstance(entry, (list, tuple)) and len(entry) == 2:
            dirs, exts = entry
            folders.models[name] = ([str(d) for d in dirs], tuple(str(e) for e in exts))


class Catalog:
    def __init__(self, snapshot: dict, backend_info: dict | None = None, prefer_backend: bool = False,
                 folders=None):
        """backend_info: the ComfyUI backend's /object_info, merged in; a name both have stays native unless
        prefer_backend. folders: the registry the packs' model folders go into (the current server's by
        default: a server makes its catalogues in its own threads)."""
        self.fingerprint = snapshot.get("fingerprint")
        self.model_folders: dict = snapshot.get("model_folders") or {}
        if self.model_folders:
            apply_model_folders(folders if folders is not None else paths.current(), self.model_folders)
        self.specs = {name: NodeSpec(name, entry) for name, entry in snapshot["nodes"].items()}
        self.backend_nodes = 0
        self.backend_names = frozenset(backend_info or ())  # every node the backend has, native twins included
        for name, info in (backend_info or {}).items():
            if name in self.specs and not prefer_backend:
                continue
            entry = backend_entry(info)
            if entry is not None:
                self.specs[name] = NodeSpec(name, entry)
                self.backend_nodes += 1
        self.routes: dict[str, list] = snapshot.get("routes") or {}  # pack ref -> HTTP routes it registers
        # Pre-rendered `"name": {...}` fragments; nodes with disk-backed combos are rendered per request.
        self._static: dict[str, str] = {}
        self._dynamic: set[str] = set()
        for name, spec in self.specs.items():
            if spec.on_backend:
                continue  # rendered on first use: a large ComfyUI catalogue stays off the path to listening
            text = json.dumps(spec.info)
            if f'"{FILES_MARKER}"' in text:
                self._dynamic.add(name)
            else:
                self._static[name] = f"{json.dumps(name)}: {text}"

    def __contains__(self, name) -> bool:
        return name in self.specs

    def __len__(self) -> int:
        return len(self.specs)

    def spec(self, name: str) -> NodeSpec | None:
        return self.specs.get(name)

    def _fragment(self, name: str, folders) -> str:
        if name in self._static:
            return self._static[name]
        if self.specs[name].on_backend:
            self._static[name] = fragment = f"{json.dumps(name)}: {json.dumps(self.specs[name].info)}"
            return fragment
        info = fill_file_lists(self.specs[name].info, folders)
        return f"{json.dumps(name)}: {json.dumps(info)}"

    def object_info_json(self, folders, only: str | None = None) -> bytes:
        names = [only] if only is not None else list(self.specs)
        names = [n for n in names if n in self.specs]
        return ("{" + ", ".join(self._fragment(n, folders) for n in names) + "}").encode()

    def load_class(self, name: str):
        """The node class itself; imports its pack on first use (heavy: call off the event loop)."""
        spec = self.specs[name]
        if spec.on_backend:
            raise RuntimeError(f"node {name} runs on the ComfyUI backend, not in this process")
        pack = packs.import_pack(spec.pack)
        if pack is None or name not in pack.classes:
            raise RuntimeError(f"node {name} could not be loaded from {spec.pack}")
        return pack.classes[name]

    def is_loaded(self, name: str) -> bool:
        spec = self.specs.get(name)
        return spec is not None and not spec.on_backend and packs.is_imported(spec.pack)

    def missing_on_backend(self, prompt) -> list[tuple[str, str]]:
        """(node id, class_type) of the nodes the backend lacks, in a prompt that must run there."""
        return [(node_id, node["class_type"]) for node_id, node in prompt.items()
                if node["class_type"] not in self.backend_names]

    def needs_backend(self, prompt) -> bool:
        """True when some node of a (validated) prompt runs on the ComfyUI backend."""
        if not isinstance(prompt, dict):
            return False
        for node in prompt.values():
            spec = self.specs.get(node.get("class_type")) if isinstance(node, dict) else None
            if spec is not None and spec.on_backend:
                return True
        return False
