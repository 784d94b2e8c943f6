"""multipart/form-data bodies (uploads), parsed with python-multipart as a stream.

File parts go straight to hidden temporary files, so an upload is never held in memory; python-multipart
is imported only when an upload arrives. Runs in a worker thread (it reads and writes files).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any

MAX_FIELD_BYTES = 1 << 20  # text fields (type, subfolder, original_ref) are short


@dataclass
class UploadedFile:
    filename: str
    path: str  # a temporary file; moved into place or removed by the caller
    size: int

    def discard(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class _Part:
    def __init__(self):
        self.headers: dict[bytes, bytes] = {}
        self.name = ""
        self.filename: str | None = None
        self.text = bytearray()
        self.file = None
        self.path = ""
        self.size = 0


def parse_multipart(request, spool_dir: str | None) -> tuple[dict[str, str], dict[str, UploadedFile]]:
    """(text fields, file parts by field name); the first part of a name wins. Raises ValueError."""
    from python_multipart import MultipartParser
    from python_multipart.multipart import parse_options_header

    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise ValueError("expected a multipart/form-data body")
    fields: dict[str, str] = {}
    files: dict[str, UploadedFile] = {}
    extra: list[UploadedFile] = []  # parts beyond the first of a name, removed at the end
    state: dict[str, Any] = {"part": None, "name": [], "value": []}

    def on_part_begin():
        state["part"] = _Part()

    def on_header_field(data, start, end):
        state["name"].append(data[start:end])

    def on_header_value(data, start, end):
        state["value"].append(data[start:end])

    def on_header_end():
        state["part"].headers[b"".join(state["name"]).lower()] = b"".join(state["value"])
        state["name"].clear()
        state["value"].clear()

    def on_headers_finished():
        part = state["part"]
        _, options = parse_options_header(part.headers.get(b"content-disposition", b""))
        part.name = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in options:
            part.filename = options[b"filename"].decode("utf-8", "replace")
            handle, part.path = tempfile.mkstemp(prefix=".upload-", suffix=".part", dir=spool_dir)
            part.file = os.fdopen(handle, "wb")

    def on_part_data(data, start, end):
        part = state["part"]
        if part.file is not None:
            part.file.write(data[start:end])
            part.size += end - start
        else:
            part.text += data[start:end]
            if len(part.text) > MAX_FIELD_BYTES:
                raise ValueError(f"form field {part.name!r} is longer than {MAX_FIELD_BYTES} bytes")

    def on_part_end():
        part, state["part"] = state["part"], None
        if part.file is None:
            fields.setdefault(part.name, part.text.decode("utf-8", "replace"))
            return
        part.file.close()
        upload = UploadedFile(part.filename, part.path, part.size)
        if part.name in files:
            extra.append(upload)
        else:
            files[part.name] = upload

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data, "on_part_end": on_part_end})
    try:
        for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except BaseException:
        _discard_all(state["part"], files.values(), extra)
        raise
    finally:
        for upload in extra:
            upload.discard()
    return fields, files


def _discard_all(open_part: _Part | None, *groups) -> None:
    if open_part is not None and open_part.file is not None:
        open_part.file.close()
        UploadedFile("", open_part.path, 0).discard()
    for group in groups:
        for upload in group:
            upload.discard()
