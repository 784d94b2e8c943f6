"""An HTTP request as handlers see it. Large bodies live in a temporary file, not in memory."""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote

from . import jsonbody

STREAM_CHUNK = 1 << 20
_UNPARSED = object()


class Request:
    __slots__ = ("method", "path", "query", "headers", "match_info", "peer", "raw_target", "body_size",
                 "max_json_depth", "_body", "_body_file", "_json")

    def __init__(self, method: str, target: str, headers: dict, peer, body: bytes = b"", body_file=None,
                 max_json_depth: int = 100):
        self.method = method
        self.raw_target = target
        path, _, query = target.partition("?")
        self.path = unquote(path)
        self.query = dict(reversed(parse_qsl(query, keep_blank_values=True)))  # first value wins, like aiohttp
        self.headers = headers
        self.match_info: dict[str, str] = {}
        self.peer = peer
        self.max_json_depth = max_json_depth
        self._body = None if body_file is not None else body
        self._body_file = body_file
        self.body_size = body_file.tell() if body_file is not None else len(body)
        self._json = _UNPARSED

    @property
    def body(self) -> bytes:
        """The whole body in memory (reads a spooled body from its file once)."""
        if self._body is None:
            self._body_file.seek(0)
            self._body = bytes(self._body_file.read())
        return self._body

    def stream(self, chunk_size: int = STREAM_CHUNK):
        """The body in chunks, without holding it all in memory."""
        if self._body_file is None:
            body = self.body
            for start in range(0, len(body), chunk_size):
                yield body[start:start + chunk_size]
            return
        self._body_file.seek(0)
        while chunk := self._body_file.read(chunk_size):
            yield chunk

    def json(self):
        """Parses the body as JSON whatever the Content-Type (clients post JSON as form data too).

        Raises jsonbody.BadJSON (a ValueError) for unparsable, non-finite or too deeply nested JSON.
        """
        if self._json is _UNPARSED:
            try:
                self._json = (True, jsonbody.loads(self.body, self.max_json_depth))
            except jsonbody.BadJSON as exc:
                self._json = (False, exc)
        ok, value = self._json
        if not ok:
            raise value
        return value

    def parse_json_quietly(self) -> None:
        """Parses now and keeps the outcome for json(); the server runs this in a thread for big bodies."""
        try:
            self.json()
        except ValueError:
            pass

    def close(self) -> None:
        if self._body_file is not None:
            self._body_file.close()
