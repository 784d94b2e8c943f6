"""Files are streamed, uploads spooled to disk, image work kept off the event loop, writes atomic, and
symbolic links in input / output / temp are not followed outside unless allowed."""

import hashlib
import io
import os
import threading

import pytest
import requests

from comfy_serverless.paths import atomic_path


def make_file(path, size: int) -> None:
    with open(path, "wb") as fh:  # sparse: fast to make, full size to the server
        fh.truncate(size)


def test_view_streams_a_large_file_without_loading_it(server):
    out = server.base / "output"
    out.mkdir(exist_ok=True)
    make_file(out / "big.bin", 300 * 1024 * 1024)
    before = server.rss_mb()
    received = 0
    with server.get("/view", params={"filename": "big.bin"}, stream=True) as response:
        assert response.status_code == 200
        assert response.headers["Content-Length"] == str(300 * 1024 * 1024)
        for chunk in response.iter_content(1 << 20):
            received += len(chunk)
    assert received == 300 * 1024 * 1024
    assert server.rss_mb() - before < 40


def test_range_etag_last_modified_and_304(server):
    out = server.base / "output"
    out.mkdir(exist_ok=True)
    (out / "digits.txt").write_bytes(b"0123456789")
    params = {"filename": "digits.txt"}
    full = server.get("/view", params=params)
    assert full.content == b"0123456789" and full.headers["Accept-Ranges"] == "bytes"
    etag, modified = full.headers["ETag"], full.headers["Last-Modified"]

    part = server.get("/view", params=params, headers={"Range": "bytes=2-5"})
    assert part.status_code == 206 and part.content == b"2345"
    assert part.headers["Content-Range"] == "bytes 2-5/10"
    assert server.get("/view", params=params, headers={"Range": "bytes=-3"}).content == b"789"
    assert server.get("/view", params=params, headers={"Range": "bytes=7-"}).content == b"789"
    unsatisfiable = server.get("/view", params=params, headers={"Range": "bytes=20-30"})
    assert unsatisfiable.status_code == 416 and unsatisfiable.headers["Content-Range"] == "bytes */10"
    # A stale If-Range means the whole file.
    stale = server.get("/view", params=params, headers={"Range": "bytes=2-5", "If-Range": '"old"'})
    assert stale.status_code == 200 and stale.content == b"0123456789"

    assert server.get("/view", params=params, headers={"If-None-Match": etag}).status_code == 304
    assert server.get("/view", params=params, headers={"If-Modified-Since": modified}).status_code == 304
    assert server.get("/view", params=params, headers={"If-None-Match": '"other"'}).status_code == 200
    head = server.http.head(server.url + "/view", params=params)
    assert head.status_code == 200 and head.headers["Content-Length"] == "10" and head.content == b""


def test_large_upload_is_spooled_not_copied_in_memory(server):
    data = os.urandom(1 << 20) * 60  # 60 MB
    before = server.rss_mb()
    peak = [before]
    done = threading.Event()

    def watch():
        while not done.wait(0.02):
            peak[0] = max(peak[0], server.rss_mb())

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        response = server.http.post(server.url + "/upload/image", files={"image": ("huge.png", data)},
                                    data={"overwrite": "true"})
    finally:
        done.set()
        watcher.join()
    assert response.status_code == 200, response.text
    stored = (server.base / "input" / "huge.png").read_bytes()
    assert hashlib.sha256(stored).digest() == hashlib.sha256(data).digest()
    assert peak[0] - before < 40, f"RSS grew from {before:.0f} to {peak[0]:.0f} MB for a 60 MB upload"


def test_preview_of_a_large_image_does_not_block_health(server):
    from PIL import Image

    out = server.base / "output"
    out.mkdir(exist_ok=True)
    Image.effect_noise((4000, 4000), 64).convert("RGB").save(out / "large.png", compress_level=1)
    result = {}

    def preview():
        result["response"] = requests.get(server.url + "/view", params={"filename": "large.png",
                                                                         "preview": "webp;90"})

    thread = threading.Thread(target=preview)
    thread.start()
    answered_during_preview = 0
    while thread.is_alive():
        if requests.get(server.url + "/health", timeout=30).status_code == 200 and thread.is_alive():
            answered_during_preview += 1
    thread.join()
    assert result["response"].status_code == 200 and result["response"].headers["Content-Type"] == "image/webp"
    assert answered_during_preview >= 3, "health was not answered while the preview was rendered"


