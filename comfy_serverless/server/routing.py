"""Routes: exact paths, `{name}` segments and `{name:regex}` parts (aiohttp's syntax, which node packs use);
every route is also served under /api unless told not to."""

from __future__ import annotations

import re

_VARIABLE = re.compile(r"\{(\w+)(?::((?:[^{}]|\{[^{}]*\})*))?\}")


def path_pattern(path: str) -> str:
    """The regex of a path with `{name}` (one segment) and `{name:regex}` parts."""
    parts, end = [], 0
    for match in _VARIABLE.finditer(path):
        parts.append(re.escape(path[end:match.start()]))
        parts.append(f"(?P<{match.group(1)}>{match.group(2) or '[^/]+'})")
        end = match.end()
    parts.append(re.escape(path[end:]))
    return "^" + "".join(parts) + "$"


class Router:
    def __init__(self):
        self._exact: dict[str, dict[str, object]] = {}
        self._patterns: list[tuple[re.Pattern, dict[str, object]]] = []
        # (method, path) -> (handler, match_info) or None, asked when no route matches the path: node packs'
        # routes that a lazy server knows from its catalogue but has not imported yet (pack_routes.py)
        self.fallback = None

    def add(self, method: str, path: str, handler, api_alias: bool = True, keep_existing: bool = False) -> None:
        """keep_existing: a handler already there for this method and path stays (node packs' routes never
        replace the server's own, as in ComfyUI where the first registered route wins)."""
        for p in (path, "/api" + path) if api_alias else (path,):
            methods = self._table_for(p)
            if keep_existing and method in methods:
                continue
            methods[method] = handler
            if method == "GET":
                methods.setdefault("HEAD", handler)

    def _table_for(self, path: str) -> dict:
        if "{" not in path:
            return self._exact.setdefault(path, {})
        regex = re.compile(path_pattern(path))
        for existing, methods in self._patterns:
            if existing.pattern == regex.pattern:
                return methods
        methods: dict = {}
        self._patterns.append((regex, methods))
        return methods

    def resolve(self, method: str, path: str):
        """(handler, match_info) or (None, status) with status 404 / 405."""
        methods = self._exact.get(path)
        match_info = {}
        if methods is None:
            for regex, candidate in self._patterns:
                m = regex.match(path)
                if m:
                    methods, match_info = candidate, m.groupdict()
                    break
        if methods is None:
            found = self.fallback(method, path) if self.fallback is not None else None
            return found if found is not None else (None, 404)
        handler = methods.get(method)
        if handler is None:
            return None, 405
        return handler, match_info
