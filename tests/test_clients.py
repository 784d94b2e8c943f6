"""Real client libraries from PyPI, used unmodified against the server (docs/comfy-api-contract.md §5).

Each test submits an image workflow built from model-free built-in nodes, follows the WebSocket progress the
way the library (or ComfyUI's own script example) does, fetches the result through /history and /view and
decodes the PNG bytes to check size and colour.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import io
import json
import sys
import threading
import time
import types
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pytest
import websocket
from PIL import Image

pytestmark = pytest.mark.timeout(90)  # a library that blocks forever on a failure fails the test instead

SIZE = (32, 24)  # width, height: not square, so a swapped width/height shows


# -- workflows and checks ----------------------------------------------------------------------------

def node(class_type, title, **inputs):
    return {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}


def empty_image_workflow(prefix, width=SIZE[0], height=SIZE[1], color=0x00FF00, batch_size=1):
    """EmptyImage -> ImageInvert -> SaveImage, titled as ComfyUI's frontend exports them."""
    return {
        "1": node("EmptyImage", "Empty Image", width=width, height=height, batch_size=batch_size, color=color),
        "2": node("ImageInvert", "Invert Image", image=["1", 0]),
        "3": node("SaveImage", "Save Image", images=["2", 0], filename_prefix=prefix),
    }


def load_image_workflow(image, prefix):
    """LoadImage -> SaveImage."""
    return {
        "1": node("LoadImage", "Load Image", image=image),
        "2": node("SaveImage", "Save Image", images=["1", 0], filename_prefix=prefix),
    }


def inverted(color):
    return tuple(255 - ((color >> shift) & 0xFF) for shift in (16, 8, 0))


def prefix(name):
    """A fresh filename prefix: unique inputs, so no test is served from another one's cache."""
    return f"clients/{name}_{uuid.uuid4().hex[:8]}"


def write_png(path, size, rgb):
    Image.new("RGB", size, rgb).save(path, format="PNG")
    return path


def assert_image(image, size, rgb, tolerance=1):
    """`image` is PNG bytes or a PIL image; every pixel must be `rgb` (within the 8-bit truncation of 1/255)."""
    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
        assert image.format == "PNG"
    image.load()
    assert image.size == size
    for (low, high), expected in zip(image.convert("RGB").getextrema(), rgb):
        assert expected - tolerance <= low <= high <= expected + tolerance, (image.convert("RGB").getextrema(), rgb)


def block_queue(server, seconds=1.0):
    """Queues a prompt (no client_id) that keeps the worker busy, so the next prompt is still pending while a
    library that submits first and connects its WebSocket afterwards gets connected."""
    prompt = {"1": {"class_type": "Sleep", "inputs": {"value": float(uuid.uuid4().int % 10**6), "seconds": seconds}},
              "2": {"class_type": "Record", "inputs": {"value": ["1", 0]}}}
    return server.queue_prompt(prompt)["prompt_id"]


def upload_corrupt_png(server):
    """A `.png` that is not an image: validation only checks LoadImage's file exists, decoding fails at run time
    (the same in ComfyUI)."""
    name = f"corrupt_{uuid.uuid4().hex[:8]}.png"
    response = server.post("/upload/image", files={"image": (name, b"this is not a png", "image/png")})
    assert response.status_code == 200, response.text
    return response.json()["name"]


def wait_idle(server, timeout=30):
    deadline = time.monotonic() + timeout
    while server.get("/prompt").json()["exec_info"]["queue_remaining"]:
        assert time.monotonic() < deadline, "queue did not drain"
        time.sleep(0.02)


@pytest.fixture
def ws_timeout():
    """websocket-client sockets created by libraries (no timeout of their own) give up after 30 s."""
    previous = websocket.getdefaulttimeout()
    websocket.setdefaulttimeout(30)
    yield
    websocket.setdefaulttimeout(previous)


# -- comfy-api-simplified ----------------------------------------------------------------------------

