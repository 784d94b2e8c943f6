"""The node catalogue as data: built once by importing every pack, stored as JSON with a fingerprint.

At start the server reads the JSON (milliseconds) instead of importing packs (seconds), checks the
fingerprint against the pack files on disk, and rebuilds in the background when they changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import traceback

from . import describe, packs

log = logging.getLogger(__name__)

# 2: "routes", the HTTP routes each pack registers (server/pack_routes.py serves them lazily)
# 3: "model_folders", the model folders packs register (catalog.Catalog applies them to the front's registry)
FORMAT = 3
# The server-context slot where folder_paths notes each model folder a pack set or changed (a set of names).
PACK_FOLDERS_SLOT = "pack_model_folders"
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NODES_DIR = os.path.join(_PACKAGE_DIR, "nodes")
# ComfyUI's module names that custom packs import: what they answer (file lists, type names) can change a
# pack's description, so an edited adapter rebuilds the catalogue of a server that has custom packs.
_COMFY_MODULES_DIR = os.path.join(_PACKAGE_DIR, "comfy_modules")


def _stat_line(path: str) -> str:
    try:
        st = os.stat(path)
        return f"{path}|{st.st_size}|{st.st_mtime_ns}"
    except OSError:
        return f"{path}|missing"


def _python_files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    files = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return files


def fingerprint(refs: list[str]) -> str:
    """Changes whenever a pack is added, removed or edited (sizes and mtimes of its .py files)."""
    from .. import __version__

    lines = [f"format={FORMAT}", f"version={__version__}"]
    lines += [_stat_line(p) for p in _python_files(_NODES_DIR)]
    if any(ref.startswith("custom:") for ref in refs):
        lines += [_stat_line(p) for p in _python_files(_COMFY_MODULES_DIR)]
    for ref in refs:
        lines.append(ref)
        if ref.startswith("custom:"):
            lines += [_stat_line(p) for p in _python_files(ref[len("custom:"):])]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def describe_classes(classes: dict) -> tuple[dict, list]:
    """name -> {info, exec, pack}; classes whose description raises are logged and left out."""
    nodes, failed = {}, []
    for name, (cls, pack) in classes.items():
        try:
            nodes[name] = {
                "info": describe.public_info(cls, name, pack.display_names.get(name, name), pack.python_module),
                "exec": describe.execution_facts(cls),
                "pack": pack.ref,
            }
        except Exception:
            log.error("node %s cannot describe itself; left out:\n%s", name, traceback.format_exc())
            failed.append(name)
    return nodes, failed


def pack_model_folders(server_context=None) -> dict:
    """{folder: [directories, extensions]} of every model folder the packs imported by this server (the current
    one by default) set or changed through folder_paths; None for a folder a pack deleted."""
    from .. import context

    server_context = server_context or context.current()
    registry = server_context.folders.models
    recorded = {}
    for name in sorted(server_context.slot(PACK_FOLDERS_SLOT, set)):
        entry = registry.get(name)
        recorded[name] = None if entry is None else [list(entry[0]), list(entry[1])]
    return recorded


def build(refs: list[str]) -> dict:
    started = time.monotonic()
    nodes, failed = describe_classes(packs.import_all(refs))
    return {"format": FORMAT, "fingerprint": fingerprint(refs), "built_in_s": round(time.monotonic() - started, 3),
            "nodes": nodes, "failed": failed, "routes": packs.route_table(refs),
            "model_folders": pack_model_folders()}


def save(snapshot: dict, path: str) -> None:
    """Writes a snapshot atomically. A node catalogue saved without "model_folders" (the warm-up builds its
    dict itself, right after importing the packs in this process) gets this server's pack folders."""
    if "nodes" in snapshot and "model_folders" not in snapshot:
        snapshot = {**snapshot, "model_folders": pack_model_folders()}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(snapshot, fh)
    os.replace(tmp, path)  # atomic: a server reading concurrently sees the old or the new file


def load(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as fh:
            snapshot = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("catalogue snapshot %s unreadable (%s); it will be rebuilt", path, exc)
        return None
    if not isinstance(snapshot, dict) or snapshot.get("format") != FORMAT:
        return None
    return snapshot


# -- the ComfyUI backend's part of the snapshot ------------------------------------------------------------
# Kept in its own file next to the native catalogue: the native part is rebuilt on its own (in a subprocess in
# lazy mode) and must never start ComfyUI, and the backend part is refreshed only when ComfyUI changes.
BACKEND_FORMAT = 1


def backend_path(catalog_file: str) -> str:
    root, ext = os.path.splitext(catalog_file)
    return f"{root}.comfyui{ext or '.json'}"


def comfyui_version(comfyui_dir: str) -> str | None:
    """The checkout's version as ComfyUI declares it (comfyui_version.py), read as text: nothing is imported."""
    import re

    try:
        with open(os.path.join(comfyui_dir, "comfyui_version.py"), encoding="utf-8") as fh:
            match = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", fh.read())
    except OSError:
        return None
    return match.group(1) if match else None


def comfyui_fingerprint(comfyui_dir: str | None, url: str | None) -> str:
    """Changes when the ComfyUI version or any of its custom_nodes files changes (sizes and mtimes), or when
    the backend is another URL. A running ComfyUI at a URL cannot be inspected: its URL stands for it."""
    if not comfyui_dir:
        return hashlib.sha256(f"format={BACKEND_FORMAT}\nurl={url}".encode()).hexdigest()
    comfyui_dir = os.path.abspath(comfyui_dir)
    lines = [f"format={BACKEND_FORMAT}", f"comfyui={comfyui_dir}", f"version={comfyui_version(comfyui_dir)}",
             _stat_line(os.path.join(comfyui_dir, "nodes.py"))]
    custom = os.path.join(comfyui_dir, "custom_nodes")
    try:
        packs_found = sorted(e.name for e in os.scandir(custom) if not e.name.startswith((".", "__")))
    except OSError:
        packs_found = []
    for name in packs_found:
        lines.append(f"pack={name}")
        lines += [_stat_line(p) for p in _python_files(os.path.join(custom, name))]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def load_backend(catalog_file: str) -> dict | None:
    """{"fingerprint", "version", "object_info", ...} or None when absent or unreadable."""
    path = backend_path(catalog_file)
    try:
        with open(path, encoding="utf-8") as fh:
            part = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ComfyUI catalogue snapshot %s unreadable (%s); it will be fetched again", path, exc)
        return None
    if not isinstance(part, dict) or part.get("format") != BACKEND_FORMAT or not isinstance(
            part.get("object_info"), dict):
        return None
    return part


def backend_part(fingerprint_value: str, version: str | None, object_info: dict, fetched_in_s: float) -> dict:
    return {"format": BACKEND_FORMAT, "fingerprint": fingerprint_value, "version": version,
            "fetched_in_s": round(fetched_in_s, 3), "object_info": object_info}
