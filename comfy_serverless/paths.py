"""Model folders and the input / output / temp directories, laid out as ComfyUI lays them out.

Light on purpose (stdlib only): the front lists files for combos and `/models` without importing a pack.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets

log = logging.getLogger(__name__)

MODEL_EXTENSIONS = (".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MODEL_FOLDERS = (
    "checkpoints", "configs", "loras", "vae", "text_encoders", "diffusion_models", "clip_vision",
    "style_models", "embeddings", "diffusers", "vae_approx", "controlnet", "gligen", "upscale_models",
    "custom_nodes", "hypernetworks", "photomaker", "classifiers", "model_patches", "audio_encoders",
)
# Older names still found in extra_model_paths.yaml files and custom nodes.
LEGACY_FOLDER_NAMES = {"clip": "text_encoders", "unet": "diffusion_models", "t2i_adapter": "controlnet"}
ANNOTATIONS = ("output", "input", "temp")
_ANNOTATION = re.compile(r"^(.*) \[(output|input|temp)\]$")


class FileList(list):
    """A combo list read from disk; the catalogue stores where it came from, not its contents.

    Packs build combos as `["None"] + folder_paths.get_filename_list("loras")` or insert/append to the list:
    such fixed items are remembered (`before`, `after`) so the combo stays live with them. Any other change
    (sorting, removing) makes it a plain list, frozen at catalogue time (`edited`).
    """

    def __init__(self, items, source: str, before: tuple = (), after: tuple = ()):
        super().__init__(items)
        self.source = source  # "models:<folder>", "models:diffusers_pipelines", "input:images" or "input:folders"
        self.before, self.after = tuple(before), tuple(after)
        self.edited = False

    def __add__(self, other):
        if isinstance(other, FileList) or not isinstance(other, (list, tuple)):
            return list(self) + list(other)
        return FileList(list(self) + list(other), self.source, self.before, self.after + tuple(other))

    def __radd__(self, other):
        if not isinstance(other, (list, tuple)):
            return NotImplemented
        return FileList(list(other) + list(self), self.source, tuple(other) + self.before, self.after)

    def insert(self, index, item):
        if index == 0 and not self.edited:
            self.before = (item,) + self.before
        else:
            self.edited = True
        super().insert(index, item)

    def append(self, item):
        self.after = self.after + (item,)
        super().append(item)

    def extend(self, items):
        items = list(items)
        self.after = self.after + tuple(items)
        super().extend(items)

    def __iadd__(self, items):
        self.extend(items)
        return self

    # Any other change: the list is no longer "the files plus fixed items".

    def remove(self, item):
        self.edited = True
        super().remove(item)

    def pop(self, index=-1):
        self.edited = True
        return super().pop(index)

    def sort(self, *args, **kwargs):
        self.edited = True
        super().sort(*args, **kwargs)

    def reverse(self):
        self.edited = True
        super().reverse()

    def clear(self):
        self.edited = True
        super().clear()

    def __setitem__(self, index, value):
        self.edited = True
        super().__setitem__(index, value)

    def __delitem__(self, index):
        self.edited = True
        super().__delitem__(index)


class Folders:
    """Where everything lives. One instance per server, configured from Settings."""

    @classmethod
    def from_settings(cls, settings) -> "Folders":
        folders = cls(settings.base_dir, settings.input_dir, settings.output_dir, settings.temp_dir,
                      settings.user_dir)
        for yaml_path in settings.extra_model_paths_config or ():
            folders.load_extra_model_paths(yaml_path)
        return folders

    def __init__(self, base: str, input_dir: str, output_dir: str, temp_dir: str, user_dir: str):
        self.base = base
        self.input = input_dir
        self.output = output_dir
        self.temp = temp_dir
        self.user = user_dir
        self.models: dict[str, tuple[list[str], tuple[str, ...]]] = {}
        for name in MODEL_FOLDERS:
            leaf = "custom_nodes" if name == "custom_nodes" else os.path.join("models", name)
            exts = () if name == "custom_nodes" else (".yaml",) if name == "configs" else MODEL_EXTENSIONS
            self.models[name] = ([os.path.join(base, leaf)], exts)

    # -- model folders -------------------------------------------------------------------------
    @staticmethod
    def canonical(name: str) -> str:
        return LEGACY_FOLDER_NAMES.get(name, name)

    def add_model_path(self, folder: str, path: str, first: bool = False) -> None:
        folder = self.canonical(folder)
        dirs, exts = self.models.setdefault(folder, ([], MODEL_EXTENSIONS))
        if path in dirs:
            dirs.remove(path)
        dirs.insert(0, path) if first else dirs.append(path)

    def model_dirs(self, folder: str) -> list[str]:
        return list(self.models[self.canonical(folder)][0])

    def list_models(self, folder: str) -> FileList:
        """Relative paths ('/' separated, sorted) of the files in every directory of a model folder."""
        folder = self.canonical(folder)
        dirs, exts = self.models[folder]
        found: set[str] = set()
        for root in dirs:
            for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                rel_dir = os.path.relpath(dirpath, root)
                for name in filenames:
                    if exts and not name.lower().endswith(exts):
                        continue
                    rel = name if rel_dir == "." else os.path.join(rel_dir, name)
                    found.add(rel.replace(os.sep, "/"))
        return FileList(sorted(found), f"models:{folder}")

    def diffusers_pipelines(self) -> FileList:
        """Every folder under models/diffusers holding a model_index.json ('/' separated, sorted): DiffusersLoader's
        combo."""
        found: set[str] = set()
        for root in self.model_dirs("diffusers"):
            for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                rel = os.path.relpath(dirpath, root)
                if "model_index.json" in filenames and rel != ".":
                    found.add(rel.replace(os.sep, "/"))
        return FileList(sorted(found), "models:diffusers_pipelines")

    def model_path(self, folder: str, relative: str) -> str | None:
        """Absolute path of a listed model file, or None; never leaves the folder's directories."""
        for root in self.model_dirs(folder):
            candidate = safe_join(root, relative)
            if candidate and os.path.isfile(candidate):
                return candidate
        return None

    def load_extra_model_paths(self, yaml_path: str) -> None:
        """Reads ComfyUI's extra_model_paths.yaml format (a `custom_nodes` key adds node pack folders)."""
        import yaml  # only when a config is given: keeps PyYAML off the cold-start path

        with open(yaml_path, encoding="utf-8") as fh:
            config = yaml.safe_load(fh) or {}
        yaml_dir = os.path.dirname(os.path.abspath(yaml_path))
        for section in config.values():
            if not isinstance(section, dict):
                continue
            base = section.get("base_path")
            base = os.path.join(yaml_dir, os.path.expanduser(base)) if base else yaml_dir
            first = bool(section.get("is_default"))
            for key, value in section.items():
                if key in ("base_path", "is_default") or value is None:
                    continue
                for line in str(value).splitlines():
                    line = line.strip()
                    if not line:
                        continue
                    full = os.path.normpath(os.path.join(base, os.path.expanduser(line)))
                    self.add_model_path(key, full, first=first)
                    log.info("extra model path: %s -> %s", key, full)

    # -- input / output / temp -----------------------------------------------------------------
    def directory_for(self, kind: str) -> str | None:
        return {"input": self.input, "output": self.output, "temp": self.temp}.get(kind)

    def input_images(self) -> FileList:
        """Top-level image files of the input directory (LoadImage's combo)."""
        try:
            names = [e.name for e in os.scandir(self.input) if e.is_file()]
        except FileNotFoundError:
            names = []
        images = (n for n in names if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith("."))
        return FileList(sorted(images), "input:images")

    def input_folders(self) -> FileList:
        """Every subfolder of the input directory, nested ones too ('/' separated, sorted): the training-data
        loaders' combo."""
        found = []
        for dirpath, dirnames, _ in os.walk(self.input, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = os.path.relpath(dirpath, self.input)
            if rel != ".":
                found.append(rel.replace(os.sep, "/"))
        return FileList(sorted(found), "input:folders")

    def resolve_annotated(self, name: str, default_kind: str = "input") -> str:
        """'sub/x.png [output]' -> absolute path under the output directory (not checked for existence)."""
        match = _ANNOTATION.match(name)
        kind, name = (match.group(2), match.group(1)) if match else (default_kind, name)
        root = self.directory_for(kind)
        if root is None:
            raise ValueError(f"Invalid file path: {name!r}: no {kind!r} directory (input, output or temp)")
        path = safe_join(root, name)
        if path is None:
            raise ValueError(f"Invalid file path: {name!r} leaves the {kind} directory")
        return path

    def annotated_exists(self, name: str, default_kind: str = "input") -> bool:
        try:
            return os.path.isfile(self.resolve_annotated(name, default_kind))
        except ValueError:
            return False

    def file_list(self, source: str) -> list[str]:
        kind, _, what = source.partition(":")
        if source == "models:diffusers_pipelines":
            return self.diffusers_pipelines()
        if kind == "models" and self.canonical(what) in self.models:
            return self.list_models(what)
        if source == "input:images":
            return self.input_images()
        if source == "input:folders":
            return self.input_folders()
        return []


def safe_join(root: str, relative: str) -> str | None:
    """root/relative, or None when the result would escape root ('..', absolute paths).

    Symbolic links inside root are followed on purpose: model folders are often links to a volume.
    """
    if relative is None or "\x00" in relative:
        return None
    root_abs = os.path.abspath(root)
    joined = os.path.normpath(os.path.join(root_abs, relative))
    if joined != root_abs and not joined.startswith(root_abs + os.sep):
        return None
    return joined


@contextlib.contextmanager
def atomic_path(path: str):
    """Yields a hidden temporary path beside `path`, renamed onto it only when the block succeeds.

    Readers (lists, /view, LoadImage) never see a half-written file, even when the disk fills up.
    """
    directory, name = os.path.split(path)
    temporary = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.part")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def is_inside(root: str, path: str, follow_links: bool = True) -> bool:
    """Whether `path` lies under `root`; with follow_links, where its symbolic links lead counts."""
    if follow_links:
        root, path = os.path.realpath(root), os.path.realpath(path)
    else:
        root, path = os.path.abspath(root), os.path.abspath(path)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def configure(settings) -> Folders:
    """Folders and settings for code that runs outside a server (tools, scripts, unit tests).

    A server never calls this: it owns a `context.ServerContext` and activates it in its own threads.
    """
    from . import context

    return context.use_as_fallback(context.ServerContext(settings)).folders


def current() -> Folders:
    """The current server's folders; node packs call this to find inputs, outputs and models."""
    from . import context

    return context.current().folders
