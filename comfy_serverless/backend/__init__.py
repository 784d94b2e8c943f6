"""A ComfyUI installation as a second execution backend (--comfyui DIR, --comfyui-url URL).

The front keeps one queue, one history and one WebSocket hub; prompts whose nodes are all native run in this
process, any other runs on the backend, and the backend's events are relayed to the prompt's client:

- client.py: a small HTTP and WebSocket client on asyncio, h11 and wsproto (what the front already imports).
- process.py: the ComfyUI child process: its command line, private port, log and exit.
- backend.py: the backend's life (boot, crash, restart, stop) and running one prompt there, events relayed.

Nothing here is imported unless a backend is configured: the front's cold start stays as it is.
"""
