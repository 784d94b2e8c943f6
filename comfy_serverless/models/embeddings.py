"""Textual-inversion embeddings from models/embeddings, for `embedding:name` in prompts.

File layouts found in the wild, all accepted (.safetensors, or .pt/.bin read with torch's safe loader):
  a single tensor                          {"<anything>": [n, dim]}
  Automatic1111 .pt                        {"string_to_param": {"*": [n, dim]}, ...}
  older trainers                           {"emb_params": [n, dim]}
  SDXL (one tensor per text encoder)       {"clip_l": [n, 768], "clip_g": [n, 1280]}
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

EXTENSIONS = (".safetensors", ".pt", ".bin", ".pth")


def read_embedding_file(path: str) -> dict:
    """The file's top-level entries (a bare tensor becomes {"": tensor})."""
    import torch

    if path.lower().endswith(".safetensors"):
        from safetensors.torch import load_file

        return dict(load_file(path, device="cpu"))
    data = torch.load(path, map_location="cpu", weights_only=True)
    if torch.is_tensor(data):
        return {"": data}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not an embedding (a {type(data).__name__})")
    return data


def pick_vectors(data: dict, key: str):
    """The [n, dim] tensor of an embedding file meant for the encoder called `key` (clip_l, clip_g, clip_h)."""
    import torch

    if isinstance(data.get("string_to_param"), dict):
        found = next(iter(data["string_to_param"].values()), None)
    elif key in data:
        found = data[key]
    elif "emb_params" in data:
        found = data["emb_params"]
    else:
        tensors = [value for value in data.values() if torch.is_tensor(value)]
        found = tensors[0] if tensors else None
    if found is None:
        return None
    found = found.detach().float()
    return found.reshape(-1, found.shape[-1]) if found.ndim != 1 else found.unsqueeze(0)


class EmbeddingFinder:
    """Looks embeddings up by the name written in the prompt (with or without extension), caching files."""

    def __init__(self, resolve):
        self._resolve = resolve  # relative name -> absolute path or None
        self._files: dict[str, tuple[int, dict]] = {}

    def path_for(self, name: str) -> str | None:
        candidates = [name] + [name + ext for ext in EXTENSIONS if not name.lower().endswith(ext)]
        for candidate in candidates:
            path = self._resolve(candidate)
            if path is not None:
                return path
        return None

    def find(self, name: str, key: str):
        path = self.path_for(name)
        if path is None:
            return None
        try:
            mtime = os.stat(path).st_mtime_ns
            cached = self._files.get(path)
            if cached is None or cached[0] != mtime:
                cached = (mtime, read_embedding_file(path))
                self._files[path] = cached
            return pick_vectors(cached[1], key)
        except Exception as exc:  # a broken file must not fail the prompt: ComfyUI warns and ignores it
            log.warning("could not read embedding %s: %s", path, exc)
            return None


def embeddings_from_folders() -> EmbeddingFinder:
    from .. import paths

    return EmbeddingFinder(lambda name: paths.current().model_path("embeddings", name))
