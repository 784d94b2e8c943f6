"""Uploads and /view: round trips, renames, subfolders, masks, previews, channels and traversal refusal."""

import io
import json

import pytest
from PIL import Image


def png_bytes(color=(255, 0, 0, 128), size=(6, 4), text=None):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    Image.new("RGBA", size, color).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def upload(srv, data, name="pic.png", route="/upload/image", **fields):
    return srv.http.post(srv.url + route, files={"image": (name, data, "image/png")},
                         data={k: str(v) for k, v in fields.items()})


@pytest.fixture
def srv(start_server):
    return start_server()


def test_upload_then_view_round_trip(srv):
    data = png_bytes()
    response = upload(srv, data)
    assert response.status_code == 200
    assert response.json() == {"name": "pic.png", "subfolder": "", "type": "input"}
    assert (srv.base / "input" / "pic.png").read_bytes() == data
    view = srv.get("/view", params={"filename": "pic.png", "type": "input"})
    assert view.status_code == 200 and view.content == data
    assert view.headers["Content-Type"] == "image/png"
    assert view.headers["Content-Disposition"] == 'filename="pic.png"'
    assert srv.get("/view", params={"filename": "pic.png [input]"}).content == data


def test_duplicate_upload_reuses_the_file_and_different_content_is_renamed(srv):
    first = png_bytes((1, 2, 3, 255))
    assert upload(srv, first).json()["name"] == "pic.png"
    assert upload(srv, first).json()["name"] == "pic.png"  # same content: nothing written
    assert upload(srv, png_bytes((9, 9, 9, 255))).json()["name"] == "pic (1).png"
    assert upload(srv, png_bytes((8, 8, 8, 255))).json()["name"] == "pic (2).png"
    replaced = png_bytes((7, 7, 7, 255))
    assert upload(srv, replaced, overwrite="true").json()["name"] == "pic.png"
    assert (srv.base / "input" / "pic.png").read_bytes() == replaced


def test_upload_into_subfolder_and_other_types(srv):
    response = upload(srv, png_bytes(), subfolder="a/b", type="temp")
    assert response.json() == {"name": "pic.png", "subfolder": "a/b", "type": "temp"}
    assert (srv.base / "temp" / "a" / "b" / "pic.png").is_file()
    view = srv.get("/view", params={"filename": "pic.png", "subfolder": "a/b", "type": "temp"})
    assert view.status_code == 200
    assert upload(srv, png_bytes(), type="output").json()["type"] == "output"


def test_uploaded_image_is_usable_by_load_image_with_subfolder(srv):
    upload(srv, png_bytes(size=(5, 3)), subfolder="sub")
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "sub/pic.png"}},
              "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "rt"}}}
    entry = srv.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    (image,) = entry["outputs"]["2"]["images"]
    assert image == {"filename": "rt_00001_.png", "subfolder": "", "type": "output"}
    saved = Image.open(io.BytesIO(srv.get("/view", params=image).content))
    assert saved.size == (5, 3)
    assert json.loads(saved.text["prompt"])["1"]["class_type"] == "LoadImage"


@pytest.mark.parametrize("fields", [
    {"subfolder": "../escape"}, {"subfolder": "/etc"}, {"subfolder": "a/../../x"},
])
def test_upload_refuses_traversal(srv, fields):
    assert upload(srv, png_bytes(), **fields).status_code == 400
    assert not (srv.base / "escape").exists()


def test_upload_refuses_traversal_in_filename(srv):
    assert upload(srv, png_bytes(), name="../evil.png").status_code == 400
    assert not (srv.base / "evil.png").exists()


def test_upload_without_image_part(srv):
    assert srv.http.post(srv.url + "/upload/image", data={"type": "input"}).status_code == 400
    assert srv.http.post(srv.url + "/upload/image", data=b"not multipart").status_code == 400
    weird = upload(srv, png_bytes(), type="weird")  # ComfyUI: 500; here, as every bad input: 400 + error body
    assert weird.status_code == 400 and weird.json()["error"]["type"] == "invalid_upload_type"


