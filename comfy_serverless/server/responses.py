"""Responses: in-memory bodies, and files streamed from disk with ETag, Last-Modified, 304 and Range."""

from __future__ import annotations

import json
import os

REASONS = {200: "OK", 204: "No Content", 206: "Partial Content", 304: "Not Modified", 400: "Bad Request",
           401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
           408: "Request Timeout", 409: "Conflict", 413: "Request Entity Too Large",
           416: "Range Not Satisfiable", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
           503: "Service Unavailable", 507: "Insufficient Storage"}


class Response:
    __slots__ = ("status", "body", "content_type", "headers")

    def __init__(self, body: bytes = b"", status: int = 200, content_type: str | None = None,
                 headers: list | None = None):
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers or []


def json_response(data, status: int = 200) -> Response:
    return Response(json.dumps(data).encode(), status, "application/json; charset=utf-8")


def text_response(text: str, status: int) -> Response:
    return Response(text.encode(), status, "text/plain; charset=utf-8")


def error_response(status: int) -> Response:
    return text_response(f"{status}: {REASONS.get(status, '')}", status)


def storage_error(exc: OSError) -> Response:
    """507 in ComfyUI's error shape: the server could not store what the client sent."""
    return json_response({"error": {"type": "insufficient_storage", "message": f"cannot store the upload: {exc}",
                                    "details": "", "extra_info": {}}, "node_errors": {}}, 507)


class FileResponse(Response):
    """A file sent from disk in pieces (sendfile where the platform has it), never read whole.

    `prepare()` settles status and headers against the request's conditional and Range headers;
    afterwards `offset` and `length` say which bytes to send.
    """

    __slots__ = ("path", "stat", "offset", "length")

    def __init__(self, path: str, content_type: str, headers: list | None = None, stat=None):
        super().__init__(b"", 200, content_type, headers)
        self.path = path
        self.stat = stat if stat is not None else os.stat(path)
        self.offset = 0
        self.length = self.stat.st_size

    @property
    def etag(self) -> str:
        return f'"{self.stat.st_mtime_ns:x}-{self.stat.st_size:x}"'

    def prepare(self, request_headers: dict) -> None:
        import email.utils  # 3 ms of imports, paid on the first file served instead of at start

        size = self.stat.st_size
        last_modified = email.utils.formatdate(self.stat.st_mtime, usegmt=True)
        self.headers += [("ETag", self.etag), ("Last-Modified", last_modified), ("Accept-Ranges", "bytes")]
        if self._not_modified(request_headers):
            self.status, self.length, self.content_type = 304, 0, None
            return
        wanted = request_headers.get("range")
        if_range = request_headers.get("if-range")
        if wanted is None or (if_range is not None and if_range not in (self.etag, last_modified)):
            return
        span = parse_range(wanted, size)
        if span is None:  # not a single byte range: serve the whole file, as RFC 9110 allows
            return
        if span == "unsatisfiable":
            self.status, self.length = 416, 0
            self.headers.append(("Content-Range", f"bytes */{size}"))
            return
        start, end = span
        self.status, self.offset, self.length = 206, start, end - start + 1
        self.headers.append(("Content-Range", f"bytes {start}-{end}/{size}"))

    def _not_modified(self, request_headers: dict) -> bool:
        import email.utils

        if_none_match = request_headers.get("if-none-match")
        if if_none_match is not None:
            tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
            return "*" in tags or self.etag in tags
        since = request_headers.get("if-modified-since")
        if since is None:
            return False
        try:
            parsed = email.utils.parsedate_to_datetime(since)
        except (TypeError, ValueError, IndexError):
            return False
        return parsed is not None and int(self.stat.st_mtime) <= parsed.timestamp()


def parse_range(header: str, size: int):
    """(first, last) for one `bytes=` range, 'unsatisfiable', or None when the header is ignored."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or not (first.isdigit() or last.isdigit()) or (first and not first.isdigit()) \
            or (last and not last.isdigit()):
        return None
    if not first:  # suffix: the last N bytes
        count = int(last)
        if count == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - count), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if last and int(last) < start:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, end
