"""Routes: exact paths and `{name}` segments; every route is also served under /api unless told not to."""

from __future__ import annotations

import re


class Router:
    def __init__(self):
        self._exact: dict[str, dict[str, object]] = {}
        self._patterns: list[tuple[re.Pattern, dict[str, object]]] = []

    def add(self, method: str, path: str, handler, api_alias: bool = True) -> None:
        for p in (path, "/api" + path) if api_alias else (path,):
            methods = self._table_for(p)
            methods[method] = handler
            if method == "GET":
                methods.setdefault("HEAD", handler)

    def _table_for(self, path: str) -> dict:
        if "{" not in path:
            return self._exact.setdefault(path, {})
        regex = re.compile("^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(path)) + "$")
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
            return None, 404
        handler = methods.get(method)
        if handler is None:
            return None, 405
        return handler, match_info
