from comfy_api.latest import io

from . import comfy_hooks
from ..trainer.hosts import require_class_noun
from .comfy_io import pil_to_image_batch, plain_errors

CATEGORY = "DreamBooth"


class GenerateClassPriors(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DBStudioGenerateClassPriors",
            display_name="Generate Class Priors",
            category=CATEGORY,
            description="Images of 'a [class noun]' drawn by the frozen base model, for prior preservation. Cached on "
                        "disk: the same settings never generate twice, asking for more adds only the missing ones.",
            hidden=[io.Hidden.unique_id],
            inputs=[
                io.Combo.Input("ckpt_name", options=comfy_hooks.checkpoint_names(),
                               tooltip="The base checkpoint you will train."),
                io.String.Input("class_noun", default="dog",
                                tooltip="The prompt is 'a [class noun]'. Connect Pick Rare Token's class_noun to type "
                                        "it once."),
                io.Int.Input("count", default=200, min=1, max=5000, tooltip="How many images (the paper: a few hundred)."),
                io.Int.Input("size", default=0, min=0, max=2048, step=32,
                             tooltip="Width and height in pixels; 0 = the model's own size (512 for SD 1.x, 1024 for "
                                     "SDXL, 32 for the toy model). Use the training resolution."),
                io.Int.Input("steps", default=30, min=1, max=200, tooltip="Sampling steps per image."),
                io.Float.Input("guidance", default=7.5, min=0.0, max=30.0, step=0.5,
                               tooltip="Classifier-free guidance."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Image i uses seed + i."),
            ],
            outputs=[io.Image.Output("class_images", display_name="class_images",
                                     tooltip="The class images, for DreamBooth Train.")],
        )

    @classmethod
    def execute(cls, ckpt_name, class_noun, count, size, steps, guidance, seed) -> io.NodeOutput:
        from ..trainer.api import class_images
        from ..trainer.priors import load_prior_images
        from ..trainer.prompts import class_prompt

        prompt = class_prompt(require_class_noun(class_noun))
        progress = comfy_hooks.ComfyCallbacks(cls.hidden.unique_id, count)

        def on_progress(done, total):
            progress.bar.update_absolute(done, total)  # raises on the stop button; finished images stay cached

        comfy_hooks.free_comfy_models()  # a model ComfyUI keeps loaded would crowd the GPU
        with plain_errors({"width": "size", "height": "size", "resolution": "size"}):
            paths = class_images(comfy_hooks.checkpoint_path(ckpt_name), prompt, count=count,
                                 cache_root=comfy_hooks.prior_cache_folder(), size=size, steps=steps,
                                 guidance=guidance, seed=seed, device=comfy_hooks.device(), log=comfy_hooks.log,
                                 on_progress=on_progress)
        comfy_hooks.release()
        return io.NodeOutput(pil_to_image_batch(load_prior_images(paths)))
