"""Cross-cutting HTTP behaviour of ComfyUI's server: origin check or CORS, cache headers, optional gzip."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from .responses import FileResponse, Response

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


def accepts_gzip(accept_encoding: str) -> bool:
    """RFC 9110 content negotiation: `gzip;q=0` (or `*;q=0` without gzip) refuses it."""
    weights: dict[str, float] = {}
    for item in accept_encoding.split(","):
        coding, _, params = item.strip().partition(";")
        weight = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        if coding:
            weights[coding.strip().lower()] = weight
    if "gzip" in weights:
        return weights["gzip"] > 0
    return weights.get("*", 0.0) > 0


def _gzip(request, response: Response) -> None:
    if isinstance(response, FileResponse) or len(response.body) < 1024:
        return
    ctype = response.content_type or ""
    if not (ctype.startswith("application/json") or ctype.startswith("text/")):
        return
    response.headers.append(("Vary", "Accept-Encoding"))
    if not accepts_gzip(request.headers.get("accept-encoding", "")):
        return
    import gzip

    response.body = gzip.compress(response.body, compresslevel=5)
    response.headers.append(("Content-Encoding", "gzip"))


def _cors_headers(origin: str) -> list[tuple[str, str]]:
    headers = [("Access-Control-Allow-Origin", origin),
               ("Access-Control-Allow-Methods", "POST, GET, DELETE, PUT, OPTIONS"),
               ("Access-Control-Allow-Headers", "Content-Type, Authorization"), ("Vary", "Origin")]
    if origin != "*":  # browsers refuse credentials with a wildcard origin; never offer both
        headers.append(("Access-Control-Allow-Credentials", "true"))
    return headers


def build_middleware(settings, router):
    cors_origin = settings.enable_cors_header
    compress = settings.enable_compress_response_body

    async def middleware(request, call_next):
        if cors_origin is None and origin_mismatch(request.headers):
            return Response(b"", 403)
        wanted = request.headers.get("access-control-request-method", "").strip().upper()
        if cors_origin is not None and request.method == "OPTIONS" and "origin" in request.headers and wanted:
            # A CORS preflight: answered for routes that exist with the method asked for, and only those.
            handler, _ = router.resolve(wanted, request.path)
            response = Response(b"", 200) if handler is not None else Response(b"", 404)
        else:
            response = await call_next(request)
        if cors_origin is not None:
            response.headers += _cors_headers(cors_origin)
        _cache_control(request.path, response)
        if compress:
            _gzip(request, response)
        return response

    return middleware