def test_preview_of_a_file_that_is_no_image_is_a_400(server):
    out = server.base / "output"
    out.mkdir(exist_ok=True)
    (out / "fake.png").write_bytes(b"not an image")
    response = server.get("/view", params={"filename": "fake.png", "preview": "webp;90"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_image"


def test_upload_on_a_full_disk_leaves_nothing_behind(start_server):
    """A file size limit of 2 MB stands in for a full disk: the upload fails cleanly with 507."""
    srv = start_server(launcher=("prlimit", "--fsize=2000000"))
    response = srv.http.post(srv.url + "/upload/image", files={"image": ("cut.png", os.urandom(3_000_000))})
    assert response.status_code == 507 and response.json()["error"]["type"] == "insufficient_storage"
    assert not (srv.base / "input" / "cut.png").exists()
    assert "cut.png" not in srv.get("/internal/files/input").json()
    assert [p.name for p in (srv.base / "temp").iterdir()] == []
    assert srv.get("/health").status_code == 200


def test_atomic_path_publishes_only_complete_files(tmp_path):
    target = tmp_path / "image.png"
    with pytest.raises(OSError):
        with atomic_path(str(target)) as partial:
            with open(partial, "wb") as fh:
                fh.write(b"half")
            raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(str(target)) as partial:
        with open(partial, "wb") as fh:
            fh.write(b"whole")
    assert target.read_bytes() == b"whole" and list(tmp_path.iterdir()) == [target]


def test_symbolic_links_out_of_the_served_folders(start_server, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    srv = start_server()
    (srv.base / "output").mkdir(exist_ok=True)
    os.symlink(outside / "secret.txt", srv.base / "output" / "link.txt")
    os.symlink(outside, srv.base / "input" / "linked_dir")
    assert srv.get("/view", params={"filename": "link.txt"}).status_code == 403
    upload = srv.http.post(srv.url + "/upload/image", files={"image": ("x.png", b"data")},
                           data={"subfolder": "linked_dir"})
    assert upload.status_code == 403 and not (outside / "x.png").exists()
    # Model folders may be links to a volume: they are listed.
    models = tmp_path / "volume"
    models.mkdir()
    (models / "linked.safetensors").write_bytes(b"\0" * 8)
    (srv.base / "models" / "checkpoints").mkdir(parents=True, exist_ok=True)
    os.symlink(models, srv.base / "models" / "checkpoints" / "volume")
    assert "volume/linked.safetensors" in srv.get("/models/checkpoints").json()

    allowed = start_server("--allow-external-symlinks", base=srv.base)
    assert allowed.get("/view", params={"filename": "link.txt"}).text == "secret"


def test_gzip_respects_q_zero(start_server):
    srv = start_server("--enable-compress-response-body")
    assert srv.get("/object_info", headers={"Accept-Encoding": "gzip"}).headers["Content-Encoding"] == "gzip"
    refused = srv.get("/object_info", headers={"Accept-Encoding": "gzip;q=0, identity"})
    assert "Content-Encoding" not in refused.headers and refused.json()
    wildcard_refused = srv.get("/object_info", headers={"Accept-Encoding": "*;q=0"})
    assert "Content-Encoding" not in wildcard_refused.headers
    assert "Accept-Encoding" in refused.headers["Vary"]


def test_json_bodies_too_deep_or_not_finite_are_400(server):
    deep = b'{"prompt": {}, "extra_data": {"x": ' + b"[" * 500 + b"]" * 500 + b"}}"
    response = server.post("/prompt", data=deep)
    assert response.status_code == 400 and "nested 502 levels" in response.text
    response = server.post("/prompt", data=b'{"prompt": {"1": {"class_type": "Number", "inputs": {"value": NaN}}}}')
    assert response.status_code == 400 and "NaN" in response.text
    shallow = io.BytesIO(b'{"prompt": {"1": {"class_type": "Number", "inputs": {"value": 1}}, '
                         b'"2": {"class_type": "Record", "inputs": {"value": ["1", 0]}}}, '
                         b'"extra_data": {"x": ' + b"[" * 50 + b"]" * 50 + b"}}")
    assert server.post("/prompt", data=shallow.getvalue()).status_code == 200
