"""What the hosts (the command line, the ComfyUI nodes) call besides train().

Each call loads the checkpoint it is given, runs its phase (trainer/phases.py) and returns plain results (names,
numbers, paths, PIL images): nothing it returns refers to the model, so the model's memory, on the GPU and off it, is
free again when the call returns and the next node or command finds the GPU as it was.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .bundle import ModelBundle
from .config import TrainConfig
from .device import inference_dtype, resolve_device
from .evaluation import Evaluation
from .models import load_model
from .phases import PROBING, SAMPLING, Phase
from .priors import make_class_priors
from .sampling import native_size, sample_images
from .tokens import RankedToken, candidate_identifiers, rank_identifiers

Log = Callable[[str], None]


def pick_identifiers(model: str, class_noun: str, *, count: int = 10, candidates: int = 200, shortlist: int = 40,
                     seed: int = 0, device: str = "auto", log: Log | None = None) -> list[RankedToken]:
    """The `count` identifiers with the weakest prior for `class_noun` in this checkpoint, weakest first: `candidates`
    vocabulary tokens screened on the text encoder, the `shortlist` best measured on the denoiser."""
    device = resolve_device(device)
    bundle = load_model(model, dtype=inference_dtype(device))
    return probe_identifiers(bundle, class_noun, candidates=candidates, shortlist=shortlist, seed=seed,
                             device=device, log=log)[:count]


def probe_identifiers(bundle: ModelBundle, class_noun: str, *, candidates: int, shortlist: int, seed: int,
                      device: torch.device, log: Log | None = None) -> list[RankedToken]:
    """pick_identifiers on a loaded model, as a phase: its UNet and text encoder(s) on the device in half precision
    where the GPU has it, for the probes, and given back afterwards."""
    pool = candidate_identifiers(bundle.tokenizer, count=candidates, seed=seed)
    advice = "Probe fewer candidates at a time (a smaller shortlist), or close other programs that use the GPU."
    with Phase(PROBING, device, log=log, advice=advice) as phase, torch.no_grad():
        phase.borrow(bundle.unet, *bundle.text_encoders, dtype=inference_dtype(device))
        return rank_identifiers(bundle, pool, class_noun, seed=seed, shortlist=shortlist)


def class_images(model: str, class_prompt: str, *, count: int, cache_root: str | Path, size: int | None = None,
                 steps: int = 30, guidance: float = 7.5, sampler: str = "euler_a", seed: int = 0,
                 device: str = "auto", log: Log | None = None,
                 on_progress: Callable[[int, int], None] | None = None) -> list[Path]:
    """Paths of `count` cached class images of `class_prompt` (trainer/priors.py), generating only the missing; `size`
    by default the model's own."""
    device = resolve_device(device)
    bundle = load_model(model, dtype=inference_dtype(device))
    size = size or native_size(bundle)
    return make_class_priors(bundle, class_prompt, count=count, cache_root=cache_root, device=device, log=log,
                             width=size, height=size, steps=steps, guidance=guidance, sampler=sampler, seed=seed,
                             on_progress=on_progress)


def sample(model: str, prompts: list[str], *, seeds: list[int], size: int | None = None, steps: int = 30,
           guidance: float = 7.5, sampler: str = "euler_a", device: str = "auto", log: Log | None = None,
           on_image: Callable[[int, object], None] | None = None) -> list:
    """One PIL image per (prompt, seed), drawn from the checkpoint in half precision where the GPU has it; `size` by
    default the model's own."""
    device = resolve_device(device)
    bundle = load_model(model, dtype=inference_dtype(device))
    size = size or native_size(bundle)
    with Phase(SAMPLING, device, log=log, advice="Lower the size, or close other programs that use the GPU."):
        return sample_images(bundle, prompts, seeds=seeds, width=size, height=size, steps=steps, guidance=guidance,
                             sampler=sampler, device=device, on_image=on_image)



def evaluation_with_models(cfg: TrainConfig, photos: list, model_sources: list[str], home: str) -> Evaluation:
    """Training-time evaluation (cfg.evaluate_every) scored with the embedding models found in `model_sources`:
    DINO (subject fidelity and PRES, as the paper), else CLIP-I (subject fidelity only; without PRES no step is ruled
    out for drift), against the subject's `photos` (PIL). Raises ValueError (EmbedderError) naming what to put where
    when there is no model."""
    from .measure import EmbeddingScorer, load_embedders  # transformers' vision models: only when evaluating
    scorer = EmbeddingScorer(load_embedders(model_sources, home=home))
    return Evaluation.in_contexts(scorer, photos, f"{cfg.identifier} {cfg.class_noun}", cfg.class_prompt,
                                  cfg.evaluation_prompts)