def test_comfy_api_simplified_generate_and_upload(server, tmp_path):
    from comfy_api_simplified import ComfyApiWrapper, ComfyWorkflowWrapper

    api = ComfyApiWrapper(server.url)
    workflow = ComfyWorkflowWrapper(empty_image_workflow(prefix("simplified")))
    assert workflow.list_nodes() == ["Empty Image", "Invert Image", "Save Image"]
    workflow.set_node_param("Empty Image", "color", 0x203040)
    workflow.set_node_param("Empty Image", "width", 40)
    images = api.queue_and_wait_images(workflow, "Save Image")
    # Keys are file names from /history (not indexes): no stray binary frames were taken for images.
    assert len(images) == 1 and next(iter(images)).endswith("_00001_.png")
    assert_image(next(iter(images.values())), (40, SIZE[1]), inverted(0x203040))

    # Upload with its helper (default subfolder), then LoadImage it as "<subfolder>/<name>".
    source = write_png(tmp_path / f"simplified_{uuid.uuid4().hex[:8]}.png", (20, 12), (10, 200, 30))
    uploaded = api.upload_image(source)
    assert uploaded == {"name": source.name, "subfolder": "default_upload_folder", "type": "input"}
    workflow = ComfyWorkflowWrapper(load_image_workflow("x.png", prefix("simplified_load")))
    workflow.set_node_param("Load Image", "image", f"{uploaded['subfolder']}/{uploaded['name']}")
    images = api.queue_and_wait_images(workflow, "Save Image")
    assert len(images) == 1
    assert_image(next(iter(images.values())), (20, 12), (10, 200, 30))

    info = api.get_object_info("EmptyImage")
    assert info["EmptyImage"]["input"]["required"]["color"][0] == "INT"
    assert "devices" in api.get_system_stats()
    assert isinstance(api.get_embeddings(), list)


def test_comfy_api_simplified_errors(server):
    from comfy_api_simplified import ComfyApiError, ComfyApiWrapper, ComfyWorkflowWrapper

    api = ComfyApiWrapper(server.url)
    # Validation failure (width below its minimum): the library raises on the 400 (it reports only the status).
    workflow = ComfyWorkflowWrapper(empty_image_workflow(prefix("simplified_bad")))
    workflow.set_node_param("Empty Image", "width", 0)
    with pytest.raises(ComfyApiError, match="400"):
        api.queue_and_wait_images(workflow, "Save Image")

    # Execution failure: the library raises on `execution_error` for its prompt. It submits before it connects
    # its WebSocket, so the worker is kept busy meanwhile (else the error may be over before it listens).
    corrupt = upload_corrupt_png(server)
    blocker = block_queue(server)
    assert api.get_queue_size_before(blocker) in (0, 1)  # running, or still pending: queue items are 5-tuples
    with pytest.raises(ComfyApiError, match="Execution error"):
        api.queue_and_wait_images(ComfyWorkflowWrapper(load_image_workflow(corrupt, prefix("x"))), "Save Image")
    wait_idle(server)  # it raised at `execution_error`, before the prompt was fully done


# -- comfyui-api-client ------------------------------------------------------------------------------

def import_comfyui_api_client():
    """comfyui-api-client 0.1.0's modules import each other as `api.<module>` (its source folder's name), so
    `import comfyui_api_client` fails with ModuleNotFoundError: No module named 'api' anywhere. Its unmodified
    files are loaded under that package name, and the alias is removed again afterwards."""
    folder = importlib.util.find_spec("comfyui_api_client").submodule_search_locations[0]
    saved = {name: sys.modules.pop(name) for name in list(sys.modules) if name == "api" or name.startswith("api.")}
    package = types.ModuleType("api")
    package.__path__ = [folder]
    sys.modules["api"] = package
    try:
        return importlib.import_module("api.api_helpers"), importlib.import_module("api.websocket_api")
    finally:
        for name in [n for n in sys.modules if n == "api" or n.startswith("api.")]:
            del sys.modules[name]
        sys.modules.update(saved)


