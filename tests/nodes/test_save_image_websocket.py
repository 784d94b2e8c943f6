"""SaveImageWebsocket: every image of the batch reaches the prompt's client as a full-size PNG frame (event 1,
format 2; event 4 with metadata after negotiation), other clients get none, nothing is written; and
encode_preview keeps the size when asked for no limit."""

from __future__ import annotations

import io
import json
import shutil
import struct
import time

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_serverless import progress
from comfy_serverless.nodes.websocket_save import SaveImageWebsocket
from comfy_serverless.server.previews import encode_preview
from conftest import Server


def test_frames_go_through_the_progress_bar_at_full_size():
    seen = []
    token = progress.set_reporter(lambda value, total, preview: seen.append((value, total, preview)))
    try:
        images = torch.rand(3, 5, 7, 3, generator=torch.Generator().manual_seed(0))
        assert SaveImageWebsocket().save_images(images) == {}
    finally:
        progress.reset_reporter(token)
    assert [(value, total) for value, total, _ in seen] == [(0, 3), (1, 3), (2, 3)]
    for index, (_, _, (fmt, picture, size)) in enumerate(seen):
        assert fmt == "PNG" and size is None and picture.size == (7, 5)
        expected = np.clip(255.0 * images[index].numpy(), 0, 255).astype(np.uint8)
        assert np.array_equal(np.asarray(picture), expected)


def test_bad_input_and_always_reruns():
    with pytest.raises(ValueError, match=r"\[B,H,W,C\]"):
        SaveImageWebsocket().save_images(torch.zeros(4, 4, 3))
    first = SaveImageWebsocket.IS_CHANGED(None)
    time.sleep(0.01)
    assert SaveImageWebsocket.IS_CHANGED(None) > first  # a new value each time: never served from the cache
    assert SaveImageWebsocket.OUTPUT_NODE is True and SaveImageWebsocket.RETURN_TYPES == ()


def test_encode_preview_without_a_limit_keeps_the_size():
    picture = Image.new("RGB", (900, 300), (10, 20, 30))
    kind, data = encode_preview(("PNG", picture, None), 512)
    assert kind == "image/png" and Image.open(io.BytesIO(data)).size == (900, 300)
    kind, data = encode_preview(("JPEG", picture, 600), 512)  # a limit still applies, capped by the server's
    assert kind == "image/jpeg" and Image.open(io.BytesIO(data)).size == (512, 171)


def _prompt(width: int, height: int, batch: int) -> dict:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": width, "height": height, "batch_size": batch,
                                                   "color": 0x336699}},
        "2": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}},
    }


def test_images_reach_only_the_prompts_client_over_the_server(tmp_path):
    srv = Server(tmp_path, args=("--preview-size", "64"), packs=())
    try:
        ws, other = srv.ws(), srv.ws()
        queued = srv.queue_prompt(_prompt(200, 120, 2), client_id=ws.client_id)
        ws.until_done(queued["prompt_id"])
        frames = [m for m in ws.messages if isinstance(m, bytes)]
        assert len(frames) == 2
        for frame in frames:
            assert struct.unpack(">II", frame[:8]) == (1, 2)  # PREVIEW_IMAGE, PNG
            picture = Image.open(io.BytesIO(frame[8:]))
            assert picture.format == "PNG" and picture.size == (200, 120)  # not shrunk to --preview-size
            assert picture.convert("RGB").getpixel((5, 5)) == (0x33, 0x66, 0x99)
        progress_values = [m["data"]["value"] for m in ws.messages
                           if not isinstance(m, bytes) and m["type"] == "progress"]
        assert progress_values == [0, 1]
        entry = srv.wait_history(queued["prompt_id"])
        assert entry["status"]["status_str"] == "success" and entry["outputs"] == {}
        assert not (tmp_path / "output").exists() or not any((tmp_path / "output").iterdir())

        # the same prompt again runs again (IS_CHANGED) and a client with metadata support gets event 4
        ws.sock.send(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
        ws.until(lambda m: m["type"] == "feature_flags")
        queued = srv.queue_prompt(_prompt(200, 120, 1), client_id=ws.client_id)
        start = len(ws.messages)
        ws.until_done(queued["prompt_id"])
        [frame] = [m for m in ws.messages[start:] if isinstance(m, bytes)]
        event, length = struct.unpack(">II", frame[:8])
        meta = json.loads(frame[8:8 + length])
        assert event == 4 and meta["node_id"] == "2" and meta["prompt_id"] == queued["prompt_id"]
        assert meta["image_type"] == "image/png"
        assert Image.open(io.BytesIO(frame[8 + length:])).size == (200, 120)

        other.sock.settimeout(0.5)
        received = []
        try:
            while True:
                received.append(other.sock.recv())
        except Exception:
            pass
        assert not any(isinstance(m, bytes) for m in received)
        ws.close()
        other.close()
    finally:
        srv.stop()
        shutil.rmtree(tmp_path / "output", ignore_errors=True)
