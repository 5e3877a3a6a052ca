"""DreamBooth Studio for ComfyUI: personalize an SD 1.x/2.x checkpoint from 3-5 photos.

Registration only: the nodes import the engine (torch, diffusers) when they run, so a broken optional dependency
shows up as a clear error on the node that needs it instead of stopping the pack from loading.
"""
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes.extension import DreamBoothExtension

    return DreamBoothExtension()
