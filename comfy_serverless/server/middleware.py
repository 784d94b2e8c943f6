"""Cross-cutting HTTP behaviour of ComfyUI's server: origin check or CORS, cache headers, optional gzip."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from .http import Response

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _host_port(value: str):
    parts = urlsplit(value if "//" in value else "//" + value)
    try:
        return (parts.hostname or "").lower(), parts.port
    except ValueError:
        return (parts.hostname or "").lower(), None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def origin_mismatch(headers: dict) -> bool:
    """A browser page from another origin talking to a loopback server (ComfyUI answers 403)."""
    host, origin = headers.get("host"), headers.get("origin")
    if not host or not origin:
        return False
    host_name, host_port = _host_port(host)
    origin_name, origin_port = _host_port(origin)
    if not _is_loopback(host_name):
        return False
    if host_name != origin_name:
        return True
    return host_port is not None and origin_port is not None and host_port != origin_port


def _cache_control(path: str, response: Response) -> None:
    if any(k.lower() == "cache-control" for k, _ in response.headers):
        return
    last = path.rsplit("/", 1)[-1]
    if path.endswith((".js", ".css")) or (last.startswith("index") and last.endswith(".json")):
        response.headers.append(("Cache-Control", "no-cache"))
    elif path.lower().endswith(IMAGE_SUFFIXES):
        if response.status == 404:
            response.headers.append(("Cache-Control", "public, max-age=3600"))
        elif 200 <= response.status <= 206 or response.status in (301, 308):
            response.headers.append(("Cache-Control", "public, max-age=86400"))
        elif response.status in (302, 303, 307):
            response.headers.append(("Cache-Control", "no-cache"))


def _gzip(request, response: Response) -> None:
    if len(response.body) < 1024 or "gzip" not in request.headers.get("accept-encoding", ""):
        return
    ctype = response.content_type or ""
    if not (ctype.startswith("application/json") or ctype.startswith("text/")):
        return
    import gzip

    response.body = gzip.compress(response.body, compresslevel=5)
    response.headers.append(("Content-Encoding", "gzip"))


def build_middleware(settings):
    cors_origin = settings.enable_cors_header
    compress = settings.enable_compress_response_body

    async def middleware(request, call_next):
        if cors_origin is None and origin_mismatch(request.headers):
            return Response(b"", 403)
        if request.method == "OPTIONS":
            response = Response(b"", 200)
        else:
            response = await call_next(request)
        if cors_origin is not None:
            response.headers += [("Access-Control-Allow-Origin", cors_origin),
                                 ("Access-Control-Allow-Methods", "POST, GET, DELETE, PUT, OPTIONS"),
                                 ("Access-Control-Allow-Headers", "Content-Type, Authorization"),
                                 ("Access-Control-Allow-Credentials", "true")]
        _cache_control(request.path, response)
        if compress:
            _gzip(request, response)
        return response

    return middleware
