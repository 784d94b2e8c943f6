"""multipart/form-data bodies (uploads) parsed with python-multipart, imported only when an upload arrives."""

from __future__ import annotations


def parse_multipart(request) -> tuple[dict[str, str], dict[str, tuple[str, bytes]]]:
    """Returns (text fields, files as name -> (filename, bytes)). Raises ValueError on a malformed body."""
    from python_multipart import MultipartParser
    from python_multipart.multipart import parse_options_header

    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise ValueError("expected a multipart/form-data body")
    parts: list[dict] = []
    current: dict = {}
    header_name: list[bytes] = []
    header_value: list[bytes] = []

    def on_part_begin():
        current.clear()
        current.update(headers={}, data=[])

    def on_header_field(data, start, end):
        header_name.append(data[start:end])

    def on_header_value(data, start, end):
        header_value.append(data[start:end])

    def on_header_end():
        current["headers"][b"".join(header_name).lower()] = b"".join(header_value)
        header_name.clear()
        header_value.clear()

    def on_part_data(data, start, end):
        current["data"].append(data[start:end])

    def on_part_end():
        parts.append({"headers": current["headers"], "data": b"".join(current["data"])})

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_part_data": on_part_data, "on_part_end": on_part_end})
    parser.write(request.body)
    parser.finalize()

    fields: dict[str, str] = {}
    files: dict[str, tuple[str, bytes]] = {}
    for part in parts:
        disposition, options = parse_options_header(part["headers"].get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in options:
            files.setdefault(name, (options[b"filename"].decode("utf-8", "replace"), part["data"]))
        else:
            fields.setdefault(name, part["data"].decode("utf-8", "replace"))
    return fields, files
