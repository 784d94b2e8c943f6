"""ComfyUI's `comfy_api` package for node packs: the V3 node API (`comfy_api.latest`, and the versioned names
`comfy_api.v0_0_2` and `comfy_api.v0_0_1` that ComfyUI 0.3.64 ships, which are the same API here).

A face over comfy_serverless.catalog.v3, which runs V3 nodes on the V1 engine (docs/comfy-api-contract.md §2.4).
"""
