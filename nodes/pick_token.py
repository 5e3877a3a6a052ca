from comfy_api.latest import io, ui

from . import comfy_hooks
from ..trainer.hosts import require_class_noun
from .comfy_io import plain_errors

CATEGORY = "DreamBooth"


class PickRareToken(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DBStudioPickRareToken",
            display_name="Pick Rare Token",
            category=CATEGORY,
            description="Proposes rare one-token identifiers and ranks them by how little they move this checkpoint "
                        "(a weak prior is what the subject can take over). Never 'sks'.",
            inputs=[
                io.Combo.Input("ckpt_name", options=comfy_hooks.checkpoint_names(),
                               tooltip="The base checkpoint you will train (SD 1.x, 2.x or SDXL)."),
                io.String.Input("class_noun", default="dog", tooltip="What the subject is: dog, backpack, man..."),
                io.Int.Input("candidates", default=8, min=1, max=50,
                             tooltip="How many ranked identifiers to show on the node."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Which vocabulary tokens are tried; the same seed gives the same list."),
            ],
            outputs=[
                io.String.Output("identifier", display_name="identifier",
                                 tooltip="The best (weakest-prior) identifier, e.g. for DreamBooth Train."),
                io.String.Output("instance_prompt", display_name="instance_prompt",
                                 tooltip="'a [identifier] [class noun]'"),
                # Last, so that workflows saved before it keep their links.
                io.String.Output("class_noun_out", display_name="class_noun",  # ids: unique over inputs too
                                 tooltip="The class noun typed here, for Generate Class Priors and DreamBooth Train: "
                                         "type it once."),
            ],
        )

    @classmethod
    def execute(cls, ckpt_name, class_noun, candidates, seed) -> io.NodeOutput:
        from ..trainer.api import pick_identifiers
        from ..trainer.prompts import instance_prompt

        class_noun = require_class_noun(class_noun)
        comfy_hooks.free_comfy_models()  # a model ComfyUI keeps loaded would crowd the GPU
        with plain_errors({}):
            ranked = pick_identifiers(comfy_hooks.checkpoint_path(ckpt_name), class_noun, count=candidates,
                                      seed=seed, device=comfy_hooks.device(), log=comfy_hooks.log)
        comfy_hooks.release()
        table = "\n".join(f"{t.identifier:<8} prior strength {t.strength:.3f}" for t in ranked)
        best = ranked[0].identifier
        return io.NodeOutput(best, instance_prompt(best, class_noun), class_noun,
                             ui=ui.PreviewText(f"weakest prior first:\n{table}"))
