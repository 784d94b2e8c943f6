"""File routes: uploads, `/view`, model lists (docs/comfy-api-contract.md §1.3). Traversal is refused everywhere.

Every disk walk, hash and Pillow call runs in a worker thread, so `/health` never waits on file work.
Symbolic links: model folders may be links (volumes are mounted that way); `/view` and uploads never follow
a link out of input / output / temp unless `--allow-external-symlinks` is given.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import mimetypes
import os
import shutil

from ..paths import atomic_path, is_inside, safe_join
from .multipart import parse_multipart
from .responses import FileResponse, Response, json_response, storage_error

log = logging.getLogger(__name__)

FORCED_BINARY = {".html", ".htm", ".xhtml", ".js", ".mjs", ".css"}
_ANNOTATED = ((" [output]", "output"), (" [input]", "input"), (" [temp]", "temp"))
IMAGE_JOBS = 2  # concurrent Pillow renders: each may hold a decoded image of hundreds of MB


def _file_hash(path: str, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _inside(root: str, path: str) -> bool:
    root, path = os.path.abspath(root), os.path.abspath(path)
    return os.path.commonpath((root, path)) == root


def _bad_request(kind: str, message: str) -> Response:
    return json_response({"error": {"type": kind, "message": message, "details": "", "extra_info": {}},
                          "node_errors": {}}, 400)


def _place(source: str, target: str) -> None:
    """Moves a finished temporary file onto `target` atomically (a copy first across file systems)."""
    with atomic_path(target) as partial:
        try:
            os.replace(source, partial)
        except OSError:
            shutil.copyfile(source, partial)


def register_file_routes(router, app) -> None:
    folders = app.folders
    settings = app.settings
    hashing = settings.default_hashing_function
    check_links = not settings.allow_external_symlinks
    image_jobs = asyncio.Semaphore(IMAGE_JOBS)

    def within(root: str, path: str) -> bool:
        """Lexically inside root, and (unless allowed) not led out of it by a symbolic link."""
        return _inside(root, path) and (not check_links or is_inside(root, path, follow_links=True))

    def store_upload(request, transform=None) -> Response:
        """Shared by /upload/image and /upload/mask (worker thread)."""
        try:
            fields, files = parse_multipart(request, folders.temp)
        except OSError as exc:
            return storage_error(exc)
        except Exception:  # not multipart, or malformed: no image part -> 400, as ComfyUI
            return Response(b"", 400)
        try:
            return _store(fields, files.get("image"), transform)
        except OSError as exc:
            return storage_error(exc)
        finally:
            for upload in files.values():
                upload.discard()

    def _store(fields: dict, image, transform) -> Response:
        if image is None or not image.filename:
            return Response(b"", 400)
        filename = image.filename
        kind = fields.get("type") or "input"
        upload_dir = folders.directory_for(kind)
        if upload_dir is None:
            return _bad_request("invalid_upload_type", f"unknown upload type {kind!r} (input, output or temp)")
        subfolder = fields.get("subfolder", "")
        target_dir = os.path.abspath(os.path.join(upload_dir, os.path.normpath(subfolder))) if subfolder \
            else os.path.abspath(upload_dir)
        path = os.path.abspath(os.path.join(target_dir, filename))
        if "\x00" in path or not _inside(upload_dir, target_dir) or not _inside(upload_dir, path) or \
                os.path.dirname(path) != target_dir:
            return Response(b"", 400)
        os.makedirs(target_dir, exist_ok=True)
        if not within(upload_dir, target_dir):
            return Response(b"", 403)
        source = image.path
        if transform is not None:
            merged = transform(image.path)
            with open(image.path, "wb") as fh:  # our own temporary file: rewritten in place
                fh.write(merged)
        overwrite = fields.get("overwrite", "").lower() in ("true", "1")
        if not overwrite:
            stem, ext = os.path.splitext(filename)
            counter = 1
            new_hash = None
            while os.path.lexists(path):
                new_hash = new_hash or _file_hash(source, hashing)
                if os.path.isfile(path) and within(upload_dir, path) and new_hash == _file_hash(path, hashing):
                    return json_response({"name": filename, "subfolder": subfolder, "type": kind})
                filename = f"{stem} ({counter}){ext}"
                path = os.path.join(target_dir, filename)
                counter += 1
        elif os.path.islink(path) and not within(upload_dir, path):
            return Response(b"", 403)
        _place(source, path)
        return json_response({"name": filename, "subfolder": subfolder, "type": kind})

    async def upload_image(request):
        return await asyncio.to_thread(store_upload, request)

    async def upload_mask(request):
        def merge_with_original(request):
            try:
                fields, files = parse_multipart(request, folders.temp)
            except OSError as exc:
                return storage_error(exc)
            except Exception:
                return Response(b"", 400)
            try:
                ref = json.loads(fields.get("original_ref") or "")
                original_name = ref["filename"]
                if not isinstance(original_name, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                return Response(b"", 400)
            try:
                kind = ref.get("type") or "input"
                for suffix, annotated_kind in _ANNOTATED:
                    if original_name.endswith(suffix):
                        original_name, kind = original_name[: -len(suffix)], annotated_kind
                root = folders.directory_for(kind) if isinstance(kind, str) else None
                sub = ref.get("subfolder") or ""
                original = safe_join(root, os.path.join(sub, original_name)) \
                    if root and isinstance(sub, str) else None
                if original is None or not os.path.isfile(original) or not within(root, original):
                    return Response(b"", 404)

                def merge_alpha(mask_path: str) -> bytes:
                    from .images import apply_mask_alpha

                    return apply_mask_alpha(original, mask_path)

                try:
                    return _store(fields, files.get("image"), merge_alpha)
                except ValueError as exc:  # Pillow: not an image it can read (UnidentifiedImageError...)
                    return _bad_request("invalid_image", f"cannot merge the mask: {exc}")
                except OSError as exc:
                    if exc.errno is None:  # Pillow's decoding errors are OSErrors without an errno
                        return _bad_request("invalid_image", f"cannot merge the mask: {exc}")
                    return storage_error(exc)
            finally:
                for upload in files.values():
                    upload.discard()

        async with image_jobs:
            try:
                return await asyncio.to_thread(merge_with_original, request)
            finally:
                from .images import release_memory

                await asyncio.to_thread(release_memory)

    def locate_view(q) -> tuple[str | None, Response | None, str]:
        """(path, error response, filename) for /view's query."""
        filename = q.get("filename")
        if filename is None:
            return None, Response(b"", 404), ""
        kind = q.get("type") or "output"
        for suffix, annotated_kind in _ANNOTATED:
            if filename.endswith(suffix):
                filename, kind = filename[: -len(suffix)], annotated_kind
        if not filename or filename.startswith("/") or ".." in filename or "\x00" in filename:
            return None, Response(b"", 400), ""
        root = folders.directory_for(kind)
        if root is None:
            return None, Response(b"", 400), ""
        directory = os.path.abspath(root)
        subfolder = q.get("subfolder")
        if subfolder:
            if "\x00" in subfolder:
                return None, Response(b"", 400), ""
            directory = os.path.abspath(os.path.join(directory, subfolder))
            if not _inside(root, directory):
                return None, Response(b"", 403), ""
        filename = os.path.basename(filename)
        path = os.path.join(directory, filename)
        if not os.path.isfile(path):
            return None, Response(b"", 404), ""
        if not within(root, path):
            return None, Response(b"", 403), ""
        return path, None, filename

    async def view(request):
        path, error, filename = await asyncio.to_thread(locate_view, request.query)
        if error is not None:
            return error
        disposition = [("Content-Disposition", f'filename="{filename}"')]
        preview, channel = request.query.get("preview"), request.query.get("channel", "rgba")
        if preview or channel in ("rgb", "a"):
            from .images import release_memory, render_view

            async with image_jobs:
                try:
                    body, content_type = await asyncio.to_thread(render_view, path, preview, channel)
                except (OSError, ValueError) as exc:  # not an image, or too large for Pillow
                    return _bad_request("invalid_image", f"cannot render {filename!r}: {exc}")
                finally:
                    await asyncio.to_thread(release_memory)
            return Response(body, 200, content_type, disposition)
        ext = os.path.splitext(filename)[1].lower()
        content_type = "application/octet-stream" if ext in FORCED_BINARY else \
            (mimetypes.guess_type(filename)[0] or "application/octet-stream")
        response = FileResponse(path, content_type, disposition)
        response.prepare(request.headers)
        return response

    async def view_metadata(request):
        folder = request.match_info["folder_name"]
        filename = request.query.get("filename")
        if not filename or not filename.endswith(".safetensors") or folders.canonical(folder) not in folders.models:
            return Response(b"", 404)
        metadata = await asyncio.to_thread(_metadata_of, folder, filename)
        if metadata is None:
            return Response(b"", 404)
        return json_response(metadata)

    def _metadata_of(folder: str, filename: str):
        path = folders.model_path(folder, filename)
        return _safetensors_metadata(path) if path is not None else None

    async def list_model_folders(request):
        return json_response(list(folders.models))

    async def list_models(request):
        folder = request.match_info["folder"]
        if folder not in folders.models:
            return Response(b"", 404)
        return json_response(list(await asyncio.to_thread(folders.list_models, folder)))

    async def embeddings(request):
        names = await asyncio.to_thread(folders.list_models, "embeddings")
        return json_response([os.path.splitext(name)[0] for name in names])

    async def internal_folder_paths(request):
        return json_response({name: dirs for name, (dirs, _) in folders.models.items()})

    def _files_newest_first(root: str) -> list[str]:
        try:
            entries = [e for e in os.scandir(root) if e.is_file() and not e.name.startswith(".")]
        except FileNotFoundError:
            entries = []
        entries.sort(key=lambda e: e.stat().st_mtime, reverse=True)
        return [e.name for e in entries]

    async def internal_files(request):
        root = folders.directory_for(request.match_info["kind"])
        if root is None:
            return json_response({"error": "Invalid directory type"}, 400)
        return json_response(await asyncio.to_thread(_files_newest_first, root))

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
        return header.get("__metadata__") if isinstance(header, dict) else None
    except (OSError, ValueError):
        return None
