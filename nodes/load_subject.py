from comfy_api.latest import io

from . import comfy_hooks
from .comfy_io import plain_errors

CATEGORY = "DreamBooth"


class LoadSubjectModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DBStudioLoadSubjectModel",
            display_name="Load Subject Model",
            category=CATEGORY,
            description="Loads a DreamBooth checkpoint like Load Checkpoint does, plus the trigger phrase it was "
                        "trained with, ready to put into your prompt. Also loads the pack's small toy models, which "
                        "Load Checkpoint cannot.",
            inputs=[
                io.Combo.Input("ckpt_name", options=comfy_hooks.checkpoint_names(),
                               tooltip="A checkpoint; trained ones are under dreambooth/. Connect DreamBooth Train's "
                                       "checkpoint output here to load what it just made."),
            ],
            outputs=[
                io.Model.Output("model", display_name="model", tooltip="The denoising model, for KSampler."),
                io.Clip.Output("clip", display_name="clip",
                               tooltip="The text encoder, for CLIP Text Encode; it knows the identifier."),
                io.Vae.Output("vae", display_name="vae", tooltip="The VAE, for VAE Decode and Empty Latent for VAE."),
                io.String.Output("trigger_phrase", display_name="trigger_phrase",
                                 tooltip="e.g. 'a zwx dog' (empty for other checkpoints)."),
            ],
        )

    @classmethod
    def execute(cls, ckpt_name) -> io.NodeOutput:
        from ..trainer.checkpoint import read_trigger_phrase
        from .comfy_models import load_checkpoint

        path = comfy_hooks.checkpoint_path(ckpt_name)
        with plain_errors({}):
            model, clip, vae = load_checkpoint(path)
            return io.NodeOutput(model, clip, vae, read_trigger_phrase(path))
