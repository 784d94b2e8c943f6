"""Adapters that put the server behind serverless platforms' own job interfaces (RunPod, ...).

Each adapter drives an unchanged `comfy-serverless serve` process through its HTTP and WebSocket API.
"""
