"""File routes: uploads, `/view`, model lists (contract 1.3). Traversal is refused everywhere."""

from __future__ import annotations

import hashlib
import json
import mimetypes
import os

from ..paths import safe_join
from .http import Response, json_response
from .multipart import parse_multipart

FORCED_BINARY = {".html", ".htm", ".xhtml", ".js", ".mjs", ".css"}
_ANNOTATED = ((" [output]", "output"), (" [input]", "input"), (" [temp]", "temp"))


def _file_hash(path: str, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _inside(root: str, path: str) -> bool:
    root, path = os.path.abspath(root), os.path.abspath(path)
    return os.path.commonpath((root, path)) == root


def register_file_routes(router, app) -> None:
    folders = app.folders
    hashing = app.settings.default_hashing_function

    def save_upload(fields: dict, files: dict, transform=None):
        """Shared by /upload/image and /upload/mask; returns a Response."""
        image = files.get("image")
        if image is None or not image[0]:
            return Response(b"", 400)
        filename, data = image
        kind = fields.get("type") or "input"
        upload_dir = folders.directory_for(kind)
        if upload_dir is None:
            raise ValueError(f"unknown upload type {kind!r}")  # -> 500, as ComfyUI
        subfolder = fields.get("subfolder", "")
        target_dir = os.path.abspath(os.path.join(upload_dir, os.path.normpath(subfolder))) if subfolder \
            else os.path.abspath(upload_dir)
        path = os.path.abspath(os.path.join(target_dir, filename))
        if not _inside(upload_dir, target_dir) or not _inside(upload_dir, path) or \
                os.path.dirname(path) != target_dir:
            return Response(b"", 400)
        if transform is not None:
            data = transform(data)
        os.makedirs(target_dir, exist_ok=True)
        overwrite = fields.get("overwrite", "").lower() in ("true", "1")
        duplicate = False
        if not overwrite:
            stem, ext = os.path.splitext(filename)
            counter = 1
            while os.path.exists(path):
                if hashlib.new(hashing, data).hexdigest() == _file_hash(path, hashing):
                    duplicate = True
                    break
                filename = f"{stem} ({counter}){ext}"
                path = os.path.join(target_dir, filename)
                counter += 1
        if not duplicate:
            with open(path, "wb") as fh:
                fh.write(data)
        return json_response({"name": filename, "subfolder": subfolder, "type": kind})

    def form(request):
        try:
            return parse_multipart(request)
        except Exception:  # not multipart, or malformed: no image part -> 400, as ComfyUI
            return {}, {}

    async def upload_image(request):
        fields, files = form(request)
        return save_upload(fields, files)

    async def upload_mask(request):
        fields, files = form(request)
        try:
            ref = json.loads(fields.get("original_ref") or "")
            original_name = ref["filename"]
        except (ValueError, KeyError, TypeError):
            return Response(b"", 400)
        kind = ref.get("type") or "input"
        for suffix, annotated_kind in _ANNOTATED:
            if original_name.endswith(suffix):
                original_name, kind = original_name[: -len(suffix)], annotated_kind
        root = folders.directory_for(kind)
        original = safe_join(root, os.path.join(ref.get("subfolder") or "", original_name)) if root else None
        if original is None or not os.path.isfile(original):
            return Response(b"", 404)

        def merge_alpha(mask_bytes: bytes) -> bytes:
            from .images import apply_mask_alpha

            return apply_mask_alpha(original, mask_bytes)

        return save_upload(fields, files, transform=merge_alpha)

    async def view(request):
        q = request.query
        filename = q.get("filename")
        if filename is None:
            return Response(b"", 404)
        kind = q.get("type") or "output"
        for suffix, annotated_kind in _ANNOTATED:
            if filename.endswith(suffix):
                filename, kind = filename[: -len(suffix)], annotated_kind
        if not filename or filename.startswith("/") or ".." in filename:
            return Response(b"", 400)
        root = folders.directory_for(kind)
        if root is None:
            return Response(b"", 400)
        directory = os.path.abspath(root)
        subfolder = q.get("subfolder")
        if subfolder:
            directory = os.path.abspath(os.path.join(directory, subfolder))
            if not _inside(root, directory):
                return Response(b"", 403)
        filename = os.path.basename(filename)
        path = os.path.join(directory, filename)
        if not os.path.isfile(path):
            return Response(b"", 404)
        preview, channel = q.get("preview"), q.get("channel", "rgba")
        if preview or channel in ("rgb", "a"):
            from .images import render_view

            body, content_type = render_view(path, preview, channel)
            return Response(body, 200, content_type, [("Content-Disposition", f'filename="{filename}"')])
        ext = os.path.splitext(filename)[1].lower()
        content_type = "application/octet-stream" if ext in FORCED_BINARY else \
            (mimetypes.guess_type(filename)[0] or "application/octet-stream")
        with open(path, "rb") as fh:
            body = fh.read()
        return Response(body, 200, content_type, [("Content-Disposition", f'filename="{filename}"')])

    async def view_metadata(request):
        folder = request.match_info["folder_name"]
        filename = request.query.get("filename")
        if not filename or not filename.endswith(".safetensors") or folders.canonical(folder) not in folders.models:
            return Response(b"", 404)
        path = folders.model_path(folder, filename)
        if path is None:
            return Response(b"", 404)
        metadata = _safetensors_metadata(path)
        if metadata is None:
            return Response(b"", 404)
        return json_response(metadata)

    async def list_model_folders(request):
        return json_response(list(folders.models))

    async def list_models(request):
        folder = request.match_info["folder"]
        if folder not in folders.models:
            return Response(b"", 404)
        return json_response(list(folders.list_models(folder)))

    async def embeddings(request):
        return json_response([os.path.splitext(name)[0] for name in folders.list_models("embeddings")])

    async def internal_folder_paths(request):
        return json_response({name: dirs for name, (dirs, _) in folders.models.items()})

    async def internal_files(request):
        root = folders.directory_for(request.match_info["kind"])
        if root is None:
            return json_response({"error": "Invalid directory type"}, 400)
        try:
            entries = [e for e in os.scandir(root) if e.is_file()]
        except FileNotFoundError:
            entries = []
        entries.sort(key=lambda e: e.stat().st_mtime, reverse=True)
        return json_response([e.name for e in entries])

    router.add("POST", "/upload/image", upload_image)
    router.add("POST", "/upload/mask", upload_mask)
    router.add("GET", "/view", view)
    router.add("GET", "/view_metadata/{folder_name}", view_metadata)
    router.add("GET", "/models", list_model_folders)
    router.add("GET", "/models/{folder}", list_models)
    router.add("GET", "/embeddings", embeddings)
    router.add("GET", "/internal/folder_paths", internal_folder_paths, api_alias=False)
    router.add("GET", "/internal/files/{kind}", internal_files, api_alias=False)


def _safetensors_metadata(path: str):
    """The `__metadata__` object of a safetensors header (8-byte little-endian length, then JSON)."""
    try:
        with open(path, "rb") as fh:
            length = int.from_bytes(fh.read(8), "little")
            if length <= 0 or length > 100 * 1024 * 1024:
                return None
            header = json.loads(fh.read(length))
        return header.get("__metadata__")
    except (OSError, ValueError):
        return None