def test_comfyui_api_client(server, tmp_path, ws_timeout):
    helpers, ws_api = import_comfyui_api_client()
    address = f"127.0.0.1:{server.port}"

    info = ws_api.get_node_info_by_class("ImageInvert", address)
    assert info["ImageInvert"]["input"]["required"] == {"image": ["IMAGE"]}
    assert info["ImageInvert"]["output"] == ["IMAGE"]

    # WebSocket opened first, prompt queued, progress tracked until `executing` null, images via history + /view.
    images = helpers.generate_image_by_prompt(empty_image_workflow(prefix("apiclient"), batch_size=2), address)
    assert len(images) == 2
    for image in images:
        assert_image(image, SIZE, inverted(0x00FF00))

    # Its own lower-level calls: queue, wait, history, image.
    ws, _, client_id = helpers.open_websocket_connection(address)
    try:
        workflow = empty_image_workflow(prefix("apiclient_low"), color=0xFF0000)
        prompt_id = ws_api.queue_prompt(workflow, client_id, address)["prompt_id"]
        helpers.track_progress(workflow, ws, prompt_id)
    finally:
        ws.close()
    history = ws_api.get_history(prompt_id, address)[prompt_id]
    assert history["status"]["status_str"] == "success" and history["status"]["completed"] is True
    (picture,) = history["outputs"]["3"]["images"]
    assert picture["type"] == "output" and picture["subfolder"] == "clients"
    assert_image(ws_api.get_image(picture["filename"], picture["subfolder"], picture["type"], address),
                 SIZE, inverted(0xFF0000))

    # Upload (multipart via requests_toolbelt over urllib, fields image/type/overwrite/client_id) and run on it.
    name = f"apiclient_{uuid.uuid4().hex[:8]}.png"
    source = write_png(tmp_path / "source.png", (16, 8), (250, 5, 128))
    assert ws_api.upload_image(str(source), name, address, client_id) == {"name": name, "subfolder": "",
                                                                         "type": "input"}
    out = tmp_path / "out"
    helpers.generate_image_by_prompt_and_image(load_image_workflow(name, prefix("apiclient_load")), address,
                                               str(out), str(source), name)
    (saved,) = out.iterdir()
    assert_image(Image.open(saved), (16, 8), (250, 5, 128))


def test_comfyui_api_client_errors(server, ws_timeout):
    helpers, ws_api = import_comfyui_api_client()
    address = f"127.0.0.1:{server.port}"

    # Validation failure: urllib raises HTTPError 400 and the body is ComfyUI's error object.
    workflow = empty_image_workflow(prefix("apiclient_bad"))
    workflow["2"]["inputs"]["image"] = ["9", 0]  # link to a node that does not exist
    with pytest.raises(urllib.error.HTTPError) as raised:
        ws_api.queue_prompt(workflow, "someone", address)
    assert raised.value.code == 400
    body = json.loads(raised.value.read())
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert body["node_errors"]["2"]["class_type"] == "ImageInvert"
    assert body["node_errors"]["2"]["dependent_outputs"] == ["3"]
    assert body["node_errors"]["2"]["errors"][0]["type"] == "exception_during_inner_validation"

    # Execution failure: the library does not surface it; tracking still ends (executing null) and no images
    # come back; the error is in the history entry.
    corrupt = upload_corrupt_png(server)
    assert helpers.generate_image_by_prompt(load_image_workflow(corrupt, prefix("x")), address) == []
    last = json.loads(urllib.request.urlopen(f"http://{address}/history?max_items=1").read())
    (entry,) = last.values()
    assert entry["status"]["status_str"] == "error"
    assert entry["status"]["messages"][-1][0] == "execution_error"
    assert entry["status"]["messages"][-1][1]["node_type"] == "LoadImage"


# -- pycomfy -------------------------------------------------------------------------------------------

def run_with_timeout(function, seconds=45):
    """pycomfy waits up to 240 s on its WebSocket: run it in a thread and fail early instead."""
    result = {}

    def target():
        try:
            result["value"] = function()
        except BaseException as error:  # noqa: BLE001 - handed back to the test
            result["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "pycomfy did not return"
    if "error" in result:
        raise result["error"]
    return result["value"]


def test_pycomfy(server, tmp_path):
    import pycomfy
    import requests

    api = pycomfy.ComfyAPI(server.url)  # no comfyui_path: it checks and downloads no model files
    assert api.comfyui_path is None
    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(empty_image_workflow(prefix("pycomfy"), batch_size=3)))
    workflow = api.load_workflow(str(path))
    (empty,) = workflow.get_nodes_by_class("EmptyImage")
    workflow.set_node(empty, {"color": 0x0000FF, "height": 10})
    try:
        images = run_with_timeout(workflow.execute)  # returns on the first `executed` with images
        assert len(images) == 3
        for image in images:
            assert_image(image, (SIZE[0], 10), inverted(0x0000FF))

        # Execution failure: raises with the node id, type and exception message of `execution_error`.
        corrupt = upload_corrupt_png(server)
        failing = pycomfy.Workflow(client=api, workflow_data=load_image_workflow(corrupt, prefix("x")))
        with pytest.raises(pycomfy.ComfyAPIError, match=r"Execution failed on node 1 \(LoadImage\)"):
            run_with_timeout(failing.execute)

        # Validation failure: requests' HTTPError with the 400 body.
        bad = pycomfy.Workflow(client=api, workflow_data=empty_image_workflow(prefix("x"), color=-1))
        with pytest.raises(requests.HTTPError) as raised:
            run_with_timeout(bad.execute)
        assert raised.value.response.status_code == 400
        errors = raised.value.response.json()["node_errors"]["1"]["errors"]
        assert errors[0]["type"] == "value_smaller_than_min" and errors[0]["extra_info"]["input_name"] == "color"
    finally:
        api.close()


