from comfy_api.latest import io, ui

from ..trainer.config import ATTENTIONS, OPTIMIZERS, PRECISIONS  # light modules: no torch at registration
from ..trainer.presets import PRESET_NAMES
from . import comfy_hooks
from ..trainer.hosts import require_class_noun
from .comfy_io import folder_fingerprint, image_batch_to_pil, pil_to_image_batch, plain_errors

CATEGORY = "DreamBooth"

# The engine's setting names -> this node's inputs, for its errors and log lines. ("output" only as a message's
# subject: the word also means the file.)
RENAMES = {"base_model": "ckpt_name", "instance_dir": "instance_folder", "max_train_steps": "steps",
           "mixed_precision": "precision", "sample_prompts": "sample_prompt", "output:": "output_name:"}


class DreamBoothTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DBStudioTrain",
            display_name="DreamBooth Train",
            category=CATEGORY,
            description="Fine-tunes the checkpoint on your photos with prior preservation and saves it to "
                        "models/checkpoints/dreambooth/. The stop button ends the run after the current step; "
                        "queueing again resumes it.",
            is_output_node=True,
            hidden=[io.Hidden.unique_id],
            inputs=[
                io.Combo.Input("ckpt_name", options=comfy_hooks.checkpoint_names(),
                               tooltip="The base checkpoint (SD 1.x, 2.x or SDXL, .safetensors); which of them it is "
                                       "is read from the file."),
                io.String.Input("identifier", default="", tooltip="The rare token, e.g. from Pick Rare Token."),
                io.String.Input("class_noun", default="dog",
                                tooltip="What the subject is: dog, backpack, man... Connect Pick Rare Token's "
                                        "class_noun to type it once."),
                io.Int.Input("num_class_images", default=200, min=1, max=5000,
                             tooltip="How many class images to generate when class_images is not connected."),
                io.Int.Input("steps", default=400, min=1, max=20000,
                             tooltip="About 80-120 per photo; more over-fits (the subject appears everywhere)."),
                io.Float.Input("learning_rate", default=2e-6, min=1e-7, max=1e-3, step=1e-7, round=False,
                               tooltip="1e-6 to 5e-6 for a full fine-tune."),
                io.Float.Input("prior_loss_weight", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Weight of the class-image loss (lambda; the paper uses 1.0). 0 turns prior "
                                       "preservation off."),
                io.Boolean.Input("train_text_encoder", default=False,
                                 tooltip="Also fine-tune the text encoder: better likeness, more memory."),
                io.Int.Input("resolution", default=0, min=0, max=2048, step=32,
                             tooltip="Training size in pixels; 0 = the model family's own: 512 for SD 1.x and 2.x, "
                                     "1024 for SDXL; 32 for the toy model. SD 1.x/2.x need a multiple of 64, SDXL "
                                     "of 32."),
                io.Int.Input("batch_size", default=1, min=1, max=16, tooltip="Photos per step."),
                io.Combo.Input("optimizer", options=list(OPTIMIZERS),
                               tooltip="(custom) adamw8bit uses least memory; auto = adamw8bit on CUDA."),
                io.Combo.Input("attention", options=list(ATTENTIONS),
                               tooltip="PyTorch SDPA by default; xformers only if installed and working."),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="(custom) Much less memory for about 20% more time."),
                io.Combo.Input("precision", options=list(PRECISIONS),
                               tooltip="(custom) Mixed precision; auto = bf16 where the GPU has it, else fp16."),
                io.Combo.Input("memory_preset", options=list(PRESET_NAMES), default="auto",
                               tooltip="Sets optimizer, precision, gradient_checkpointing, fused_backward and "
                                       "bf16_weights for a card of this size (auto: by your GPU's memory); those "
                                       "widgets count only with 'custom'. The README lists what each preset sets."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="The same seed and settings give the same model."),
                io.String.Input("output_name", default="zwx-dog",
                                tooltip="File name (no folders) under models/checkpoints/dreambooth/."),
                io.String.Input("sample_prompt", default="", optional=True,
                                tooltip="Prompt for the sample images; empty = '[instance prompt] on the beach'."),
                io.Image.Input("instance_images", optional=True,
                               tooltip="3-5 photos of your subject as an IMAGE batch (all one size). Or use "
                                       "instance_folder for photos of different sizes."),
                io.String.Input("instance_folder", default="", optional=True,
                                tooltip="A folder with 3-5 photos of the subject; used when instance_images is not "
                                        "connected."),
                io.Image.Input("class_images", optional=True,
                               tooltip="Class images (Generate Class Priors). If not connected they are generated "
                                       "and cached on the way."),
                # Last, so that workflows saved before these existed keep their widget values in place.
                io.Boolean.Input("fused_backward", default=False, optional=True,
                                 tooltip="(custom) Step the optimizer inside the backward pass, one tensor at a "
                                         "time: the model's gradients never exist together (3.2 GiB less for SD 1.5). "
                                         "Not with fp16."),
                io.Boolean.Input("bf16_weights", default=False, optional=True,
                                 tooltip="(custom) Train bf16 weights with stochastic rounding: half the weight "
                                         "memory. Needs a GPU with bf16 (RTX 30xx and newer)."),
                io.Boolean.Input("overwrite", default=False, optional=True,
                                 tooltip="Replace a file of this output_name that was trained from other settings or "
                                         "photos. Off: such a file is never touched, and the run stops at once."),
                io.Int.Input("evaluate_every", default=0, min=0, max=100000, optional=True,
                             tooltip="Score the model every N steps (and at 0 and the end) against your photos: "
                                     "subject fidelity and PRES with a DINO (or CLIP) model from "
                                     "models/dreambooth_evaluators or models/clip_vision, and save the best step "
                                     "instead of the last. 0 = off."),
                io.Int.Input("early_stop_patience", default=0, min=0, max=1000, optional=True,
                             tooltip="With evaluate_every: stop once this many evaluations in a row bring no better "
                                     "step. 0 = train all steps."),
            ],
            outputs=[
                io.AnyType.Output("checkpoint", display_name="checkpoint",
                                  tooltip="The saved checkpoint's name: wire it to Load Subject Model's ckpt_name."),
                io.Image.Output("loss_curve", display_name="loss_curve",
                                tooltip="The training loss per step, drawn as an image (for Preview Image)."),
                io.Image.Output("samples", display_name="samples",
                                tooltip="Images of sample_prompt drawn by the trained model at the end."),
                io.Image.Output("evaluation_curve", display_name="evaluation_curve",
                                tooltip="With evaluate_every: subject fidelity (green) and PRES (red) at each "
                                        "evaluated step, the PRES limit and the saved step (yellow)."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, instance_folder="", **_) -> str:
        # ComfyUI caches by input values; a folder's photos can change behind the same path.
        return folder_fingerprint(instance_folder)

    @classmethod
    def execute(cls, ckpt_name, identifier, class_noun, num_class_images, steps, learning_rate, prior_loss_weight,
                train_text_encoder, resolution, batch_size, optimizer, attention, gradient_checkpointing, precision,
                memory_preset, seed, output_name, instance_images=None, instance_folder="", class_images=None,
                sample_prompt="", fused_backward=False, bf16_weights=False, overwrite=False, evaluate_every=0,
                early_stop_patience=0) -> io.NodeOutput:
        from ..trainer.callbacks import TrainingCancelled
        from ..trainer.checkpoint import output_path
        from ..trainer.config import TrainConfig
        from ..trainer.dataset import SubjectImage
        from ..trainer.loop import train
        from ..trainer import prompts
        from ..trainer.evaluation import BestStep
        from ..trainer.plots import evaluation_curve, loss_curve

        class_noun = require_class_noun(class_noun)
        if instance_images is None and not instance_folder.strip():
            raise ValueError("No photos of the subject: connect 3-5 photos to instance_images, or set "
                             "instance_folder to a folder that holds them.")
        output = output_path(comfy_hooks.output_folder(), output_name)
        instance_prompt = prompts.instance_prompt(identifier, class_noun)
        cfg = TrainConfig(
            base_model=comfy_hooks.checkpoint_path(ckpt_name), instance_dir=instance_folder.strip(),
            identifier=identifier.strip(), class_noun=class_noun, output=str(output),
            with_prior_preservation=prior_loss_weight > 0, prior_loss_weight=prior_loss_weight,
            num_class_images=num_class_images if class_images is None else len(class_images),
            prior_cache_dir=comfy_hooks.prior_cache_folder(), resolution=resolution, batch_size=batch_size,
            max_train_steps=steps, learning_rate=learning_rate, train_text_encoder=train_text_encoder,
            memory_preset=memory_preset, optimizer=optimizer, attention=attention,
            gradient_checkpointing=gradient_checkpointing, mixed_precision=precision, fused_backward=fused_backward,
            bf16_weights=bf16_weights, overwrite=overwrite, seed=seed, device=comfy_hooks.device(),
            sample_prompts=[sample_prompt.strip() or f"{instance_prompt} on the beach"],
            evaluate_every=evaluate_every, early_stop_patience=early_stop_patience,
        )

        def as_subjects(batch, kind):
            return None if batch is None else [SubjectImage(f"{kind}_{i:03d}", image)
                                               for i, image in enumerate(image_batch_to_pil(batch))]

        comfy_hooks.free_comfy_models()
        callbacks = comfy_hooks.ComfyCallbacks(cls.hidden.unique_id, steps, RENAMES)
        photos = as_subjects(instance_images, "instance")
        try:
            with plain_errors(RENAMES):
                evaluation = _evaluation(cfg, photos) if evaluate_every else None
                result = train(cfg, callbacks=callbacks, instance_images=photos,
                               class_images=as_subjects(class_images, "class"), evaluation=evaluation)
        except TrainingCancelled as cancelled:
            callbacks.log(str(cancelled))
            callbacks.send("stopped", step=cancelled.step, text="Queue the same workflow again to continue from "
                                                                "here.")
            raise comfy_hooks.Interrupted() from cancelled  # ComfyUI shows "interrupted", not a failure
        except Exception as error:  # the panel says it too, in red, not only ComfyUI's error dialog
            callbacks.send("error", text=str(error))
            raise
        finally:
            comfy_hooks.release()
        name = f"{comfy_hooks.OUTPUT_SUBFOLDER}/{output.name}"
        callbacks.send("done", output=name, steps=result.steps)
        samples = pil_to_image_batch(result.samples)
        limit = BestStep(cfg.max_pres_rise, result.evaluations).pres_limit
        curve = evaluation_curve(result.evaluations, result.saved_step, limit)
        return io.NodeOutput(name, pil_to_image_batch([loss_curve(result.losses)]), samples,
                             pil_to_image_batch([curve]), ui=ui.PreviewImage(samples, cls=cls))


def _evaluation(cfg, photos):
    """The run's evaluation, scored with the models the Measure Subject Fidelity node finds too."""
    from ..trainer.api import evaluation_with_models
    from ..trainer.dataset import load_image_folder
    from .measure_fidelity import evaluators_folder, model_sources
    images = [item.image for item in photos or load_image_folder(cfg.instance_dir)]
    return evaluation_with_models(cfg, images, list(model_sources().values()), home=str(evaluators_folder()))
