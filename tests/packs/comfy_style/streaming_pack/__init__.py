"""A pack with HTTP handlers that stream, written the way ComfyUI packs write them with aiohttp: server-sent
events, a chunked progress stream, a large file, a stream that fails half-way, and WebSocket handlers."""

import asyncio
import json
import os

import folder_paths
from aiohttp import WSMsgType, web
from server import PromptServer

routes = PromptServer.instance.routes
streams_ended = {"cancelled": 0, "finished": 0}


@routes.get("/stream_pack/events")
async def events(request):
    """Server-sent events, one every `gap` seconds."""
    count = int(request.query.get("count", "3"))
    gap = float(request.query.get("gap", "0.4"))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    try:
        for number in range(count):
            await response.write(f"id: {number}\nevent: tick\ndata: {json.dumps({'n': number})}\n\n".encode())
            await asyncio.sleep(gap)
        await response.write(b"event: done\ndata: {}\n\n")
        await response.write_eof()
    except asyncio.CancelledError:
        streams_ended["cancelled"] += 1
        raise
    streams_ended["finished"] += 1
    return response


@routes.get("/stream_pack/endless")
async def endless(request):
    """Writes until the client leaves (then the write fails or the handler is cancelled)."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    try:
        number = 0
        while True:
            await response.write(f"data: {number}\n\n".encode())
            number += 1
            await asyncio.sleep(0.05)
    except (asyncio.CancelledError, ConnectionError):
        streams_ended["cancelled"] += 1
        raise


@routes.get("/stream_pack/ended")
async def ended(request):
    return web.json_response(streams_ended)


@routes.post("/stream_pack/gzip")
async def gzip_stream(request):
    """A compressed stream whose parts still arrive one by one."""
    response = web.StreamResponse()
    response.content_type = "text/plain"
    response.enable_compression(web.ContentCoding.gzip)
    await response.prepare(request)
    for word in (await request.text()).split():
        await response.write(word.encode() + b"\n")
        await asyncio.sleep(0.3)
    return response  # no write_eof: aiohttp's server ends it, and so does ours


@routes.get("/stream_pack/fails")
async def fails(request):
    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    await response.prepare(request)
    await response.write(b"first part\n")
    await asyncio.sleep(0.2)
    raise RuntimeError("the stream broke half-way")


@routes.get("/stream_pack/big/{name}")
async def big(request):
    return web.FileResponse(os.path.join(folder_paths.get_input_directory(), request.match_info["name"]))


@routes.get("/stream_pack/ws")
async def websocket(request):
    """Echoes text (upper-cased), JSON ({"echo": ...}) and bytes (reversed); 'close' ends it from our side."""
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    await ws.send_json({"hello": request.query.get("name", "?"), "peer": request.remote})
    async for message in ws:
        if message.type == WSMsgType.TEXT:
            if message.data == "close":
                await ws.close(code=4000, message=b"asked to")
                break
            if message.data.startswith("{"):
                await ws.send_json({"echo": json.loads(message.data)})
            else:
                await ws.send_str(message.data.upper())
        elif message.type == WSMsgType.BINARY:
            await ws.send_bytes(message.data[::-1])
    return ws


async def ticker(request):
    """A WebSocket that pushes messages over time on its own, registered on app.router (its own path only)."""
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    for number in range(int(request.match_info["count"])):
        await ws.send_str(f"tick {number}")
        await asyncio.sleep(0.3)
    await ws.close()
    return ws


PromptServer.instance.app.router.add_get("/stream_pack/ticker/{count}", ticker)


class StreamPackNode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 1})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "comfy_style"

    def run(self, value):
        return (value,)


NODE_CLASS_MAPPINGS = {"StreamPackNode": StreamPackNode}
