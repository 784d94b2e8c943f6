"""A pack that messages clients through every PromptServer send variant ComfyUI packs use: send_sync from a
node, and send / send_json / send_bytes / send_image* / sockets from an async route handler."""

from aiohttp import web
from PIL import Image
from server import BinaryEventTypes, PromptServer, send_socket_catch_exception

instance = PromptServer.instance


class MessengerVariants:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": "hi"})}, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "comfy_style"

    def run(self, text, unique_id):
        server = PromptServer.instance
        sid = server.client_id
        small = Image.new("RGB", (40, 20), (0, 0, 255))
        server.send_sync(BinaryEventTypes.UNENCODED_PREVIEW_IMAGE, ("PNG", small, 80), sid)  # fitted: 80x40
        metadata = {"node_id": unique_id}
        server.send_sync(BinaryEventTypes.PREVIEW_IMAGE_WITH_METADATA, (("JPEG", small, None), metadata), sid)
        server.send_sync("not a number", b"bytes need an integer event", sid)  # dropped with a warning
        server.send_sync("messenger.done", {"text": text, "metadata_after": metadata}, sid)
        return {"ui": {"encoded": [list(server.encode_bytes(7, b"ab"))]}}


@instance.routes.post("/messenger/send")
async def send_all(request):
    body = await request.json()
    sid = body["sid"]
    server = PromptServer.instance
    await server.send("messenger.plain", {"n": 1}, sid)
    await server.send_json(7, {"json": "always"}, sid)  # any event: still a JSON frame
    await server.send_bytes(BinaryEventTypes.UNENCODED_PREVIEW_IMAGE, b"raw", sid)  # no image encoding here
    await server.send(12, bytearray(b"\x00\x01"), sid)
    await server.send_image(("JPEG", Image.new("RGB", (30, 60), (9, 9, 9)), 20), sid)
    await server.send_image_with_metadata(("PNG", Image.new("RGB", (4, 4)), None), {"k": "v"}, sid)
    socket = server.sockets[sid]
    await send_socket_catch_exception(socket.send_str, '{"type": "messenger.raw", "data": {}}')
    await socket.send_json({"type": "messenger.last", "data": {"closed": socket.closed}})
    try:
        await server.send_bytes("text event", b"x", sid)
        refused = None
    except RuntimeError as exc:
        refused = str(exc)
    return web.json_response({"refused": refused, "encoded": type(server.encode_bytes(1, b"")).__name__})


NODE_CLASS_MAPPINGS = {"MessengerVariants": MessengerVariants}
