"""A pack that registers a route but leaves aiohttp to its handler: the server must not import aiohttp for it
until the route is called. Its node reports whether aiohttp is loaded in the server process."""

import sys

from server import PromptServer


@PromptServer.instance.routes.get("/lazy_pack/ping")
async def ping(request):
    from aiohttp import web

    return web.json_response({"pong": True, "name": request.query.get("name")})


class AiohttpProbe:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    @classmethod
    def IS_CHANGED(cls):
        return float("nan")  # run every time

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "test"

    def run(self):
        return {"ui": {"aiohttp_loaded": ["aiohttp" in sys.modules]}}


NODE_CLASS_MAPPINGS = {"AiohttpProbe": AiohttpProbe}
