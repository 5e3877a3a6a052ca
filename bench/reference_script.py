"""diffusers' reference DreamBooth script (examples/dreambooth/train_dreambooth.py) as the benchmark and the
equivalence tests run it: the model folder it loads, and its command line. The script itself is never part of this
repository (../shared/reference/ holds a copy with its licence)."""
from __future__ import annotations

import json
from pathlib import Path


def save_pipeline_folder(bundle, folder) -> Path:
    """A diffusers StableDiffusionPipeline folder of `bundle` that the reference script loads offline."""
    import diffusers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bundle.unet.save_pretrained(folder / "unet")
    bundle.vae.save_pretrained(folder / "vae")
    bundle.text_encoder.save_pretrained(folder / "text_encoder")
    bundle.tokenizer.save_pretrained(folder / "tokenizer")
    bundle.noise_scheduler.save_pretrained(folder / "scheduler")
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", type(bundle.noise_scheduler).__name__],
        "text_encoder": ["transformers", type(bundle.text_encoder).__name__],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2))
    return folder


def _training_flags(*, resolution: int, batch_size: int, steps: int, learning_rate: float, adam_weight_decay: float,
                    max_grad_norm: float, seed: int) -> list[str]:
    """The flags both diffusers scripts share: centre crops, fp32, AdamW at a constant learning rate, and no
    intermediate accelerate states."""
    return [
        "--resolution", str(resolution),
        "--center_crop",
        "--train_batch_size", str(batch_size),
        "--max_train_steps", str(steps),
        "--learning_rate", repr(learning_rate),
        "--lr_scheduler", "constant",
        "--lr_warmup_steps", "0",
        "--adam_weight_decay", repr(adam_weight_decay),
        "--max_grad_norm", repr(max_grad_norm),
        "--seed", str(seed),
        "--mixed_precision", "no",
        "--checkpointing_steps", str(10 * steps + 1000),
    ]


def reference_args(model_dir, instance_dir, class_dir, output_dir, *, steps: int, learning_rate: float,
                   train_text_encoder: bool, resolution: int, num_class_images: int,
                   instance_prompt: str = "a zwx dog", class_prompt: str = "a dog", seed: int = 0,
                   prior_loss_weight: float = 1.0, max_grad_norm: float = 1.0,
                   adam_weight_decay: float = 1e-2) -> list[str]:
    """The script's command line for a run with prior preservation, batch size 1, fp32, constant lr."""
    args = [
        "--pretrained_model_name_or_path", str(model_dir),
        "--instance_data_dir", str(instance_dir),
        "--class_data_dir", str(class_dir),
        "--with_prior_preservation",
        "--prior_loss_weight", repr(prior_loss_weight),
        "--num_class_images", str(num_class_images),
        "--instance_prompt", instance_prompt,
        "--class_prompt", class_prompt,
        *_training_flags(resolution=resolution, batch_size=1, steps=steps, learning_rate=learning_rate,
                         adam_weight_decay=adam_weight_decay, max_grad_norm=max_grad_norm, seed=seed),
        "--output_dir", str(output_dir),
    ]
    if train_text_encoder:
        args.append("--train_text_encoder")
    return args


# --- SDXL: diffusers' examples/text_to_image/train_text_to_image_sdxl.py --------------------------------------------
# diffusers has no DreamBooth full fine-tune for SDXL (its DreamBooth SDXL script trains LoRA); its full fine-tune is
# this text-to-image script: the UNet only, prompts and VAE latents computed once before training, no prior
# preservation. The benchmark gives it our batch (the instance photos and the class images, each with its caption,
# two per step) at its best setting for memory: bf16, 8-bit AdamW, gradient checkpointing (SDPA is its default).
SDXL_REFERENCE_BEST = ("--mixed_precision", "bf16", "--use_8bit_adam", "--gradient_checkpointing")


def save_sdxl_pipeline_folder(bundle, folder) -> Path:
    """A diffusers StableDiffusionXLPipeline folder of `bundle` (both text encoders and tokenizers)."""
    import diffusers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        getattr(bundle, name).save_pretrained(folder / name)
    bundle.noise_scheduler.save_pretrained(folder / "scheduler")
    model_index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", type(bundle.noise_scheduler).__name__],
        "text_encoder": ["transformers", type(bundle.text_encoder).__name__],
        "text_encoder_2": ["transformers", type(bundle.text_encoder_2).__name__],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2))
    return folder


def write_caption_folder(folder, captioned: dict[str, list[Path]]) -> Path:
    """An `imagefolder` dataset (the images, and metadata.jsonl with each one's caption) of images by caption."""
    import shutil

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, (caption, paths) in enumerate(captioned.items()):
        for path in paths:
            name = f"{index}-{Path(path).name}"
            shutil.copyfile(path, folder / name)
            lines.append(json.dumps({"file_name": name, "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def sdxl_reference_args(model_dir, train_data_dir, output_dir, *, steps: int, learning_rate: float, resolution: int,
                        batch_size: int = 2, seed: int = 0, max_grad_norm: float = 1.0,
                        adam_weight_decay: float = 1e-2) -> list[str]:
    """train_text_to_image_sdxl.py's command line: fp32, AdamW, constant lr, centre crops, no flips (the setting's
    flags, e.g. SDXL_REFERENCE_BEST, come after and win)."""
    return [
        "--pretrained_model_name_or_path", str(model_dir),
        "--train_data_dir", str(train_data_dir),
        "--image_column", "image",
        "--caption_column", "text",
        *_training_flags(resolution=resolution, batch_size=batch_size, steps=steps, learning_rate=learning_rate,
                         adam_weight_decay=adam_weight_decay, max_grad_norm=max_grad_norm, seed=seed),
        "--dataloader_num_workers", "0",
        "--output_dir", str(output_dir),
    ]