# -- plain WebSocket flows, as ComfyUI's script_examples/websockets_api_example.py ---------------------

def example_queue_prompt(url, prompt, client_id, prompt_id):
    body = json.dumps({"prompt": prompt, "client_id": client_id, "prompt_id": prompt_id}).encode("utf-8")
    return json.loads(urllib.request.urlopen(urllib.request.Request(f"{url}/prompt", data=body)).read())


def example_get_history(url, prompt_id):
    with urllib.request.urlopen(f"{url}/history/{prompt_id}") as response:
        return json.loads(response.read())


def example_get_image(url, filename, subfolder, folder_type):
    query = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": folder_type})
    with urllib.request.urlopen(f"{url}/view?{query}") as response:
        return response.read()


def example_collect_images(url, prompt_id):
    history = example_get_history(url, prompt_id)[prompt_id]
    output_images = {}
    for node_id in history["outputs"]:
        node_output = history["outputs"][node_id]
        output_images[node_id] = [example_get_image(url, image["filename"], image["subfolder"], image["type"])
                                  for image in node_output.get("images", [])]
    return history, output_images


def two_output_workflow(name, color):
    """The inverted image saved (output) and previewed (temp), a batch of two."""
    workflow = empty_image_workflow(prefix(name), color=color, batch_size=2)
    workflow["4"] = node("PreviewImage", "Preview Image", images=["2", 0])
    return workflow


def check_two_outputs(history, images, color):
    assert history["status"]["status_str"] == "success"
    assert sorted(images) == ["3", "4"]
    assert [image["type"] for image in history["outputs"]["3"]["images"]] == ["output", "output"]
    assert [image["type"] for image in history["outputs"]["4"]["images"]] == ["temp", "temp"]
    for data in images["3"] + images["4"]:
        assert_image(data, SIZE, inverted(color))


def test_plain_websocket_client_flow(server):
    client_id = str(uuid.uuid4())
    ws = websocket.WebSocket()
    ws.connect(f"ws://127.0.0.1:{server.port}/ws?clientId={client_id}", timeout=30)
    try:
        prompt_id = str(uuid.uuid4())
        queued = example_queue_prompt(server.url, two_output_workflow("plain_wsclient", 0x336699), client_id,
                                      prompt_id)
        assert queued["prompt_id"] == prompt_id and queued["node_errors"] == {}
        seen = []
        while True:
            out = ws.recv()
            if isinstance(out, str):
                message = json.loads(out)
                seen.append(message["type"])
                if message["type"] == "executing":
                    data = message["data"]
                    if data["node"] is None and data["prompt_id"] == prompt_id:
                        break  # execution is done
            else:
                continue  # previews are binary data
    finally:
        ws.close()
    assert seen[0] == "status" and "execution_start" in seen and "execution_success" in seen
    history, images = example_collect_images(server.url, prompt_id)
    check_two_outputs(history, images, 0x336699)


def test_plain_websockets_asyncio_flow(server):
    import websockets

    async def flow():
        client_id = uuid.uuid4().hex
        async with websockets.connect(f"ws://127.0.0.1:{server.port}/ws?clientId={client_id}") as ws:
            hello = json.loads(await asyncio.wait_for(ws.recv(), 30))
            assert hello["type"] == "status" and hello["data"]["sid"] == client_id
            prompt_id = str(uuid.uuid4())
            # The HTTP call runs off the event loop, like an async client would.
            await asyncio.to_thread(example_queue_prompt, server.url, two_output_workflow("plain_websockets", 0xC0C0C0),
                                    client_id, prompt_id)
            events = []
            while True:
                out = await asyncio.wait_for(ws.recv(), 30)
                if isinstance(out, bytes):
                    continue
                message = json.loads(out)
                events.append(message)
                if (message["type"] == "executing" and message["data"]["node"] is None
                        and message["data"]["prompt_id"] == prompt_id):
                    return prompt_id, events

    prompt_id, events = asyncio.run(flow())
    executed = {m["data"]["node"]: m["data"]["output"] for m in events if m["type"] == "executed"}
    assert sorted(executed) == ["3", "4"]
    history, images = example_collect_images(server.url, prompt_id)
    assert executed == history["outputs"]  # the WS `executed` outputs are what history recorded
    check_two_outputs(history, images, 0xC0C0C0)
