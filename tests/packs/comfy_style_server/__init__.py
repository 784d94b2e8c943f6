"""A custom node pack written the way ComfyUI packs are: HTTP routes on `PromptServer.instance`, aiohttp
handlers, and a node that messages its client over the WebSocket. Used by tests/test_pack_server_and_v3.py."""

import json
import os

import server
from aiohttp import web
from server import BinaryEventTypes, PromptServer

HERE = os.path.dirname(os.path.abspath(__file__))
routes = PromptServer.instance.routes
PROMPTS_SEEN = []


@routes.get("/my_pack/hello")
async def hello(request):
    return web.json_response({"hello": "world", "query": dict(request.query), "remote": request.remote})


@routes.post("/my_pack/echo")
async def echo(request):
    data = await request.json()
    return web.json_response({"got": data, "content_type": request.content_type}, status=201)


@routes.get("/my_pack/items/{name}")
async def item(request):
    return web.Response(text=f"item {request.match_info['name']}", headers={"X-Pack": "yes"})


@routes.post("/my_pack/form")
async def form(request):
    fields = await request.post()
    upload = fields.get("file")
    return web.json_response({"name": fields.get("name"),
                              "file": upload.filename if upload is not None else None,
                              "size": len(upload.file.read()) if upload is not None else 0})


@routes.put("/my_pack/raw")
async def raw(request):
    body = await request.read()
    text = await request.text()
    return web.Response(body=body[::-1], content_type="application/octet-stream",
                        headers={"X-Text-Length": str(len(text))})


@routes.get("/my_pack/missing")
async def missing(request):
    raise web.HTTPNotFound(text="no such thing")


@routes.get("/my_pack/broken")
async def broken(request):
    raise RuntimeError("this handler is broken")


@routes.get("/my_pack/file")
def the_file(request):  # old packs write synchronous handlers
    return web.FileResponse(os.path.join(HERE, "web", "hello.txt"))


@routes.get("/my_pack/stream")
async def stream(request):
    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    await response.prepare(request)
    for part in ("one ", "two ", "three"):
        await response.write(part.encode())
    await response.write_eof()
    return response


@routes.get("/my_pack/prompts_seen")
async def prompts_seen(request):
    return web.json_response(PROMPTS_SEEN)


@routes.get("/system_stats")
async def hijack(request):  # the server's own routes always win
    return web.json_response({"hijacked": True})


routes.static("/my_pack/static", os.path.join(HERE, "web"))


async def direct(request):
    return web.Response(text="direct")


PromptServer.instance.app.add_routes([web.get("/my_pack_direct", direct)])


def on_prompt(json_data):
    PROMPTS_SEEN.append(sorted(json_data.get("prompt", {})))
    return json_data


server.PromptServer.instance.add_on_prompt_handler(on_prompt)


class PackMessenger:
    """Output node: messages the client that queued the prompt (JSON event, progress text, raw bytes)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": "hi"})}, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "test"

    def run(self, text, unique_id):
        instance = PromptServer.instance
        sid = instance.client_id
        instance.send_sync("my_pack.event", {"node": unique_id, "text": text, "last_node": instance.last_node_id},
                           sid)
        instance.send_progress_text(f"working on {text}", unique_id, sid)
        instance.send_sync(9, json.dumps({"raw": text}).encode(), sid)
        from PIL import Image

        picture = Image.new("RGB", (600, 300), (255, 0, 0))
        instance.send_sync(BinaryEventTypes.UNENCODED_PREVIEW_IMAGE, ("PNG", picture, None), sid)
        instance.send_sync(BinaryEventTypes.PREVIEW_IMAGE_WITH_METADATA,
                           (("JPEG", picture, 64), {"node_id": unique_id, "prompt_id": instance.last_prompt_id}), sid)
        return {"ui": {"sent_to": [sid]}}


NODE_CLASS_MAPPINGS = {"PackMessenger": PackMessenger}
