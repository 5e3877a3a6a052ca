from comfy_api.latest import io

CATEGORY = "DreamBooth"


class EmptyLatentForVAE(io.ComfyNode):
    """Empty Latent Image assumes an 8x VAE; the toy model's VAE scales by 4, so its 32 px images are 8x8 latents."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DBStudioEmptyLatent",
            display_name="Empty Latent for VAE",
            category=CATEGORY,
            description="Empty Latent Image sized by the VAE that will decode it: for SD 1.x/2.x and SDXL the same as "
                        "Empty Latent Image, for the pack's toy model (whose VAE scales by 4) the right size too.",
            inputs=[
                io.Vae.Input("vae", tooltip="The VAE that will decode the images (e.g. from Load Subject Model)."),
                io.Int.Input("width", default=512, min=8, max=8192, step=8, tooltip="Image width in pixels."),
                io.Int.Input("height", default=512, min=8, max=8192, step=8, tooltip="Image height in pixels."),
                io.Int.Input("batch_size", default=1, min=1, max=4096, tooltip="How many images."),
            ],
            outputs=[io.Latent.Output("latent", display_name="LATENT",
                                      tooltip="The empty latent batch, for KSampler.")],
        )

    @classmethod
    def execute(cls, vae, width, height, batch_size) -> io.NodeOutput:
        import torch

        import comfy.model_management

        scale = vae.spacial_compression_encode()
        if width % scale or height % scale:
            raise ValueError(f"width and height must be multiples of {scale} for this VAE, got {width}x{height}.")
        shape = [batch_size, vae.latent_channels, height // scale, width // scale]
        return io.NodeOutput({"samples": torch.zeros(shape, device=comfy.model_management.intermediate_device())})
