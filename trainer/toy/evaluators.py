"""Evaluators trained on the toy world, for measuring DreamBooth in the paper's spirit.

The paper (Ruiz et al. 2023, sec. 4.1) measures with networks trained elsewhere: DINO ViT-S/16 embeddings for subject
fidelity, CLIP for prompt fidelity, DINO again for PRES and LPIPS for DIV. None of those know this world, so we ship
two small CNNs trained on it (by `python -m trainer.toy.train_evaluators`) and name each measure for what it is:

- **attribute classifier** (`AttributeNet`): one head per scene attribute (shape, color, background, pattern, position,
  size, style) over a three-stage conv backbone.
- **identity embedding** (`IdentityNet`): a unit-norm vector from a second conv backbone with global pooling, trained
  with a supervised-contrastive loss so that every view of the subject (any background, position, size, colour,
  pattern, style: its identity marking stays) lands together, far from ordinary shapes of the same class and colour,
  while ordinary objects are spread by what they are (shape, colour, pattern).

The measures (all return a float; images are PIL images or a float tensor [N, 3, H, W] in 0..1):

- `prompt_fidelity(images, truth)`: *attribute agreement*. For each image, the fraction of the prompt's ground-truth
  attributes that the attribute classifier reads in the image, averaged over images; 1.0 = every image shows
  everything the prompt names. `truth` is a world Scene (as in `world.EVAL_PROMPTS`; `named_attributes` picks what its
  prompt names) or a dict such as {"shape": "star", "background": "green"}. Stands in for the paper's CLIP-T.
- `subject_fidelity(images, reference_images)`: *identity-embedding similarity*. Mean cosine similarity over all
  (generated, reference) pairs, the references being the real subject's held-out views. In [-1, 1]; higher = more
  like the subject. Stands in for the paper's DINO score.
- `pres(class_images, subject_images)`: *prior preservation score*, the same identity-embedding similarity between
  samples of the plain class prompt ("a [class]") and the real subject views. Lower is better: when the class prompt
  drifts towards the subject (language drift), its samples carry the subject's identity and the score rises.
- `div(images)`: *sample diversity*, the mean perceptual distance over all pairs of samples of one prompt. The
  distance is LPIPS' recipe (channel-normalised conv activations, squared difference, spatial mean, mean over layers;
  here without LPIPS' learned layer weights) on the attribute classifier's backbone: per location 1 - cosine of the
  channel vectors (half their squared distance once unit-normalised), so it lies in [0, 2]. It stands in for the
  paper's LPIPS. It deliberately does not use
  the identity embedding: that is trained to ignore pose, position and background of the subject, which is exactly
  the variety DIV must see (an over-fitted model that always draws the subject in its training pose scores low).

`load_evaluators()` reads the shipped `evaluators.safetensors` (tensors only, no pickle; class lists and training facts
in its JSON metadata).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

WEIGHTS = Path(__file__).with_name("evaluators.safetensors")
FORMAT = "dreambooth-studio.toy-evaluators/1"
IMAGE_SIZE = 32

Images = Union[Sequence[Image.Image], torch.Tensor]

# Attributes a style does not draw: the classifier is not trained on them there and reports None.
NOT_DRAWN = {"sketch": ("color", "background")}
# Values a caption leaves unsaid (world.caption's grammar).
DEFAULTS = {"pattern": "plain", "position": "center", "size": "large"}


def named_attributes(scene) -> dict[str, str]:
    """The attributes a scene's caption names, with their values: what prompt fidelity judges for that prompt.

    Shape and style always (a caption without "a sketch of" asks for a photo); colour and background where the style
    draws them, except the subject's own colour, which its prompt does not name ("a {V} star on a green background"
    asks for the subject, judged by subject fidelity); pattern, position and size where they differ from the unsaid
    defaults (plain, center, large)."""
    from .world import SUBJECT_COLOR

    named = {"shape": scene.shape, "style": scene.style}
    if scene.style not in NOT_DRAWN:
        named["background"] = scene.background
        if not (scene.subject and scene.color == SUBJECT_COLOR):
            named["color"] = scene.color
    named.update({name: getattr(scene, name) for name, default in DEFAULTS.items() if getattr(scene, name) != default})
    return named


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Backbone(nn.Module):
    """Three conv stages (conv-BN-ReLU, then 2x2 max-pool): 32 -> 16 -> 8 -> 4 pixels."""

    def __init__(self, widths: Sequence[int]):
        super().__init__()
        chans = [3, *widths]
        self.convs = nn.ModuleList(_conv(chans[i], chans[i + 1]) for i in range(len(widths)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The last pooled map and every stage's activations before pooling (the perceptual features)."""
        taps = []
        for conv in self.convs:
            x = conv(x)
            taps.append(x)
            x = F.max_pool2d(x, 2)
        return x, taps