@pytest.mark.parametrize("params,status", [
    ({"filename": "../secret.txt"}, 400),
    ({"filename": "/etc/passwd"}, 400),
    ({"filename": "x.png", "subfolder": "../.."}, 403),
    ({"filename": "x.png", "subfolder": "/etc"}, 403),
    ({"filename": "passwd", "subfolder": "%2e%2e/%2e%2e/etc"}, 404),
    ({"filename": "..%2Fsecret.txt"}, 400),
    ({"filename": "x.png", "type": "bogus"}, 400),
    ({"filename": "missing.png"}, 404),
    ({}, 404),
])
def test_view_refuses_traversal_and_bad_queries(srv, params, status):
    (srv.base / "secret.txt").write_text("top secret")
    response = srv.get("/view", params=params)
    assert response.status_code == status
    assert b"top secret" not in response.content


def test_view_with_encoded_separators_in_raw_query(srv):
    (srv.base / "secret.txt").write_text("top secret")
    raw = srv.http.get(srv.url + "/view?filename=..%2Fsecret.txt&type=output")
    assert raw.status_code == 400
    raw = srv.http.get(srv.url + "/view?filename=secret.txt&subfolder=..%2F&type=output")
    assert raw.status_code == 403


def test_view_only_uses_the_basename(srv):
    upload(srv, png_bytes(), type="output")
    response = srv.get("/view", params={"filename": "deep/pic.png", "type": "output"})
    assert response.status_code == 200


def test_view_preview_and_channels(srv):
    upload(srv, png_bytes((200, 100, 50, 128)), type="output")
    webp = srv.get("/view", params={"filename": "pic.png", "preview": "webp;50"})
    assert webp.headers["Content-Type"] == "image/webp" and Image.open(io.BytesIO(webp.content)).format == "WEBP"
    jpeg = srv.get("/view", params={"filename": "pic.png", "preview": "jpeg;80", "channel": "rgb"})
    assert jpeg.headers["Content-Type"] == "image/jpeg"
    rgb = Image.open(io.BytesIO(srv.get("/view", params={"filename": "pic.png", "channel": "rgb"}).content))
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (200, 100, 50)
    alpha = Image.open(io.BytesIO(srv.get("/view", params={"filename": "pic.png", "channel": "a"}).content))
    assert alpha.mode == "RGBA" and alpha.getpixel((0, 0)) == (0, 0, 0, 128)


def test_view_forces_binary_for_active_content(srv):
    (srv.base / "output" / "page.html").write_text("<script>alert(1)</script>")
    response = srv.get("/view", params={"filename": "page.html"})
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/octet-stream"


def test_upload_mask_replaces_alpha_and_keeps_text_chunks(srv):
    upload(srv, png_bytes((10, 20, 30, 255), text={"workflow": "{}"}), name="base.png")
    mask = png_bytes((0, 0, 0, 77))
    response = srv.http.post(srv.url + "/upload/mask", files={"image": ("base_mask.png", mask, "image/png")},
                             data={"original_ref": json.dumps({"filename": "base.png", "type": "input"})})
    assert response.status_code == 200 and response.json()["name"] == "base_mask.png"
    merged = Image.open(srv.base / "input" / "base_mask.png")
    assert merged.getpixel((0, 0)) == (10, 20, 30, 77) and merged.text["workflow"] == "{}"
    missing = srv.http.post(srv.url + "/upload/mask", files={"image": ("m.png", mask, "image/png")},
                            data={"original_ref": json.dumps({"filename": "nope.png"})})
    assert missing.status_code == 404
    bad_ref = srv.http.post(srv.url + "/upload/mask", files={"image": ("m.png", mask, "image/png")},
                            data={"original_ref": "not json"})
    assert bad_ref.status_code == 400


def test_internal_routes(srv):
    upload(srv, png_bytes(), type="output")
    assert "pic.png" in srv.get("/internal/files/output").json()
    assert srv.get("/internal/files/bogus").status_code == 400
    assert "checkpoints" in srv.get("/internal/folder_paths").json()
