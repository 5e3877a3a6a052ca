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
        "--resolution", str(resolution),
        "--center_crop",
        "--train_batch_size", "1",
        "--max_train_steps", str(steps),
        "--learning_rate", repr(learning_rate),
        "--lr_scheduler", "constant",
        "--lr_warmup_steps", "0",
        "--adam_weight_decay", repr(adam_weight_decay),
        "--max_grad_norm", repr(max_grad_norm),
        "--seed", str(seed),
        "--mixed_precision", "no",
        "--checkpointing_steps", str(10 * steps + 1000),  # no intermediate accelerate states
        "--output_dir", str(output_dir),
    ]
    if train_text_encoder:
        args.append("--train_text_encoder")
    return args