class AttributeNet(nn.Module):
    """Backbone, flattened 4x4 map (keeps where things are) -> hidden layer -> one linear head per attribute."""

    def __init__(self, classes: dict[str, list[str]], widths: Sequence[int], hidden: int):
        super().__init__()
        self.backbone = Backbone(widths)
        side = IMAGE_SIZE // 2 ** len(widths)
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(widths[-1] * side * side, hidden), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, len(values)) for name, values in classes.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(self.backbone(x)[0])
        return {name: head(h) for name, head in self.heads.items()}


class IdentityNet(nn.Module):
    """Backbone, global average and max pooling (forgets where things are) -> MLP -> unit-norm embedding."""

    def __init__(self, widths: Sequence[int], hidden: int, dim: int):
        super().__init__()
        self.backbone = Backbone(widths)
        self.mlp = nn.Sequential(nn.Linear(2 * widths[-1], hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.backbone(x)[0]
        h = torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)
        return F.normalize(self.mlp(h), dim=1)


def to_tensor(images: Images) -> torch.Tensor:
    """PIL images (any size or mode; resized to 32x32) or a float tensor [N, 3, H, W] in 0..1 -> [N, 3, 32, 32]."""
    if isinstance(images, torch.Tensor):
        x = images.detach().to(torch.float32).cpu()
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images as a tensor [N, 3, H, W] in 0..1, got shape {tuple(x.shape)}")
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
        return x.clamp(0, 1)
    arrays = []
    for image in images:
        image = image.convert("RGB")
        if image.size != (IMAGE_SIZE, IMAGE_SIZE):
            image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
        arrays.append(np.asarray(image, dtype=np.uint8))
    if not arrays:
        raise ValueError("no images given")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(torch.float32) / 255.0


def normalize(x: torch.Tensor) -> torch.Tensor:
    """0..1 images -> the networks' input scale (about zero mean, unit spread)."""
    return (x - 0.5) / 0.25


def perceptual_distance(taps_a: list[torch.Tensor], taps_b: list[torch.Tensor]) -> torch.Tensor:
    """LPIPS-style distance between matched rows of two feature lists: mean over layers and locations of
    1 - cos(channel vectors). Shapes [N, C, H, W] per layer; returns [N]."""
    per_layer = [(1 - F.cosine_similarity(a, b, dim=1, eps=1e-6)).mean((1, 2)) for a, b in zip(taps_a, taps_b)]
    return torch.stack(per_layer).mean(0)


class Evaluators:
    """The shipped attribute classifier and identity embedding, and the four measures built on them."""

    def __init__(self, attribute_net: AttributeNet, identity_net: IdentityNet, classes: dict[str, list[str]],
                 metadata: dict | None = None):
        self.attribute_net = attribute_net.eval()
        self.identity_net = identity_net.eval()
        self.classes = classes
        self.metadata = metadata or {}

    # --- raw readings -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def attribute_logits(self, images: Images) -> dict[str, torch.Tensor]:
        return self.attribute_net(normalize(to_tensor(images)))

    def attributes(self, images: Images) -> list[dict[str, str]]:
        """What the attribute classifier reads in each image: {"shape": ..., "color": ..., "background": ..., ...}."""
        logits = self.attribute_logits(images)
        n = next(iter(logits.values())).shape[0]
        picks = {name: value.argmax(1).tolist() for name, value in logits.items()}
        read = [{name: self.classes[name][picks[name][i]] for name in logits} for i in range(n)]
        for seen in read:
            if seen["style"] in NOT_DRAWN:  # a sketch draws neither colour nor background: nothing to read
                seen.update(dict.fromkeys(NOT_DRAWN[seen["style"]]))
        return read

    @torch.no_grad()
    def embed(self, images: Images) -> torch.Tensor:
        """Identity embeddings, [N, D], unit norm."""
        return self.identity_net(normalize(to_tensor(images)))

    def identity_similarity(self, images: Images, others: Images) -> float:
        """Mean cosine similarity of identity embeddings over all (image, other) pairs."""
        return float((self.embed(images) @ self.embed(others).T).mean())

    # --- the measures -------------------------------------------------------------------------------------------
    def prompt_fidelity(self, images: Images, truth) -> float:
        """Attribute agreement: mean over images of the fraction of `truth`'s attributes the image shows.

        `truth` is a world Scene (the ground truth of a prompt, as in `world.EVAL_PROMPTS`; only the attributes its
        prompt names are judged, see `named_attributes`) or a dict mapping attribute names (any of `self.classes`:
        shape, color, background, pattern, position, size, style) to the values the prompt names."""
        if not isinstance(truth, dict):
            truth = named_attributes(truth)
        if not truth:
            raise ValueError("truth names no attribute; nothing to judge")
        for name, value in truth.items():
            if name not in self.classes:
                raise ValueError(f"the attribute classifier has no head for {name!r}; it reads {sorted(self.classes)}")
            if value not in self.classes[name]:
                raise ValueError(f"{value!r} is not a known {name}; known: {self.classes[name]}")
        read = self.attributes(images)
        return float(np.mean([np.mean([seen[name] == value for name, value in truth.items()]) for seen in read]))

    def subject_fidelity(self, images: Images, reference_images: Images) -> float:
        """Identity-embedding similarity of generated images to the real subject's (held-out) views; higher = more
        faithful to the subject."""
        return self.identity_similarity(images, reference_images)

    def pres(self, class_images: Images, subject_images: Images) -> float:
        """Prior preservation score: identity-embedding similarity of "a [class]" samples to the real subject views;
        lower = the class prior kept its own identity (less language drift)."""
        return self.identity_similarity(class_images, subject_images)

    @torch.no_grad()
    def perceptual_features(self, images: Images) -> list[torch.Tensor]:
        return self.attribute_net.backbone(normalize(to_tensor(images)))[1]

    def div(self, images: Images) -> float:
        """Sample diversity: mean LPIPS-style perceptual distance over all pairs of the images (samples of one
        prompt); higher = more diverse. In [0, 2]."""
        taps = self.perceptual_features(images)
        n = taps[0].shape[0]
        if n < 2:
            raise ValueError("diversity needs at least two images")
        i, j = torch.triu_indices(n, n, offset=1)
        return float(perceptual_distance([t[i] for t in taps], [t[j] for t in taps]).mean())


def save_evaluators(path: Union[str, Path], attribute_net: AttributeNet, identity_net: IdentityNet,
                    config: dict, extra: dict | None = None) -> None:
    """Write both networks' tensors and a JSON `config` (class lists, widths) to one safetensors file."""
    from safetensors.torch import save_file

    tensors = {f"attribute.{k}": v.detach().contiguous() for k, v in attribute_net.state_dict().items()}
    tensors.update({f"identity.{k}": v.detach().contiguous() for k, v in identity_net.state_dict().items()})
    metadata = {"format": FORMAT, "config": json.dumps(config)}
    if extra:
        metadata["training"] = json.dumps(extra)
    save_file(tensors, str(path), metadata=metadata)


def build_networks(config: dict) -> tuple[AttributeNet, IdentityNet]:
    attribute_net = AttributeNet(config["classes"], config["attribute_widths"], config["attribute_hidden"])
    identity_net = IdentityNet(config["identity_widths"], config["identity_hidden"], config["embed_dim"])
    return attribute_net, identity_net


def load_evaluators(path: Union[str, Path, None] = None) -> Evaluators:
    """Load the evaluators shipped beside this file (or the safetensors file at `path`)."""
    from safetensors import safe_open

    path = Path(path) if path is not None else WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; build it with "
                                f"`python -m trainer.toy.train_evaluators --out {path}`")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not a toy-evaluators file (format {metadata.get('format')!r}, "
                             f"expected {FORMAT!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(metadata["config"])
    attribute_net, identity_net = build_networks(config)
    for prefix, net in (("attribute.", attribute_net), ("identity.", identity_net)):
        net.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
    training = json.loads(metadata["training"]) if "training" in metadata else {}
    return Evaluators(attribute_net, identity_net, config["classes"], {"config": config, "training": training})
