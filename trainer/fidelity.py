"""The DreamBooth paper's evaluation metrics (Ruiz et al., CVPR 2023, sec. 4.1), on embeddings.

Embeddings are [N, D] tensors from one model (trainer/embedders.py); every similarity is the cosine of two of them.

- **DINO** and **CLIP-I** (subject fidelity): the mean cosine similarity over all pairs (generated image, real photo),
  with DINO ViT-S/16 or CLIP image embeddings: `subject_fidelity(generated, photos)`. The generated images are those of
  prompts with the subject's identifier ("a [V] dog on the beach"); the photos are the real subject's.
- **CLIP-T** (prompt fidelity): the mean over generated images of the cosine similarity between the image's CLIP
  embedding and its own prompt's CLIP text embedding: `prompt_fidelity(images, prompts)`, matched row by row.
- **PRES** (prior preservation, lower = less language drift): the mean DINO cosine similarity over all pairs (sample
  of the plain class prompt "a [class noun]" from the trained model, real photo of the subject): `pres(class_samples,
  photos)`. When "a dog" has turned into your dog, its samples look like the subject and PRES rises.
- **DIV** (diversity) is the mean LPIPS distance over pairs of images of the same prompt; it is not computed here:
  LPIPS' weights exist only as pickled files (`DIV_SKIPPED`).

The paper averages each score over its subjects; for one subject, as here, a mean over all pairs.
"""
from __future__ import annotations

import torch

DIV_SKIPPED = ("DIV needs LPIPS, whose weights (the lpips package's linear layers, torchvision's AlexNet/VGG) exist "
               "only as pickled .pth files, which this pack never loads")


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N, D] x [M, D] -> [N, M]: the cosine similarity of every row of `a` with every row of `b`."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected embeddings [N, D] and [M, D] of one model, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if not len(a) or not len(b):
        raise ValueError("no embeddings to compare")
    a, b = a.double(), b.double()
    return (a / a.norm(dim=1, keepdim=True)) @ (b / b.norm(dim=1, keepdim=True)).T


def subject_fidelity(generated: torch.Tensor, photos: torch.Tensor) -> float:
    """DINO (with DINO embeddings) or CLIP-I (with CLIP image embeddings): mean cosine similarity over all
    (generated image, real photo) pairs. Higher = more like the subject."""
    return float(cosine_matrix(generated, photos).mean())


def prompt_fidelity(images: torch.Tensor, prompts: torch.Tensor) -> float:
    """CLIP-T: mean over images of the cosine similarity between image i's CLIP embedding and the CLIP text
    embedding of the prompt it was generated from (row i of `prompts`). Higher = follows the prompt better."""
    if images.shape != prompts.shape:
        raise ValueError(f"one prompt embedding per image: got {tuple(images.shape)} images and "
                         f"{tuple(prompts.shape)} prompts")
    return float(torch.diagonal(cosine_matrix(images, prompts)).mean())


def pres(class_samples: torch.Tensor, photos: torch.Tensor) -> float:
    """PRES: mean DINO cosine similarity over all (sample of "a [class noun]", real photo of the subject) pairs.
    Lower = the class prior kept its own variety (less language drift)."""
    return float(cosine_matrix(class_samples, photos).mean())
