"""One real server process for the whole fuzz suite, with a few files for /view and /view_metadata to find."""

from __future__ import annotations

import io
import json
import os
import struct
import time
from pathlib import Path

import pytest
import requests

from conftest import Server

from . import support

SUMMARY_FILE: list[Path] = []


def _write_files(base: Path) -> None:
    from PIL import Image

    inputs = base / "input"
    (inputs / "sub").mkdir(parents=True, exist_ok=True)
    rgba = Image.new("RGBA", (64, 48), (10, 200, 30, 128))
    rgba.save(inputs / "fuzz.png")
    rgba.save(inputs / "sub" / "fuzz.png")
    Image.new("L", (32, 32), 90).save(inputs / "gray.png")
    Image.new("P", (16, 16), 3).save(inputs / "palette.png")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(inputs / "photo.jpg", quality=80)
    Image.new("I;16", (8, 8), 1000).save(inputs / "deep.png")
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    (inputs / "broken.png").write_bytes(buffer.getvalue()[:60])  # a truncated upload
    (inputs / "notes.txt").write_text("not an image\n")
    (inputs / "page.html").write_text("<script>alert(1)</script>")
    checkpoints = base / "models" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    header = json.dumps({"__metadata__": {"format": "pt", "note": "fuzz"},
                         "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (checkpoints / "tiny.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    (checkpoints / "truncated.safetensors").write_bytes(struct.pack("<Q", 4096) + b'{"__metadata__": {')
    (checkpoints / "garbage.safetensors").write_bytes(os.urandom(64))


@pytest.fixture(scope="package")
def fuzz_server(tmp_path_factory):
    """The server every fuzz category hits, in turn; `rss_baseline_kb` is measured after a warm-up that
    runs a prompt, renders a preview and takes an upload, so lazily imported code is in the baseline."""
    base = tmp_path_factory.mktemp("fuzz-server")
    _write_files(base)
    srv = Server(base)
    session = requests.Session()
    try:
        for value in (1.0, 2.0):
            srv.wait_history(srv.queue_prompt(support.valid_prompt(value))["prompt_id"], timeout=60)
        assert session.get(srv.url + "/view?filename=fuzz.png&type=input&preview=webp;80", timeout=30).ok
        assert session.get(srv.url + "/view?filename=fuzz.png&type=input&channel=a", timeout=30).ok
        upload = session.post(srv.url + "/upload/image", files={"image": ("warm.png", (base / "input" / "fuzz.png")
                                                                          .read_bytes(), "image/png")}, timeout=30)
        assert upload.status_code == 200, upload.text
        time.sleep(0.2)
        srv.rss_baseline_kb = support.rss_kb(srv.proc.pid)
        print(f"\n== fuzz server on port {srv.port}, pid {srv.proc.pid}, baseline RSS "
              f"{srv.rss_baseline_kb / 1024:.1f} MB, log {srv.log_path}")
        yield srv
    finally:
        session.close()
        srv.stop()
        if support.SUMMARY:
            path = Path(os.environ.get("FUZZ_SUMMARY") or base / "fuzz-summary.json")
            path.write_text(json.dumps(support.SUMMARY, indent=1, default=str))
            SUMMARY_FILE.append(path)


def pytest_terminal_summary(terminalreporter):
    if not support.SUMMARY:
        return
    write = terminalreporter.write_line
    terminalreporter.section("fuzz suite (issue #7)")
    total = 0
    for entry in support.SUMMARY:
        rss = entry["rss_mb"]
        if "flood" in entry:
            for flood in entry["flood"]:
                write(f"{entry['category']} ({flood['shape']}): {flood['sent_mb']} MB offered, {flood['stopped_by']}, "
                      f"close code {flood['close_code']}, RSS {flood['rss_start_mb']} -> peak {flood['rss_peak_mb']} "
                      f"MB in {flood['seconds']} s")
            continue
        total += entry["requests_sent"]
        health = entry["health_probes"]
        write(f"{entry['category']}: {entry['requests_sent']} requests (quota {entry['quota']}) in "
              f"{entry['seconds']} s, seed {entry['seed']}; 500s {entry['server_500']}, "
              f"malformed {entry['malformed_responses']}, hangs {entry['hangs']}, "
              f"closed without answer {entry['closed_without_answer']}; /health probes {health.get('probes')} "
              f"max {health.get('max_ms')} ms; RSS MB baseline {rss['baseline']} peak {rss['peak']} after "
              f"{rss['after']}; prompt after: {entry['after'].get('prompt_status')}")
        write(f"    statuses: {entry['status_histogram']}")
        for kind, count in {**entry["problem_kinds"], **entry["server_log_errors (reported, not failed)"]}.items():
            write(f"    {count} x {kind}")
    write(f"total requests: {total}")
    for path in SUMMARY_FILE:
        write(f"summary written to {path}")
