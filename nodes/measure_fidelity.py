import json
import os
from pathlib import Path

import folder_paths
from comfy_api.latest import io, ui

from . import comfy_hooks
from .comfy_io import image_batch_to_pil, pil_to_image_batch, plain_errors

CATEGORY = "DreamBooth"
# Transformers folders (a full CLIP, a DINO) and files the user keeps for measuring, beside ComfyUI's clip_vision.
EVALUATORS = "dreambooth_evaluators"
AUTO, NONE = "auto", "none"


def evaluators_folder() -> Path:
    return Path(folder_paths.models_dir) / EVALUATORS


def model_sources() -> dict[str, str]:
    """What the model inputs offer -> its path: ComfyUI's clip_vision files, then the files and folders in
    models/dreambooth_evaluators."""
    sources = {f"clip_vision/{name}": folder_paths.get_full_path("clip_vision", name)
               for name in folder_paths.get_filename_list("clip_vision")}
    folder = evaluators_folder()
    if folder.is_dir():
        sources.update({f"{EVALUATORS}/{entry.name}": str(entry) for entry in sorted(folder.iterdir())
                        if not entry.name.startswith(".") and (entry.is_dir() or entry.suffix == ".safetensors")})
    return sources


class MeasureSubjectFidelity(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        options = [AUTO, NONE, *model_sources()]
        return io.Schema(
            node_id="DBStudioMeasureFidelity",
            display_name="Measure Subject Fidelity",
            category=CATEGORY,
            description="The DreamBooth paper's metrics with the embedding models you have: DINO and CLIP-I (how much "
                        "the generated images look like the subject's photos), CLIP-T (how well they follow their "
                        "prompts), PRES (how much the trained model's 'a [class]' has turned into your subject; lower "
                        "is better). Models: CLIP vision files in models/clip_vision; a full CLIP or a DINO "
                        f"(transformers folders) in models/{EVALUATORS}. A metric without its model is skipped and "
                        "the node says which file to put where.",
            inputs=[
                io.Image.Input("photos", tooltip="Real photos of the subject (held-out ones, not the training photos, "
                                                 "measure best)."),
                io.Image.Input("generated", optional=True,
                               tooltip="Images the trained model drew with the identifier ('a zwx dog on the "
                                       "beach'): DINO, CLIP-I, CLIP-T."),
                io.String.Input("prompts", multiline=True, default="",
                                tooltip="The generated images' prompts, one per line: one line for all images, one per "
                                        "image, or one per equal run of consecutive images. For CLIP-T."),
                io.Image.Input("class_samples", optional=True,
                               tooltip="The trained model's images of 'a [class noun]' (no identifier): PRES."),
                io.String.Input("identifier", default="",
                                tooltip="The identifier (e.g. from Pick Rare Token); CLIP-T reads the prompts without "
                                        "it."),
                io.Combo.Input("dino_model", options=options, default=AUTO,
                               tooltip="The DINO for DINO and PRES: auto picks the paper's DINO ViT-S/16 if it is "
                                       "there, else another DINO."),
                io.Combo.Input("clip_model", options=options, default=AUTO,
                               tooltip="The CLIP for CLIP-I and CLIP-T: auto picks a full CLIP (CLIP-T needs its text "
                                       "half), else a CLIP vision file."),
            ],
            outputs=[
                io.Image.Output("table", display_name="table", tooltip="The scores as a small table image."),
                io.String.Output("report", display_name="report",
                                 tooltip="The table as text, with why any metric was skipped."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, **_) -> str:
        # ComfyUI caches by input values; with "auto", a model added or replaced changes the result too.
        return json.dumps(sorted((name, os.stat(path).st_mtime_ns) for name, path in model_sources().items()))

    @classmethod
    def execute(cls, photos, prompts, identifier, dino_model, clip_model, generated=None,
                class_samples=None) -> io.NodeOutput:
        from ..trainer.measure import assign_prompts, load_embedders, measure, table_image, table_text

        sources = model_sources()
        chosen = {kind: sources.get(name, name) for kind, name in (("dino", dino_model), ("clip", clip_model))}
        with plain_errors({}):
            generated = image_batch_to_pil(generated) if generated is not None else []
            prompt_list = assign_prompts(prompts, len(generated))
            models = load_embedders(list(sources.values()), home=str(evaluators_folder()), **chosen)
            models.to(comfy_hooks.device())
            rows = measure(image_batch_to_pil(photos), generated, prompt_list,
                           image_batch_to_pil(class_samples) if class_samples is not None else [], models,
                           identifier=identifier)
        notes = models.notes
        del models  # the models leave memory before the node returns
        comfy_hooks.release()
        text = table_text(rows, notes)
        return io.NodeOutput(pil_to_image_batch([table_image(rows)]), text, ui=ui.PreviewText(text))
