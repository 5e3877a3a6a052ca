"""The embedding models behind the fidelity metrics (trainer/fidelity.py), loaded from files the user already has.

Nothing is downloaded and nothing is unpickled: weights come from .safetensors only. Two kinds:

- **CLIP** embeds images (CLIP-I) and, when its text tower is there too, prompts (CLIP-T): the projected image and
  text features, as CLIP compares them.
- **DINO** embeds images (the DINO score and PRES): the class token of the last layer, after its layer norm.

A model is either
- **one .safetensors file**, as ComfyUI's `models/clip_vision` holds them (IP-Adapter's image encoders): CLIP vision
  in transformers' layout (`vision_model.*`, `visual_projection.weight`: OpenAI ViT-L/14, LAION ViT-H/14 and
  ViT-bigG/14) or open_clip's (`visual.*`), both as ComfyUI reads them; a whole transformers CLIPModel (`text_model.*`
  too, e.g. openai/clip-vit-large-patch14's model.safetensors: then prompts as well, with the CLIP tokenizer the pack
  ships); DINOv2 (`encoder.layer.*.layer_scale1`, as ComfyUI reads it) or DINO v1 (facebook/dino-vits16's
  model.safetensors) in transformers' layout. The architecture is read from the weights' shapes, as ComfyUI does, the
  preprocessing is the family's own (`DEFAULT_PREPROCESS`);
- or **a transformers model folder** (config.json, model.safetensors, preprocessor_config.json): CLIPModel (vision and
  text), CLIPVisionModelWithProjection, ViTModel (taken for DINO v1, e.g. facebook/dino-vits16, the paper's
  ViT-S/16) or Dinov2Model; preprocessed as its preprocessor_config.json says.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from .families import CONFIG_DIR
from .image_processors import DEFAULT_PREPROCESS, Preprocess

CLIP, DINO = "clip", "dino"


class EmbedderError(ValueError):
    """A model file or folder that cannot be used; the message names it and says what to do."""


# --- what a file or folder holds ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelInfo:
    """What `identify` read from a file's tensor names and shapes or a folder's config.json, without loading it."""
    path: Path
    kind: str  # CLIP or DINO
    family: str  # "clip", "dinov2" or "vit" (DINO v1)
    label: str  # e.g. "CLIP ViT-L/14", "DINO ViT-S/16"
    text: bool  # a CLIP with its text tower: it can embed prompts (CLIP-T)
    config: dict  # the transformers config (for a file: read from its shapes)
    layout: str = "transformers"  # or "open_clip" (a file's tensor names)

    @property
    def name(self) -> str:
        return f"{self.label} ({self.path.name})"

    @property
    def is_papers(self) -> bool:
        """The DreamBooth paper's DINO: ViT-S/16 trained with DINO (v1)."""
        return self.family == "vit" and self.config["hidden_size"] == 384 and self.config["patch_size"] == 16


def identify(path: str | Path) -> ModelInfo:
    """What embedding model `path` (a .safetensors file or a transformers folder) is; EmbedderError if none."""
    path = Path(path)
    if path.is_dir():
        return _identify_folder(path)
    if path.suffix.lower() != ".safetensors":
        if path.suffix.lower() in (".bin", ".pt", ".pth", ".ckpt"):
            raise EmbedderError(f"{path}: pickled weights are never loaded (they can run code); use the "
                                ".safetensors file of the same model")
        raise EmbedderError(f"{path} is not a .safetensors file or a transformers model folder")
    if not path.is_file():
        raise EmbedderError(f"{path} does not exist")
    return _identify_shapes(path, _tensor_shapes(path))


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as error:  # a truncated or foreign file: safetensors' own errors vary by version
        raise EmbedderError(f"{path} is not a readable .safetensors file ({error}); download it again") from None


# CLIP vision towers by width, as ComfyUI reads them (comfy/clip_vision_config_*.json): heads and activation cannot be
# read from the weights. OpenAI's ViT-B and ViT-L use quick_gelu, LAION's ViT-H, ViT-g and ViT-bigG gelu.
CLIP_TOWERS = {768: ("ViT-B", 12, "quick_gelu"), 1024: ("ViT-L", 16, "quick_gelu"), 1280: ("ViT-H", 16, "gelu"),
               1408: ("ViT-g", 16, "gelu"), 1664: ("ViT-bigG", 16, "gelu")}
DINO_SIZES = {384: "ViT-S", 768: "ViT-B", 1024: "ViT-L", 1536: "ViT-g"}


def _count(shapes: dict, pattern: str) -> int:
    found = {int(m.group(1)) for key in shapes if (m := re.fullmatch(pattern, key))}
    return max(found) + 1 if found else 0


def _identify_shapes(path: Path, shapes: dict[str, tuple[int, ...]]) -> ModelInfo:
    layout = "transformers"
    if "visual.transformer.resblocks.0.attn.in_proj_weight" in shapes:
        shapes = {key: value.shape for key, value in _from_open_clip({k: _Shape(s) for k, s in shapes.items()}).items()}
        layout = "open_clip"
    if "vision_model.head.probe" in shapes:
        raise EmbedderError(f"{path} is a SigLIP image encoder (as Flux Redux uses), not CLIP: the paper's CLIP-I and "
                            "CLIP-T need a CLIP")
    if "vision_model.embeddings.patch_embedding.weight" in shapes:
        config = _clip_config(path, shapes)
        text = "text_config" in config
        size = config["vision_config"] if text else config
        label = f"CLIP {CLIP_TOWERS.get(size['hidden_size'], ('ViT',))[0]}/{size['patch_size']}"
        if size["image_size"] != 224:
            label += f"@{size['image_size']}"
        return ModelInfo(path, CLIP, "clip", label, text, config, layout)
    if "embeddings.cls_token" in shapes and "embeddings.patch_embeddings.projection.weight" in shapes:
        family = "dinov2" if "encoder.layer.0.layer_scale1.lambda1" in shapes else "vit"
        config = _dino_config(path, shapes, family)
        name = "DINOv2" if family == "dinov2" else "DINO"
        label = f"{name} {DINO_SIZES.get(config['hidden_size'], 'ViT')}/{config['patch_size']}"
        return ModelInfo(path, DINO, family, label, False, config)
    raise EmbedderError(f"{path} holds no CLIP or DINO image encoder this pack reads (expected CLIP vision weights as "
                        "ComfyUI's models/clip_vision holds them, or DINO/DINOv2 weights in transformers' layout)")


class _Shape:
    """Stands in for a tensor when only the shapes are read (open_clip's names are converted the same way)."""

    def __init__(self, shape):
        self.shape = tuple(shape)

    def transpose(self, *_):
        return _Shape(self.shape[::-1])

    def __getitem__(self, index: slice):
        return _Shape((len(range(*index.indices(self.shape[0]))), *self.shape[1:]))


def _clip_config(path: Path, shapes: dict) -> dict:
    """A CLIPVisionConfig (vision only) or CLIPConfig (with text) from tensor shapes."""
    if "visual_projection.weight" not in shapes:
        raise EmbedderError(f"{path} is a CLIP vision tower without its projection (visual_projection.weight): it "
                            "cannot give CLIP's image embeddings; use the file with the projection (ComfyUI's "
                            "models/clip_vision files have it)")
    width = shapes["vision_model.embeddings.patch_embedding.weight"][0]
    _, heads, act = CLIP_TOWERS.get(width, ("ViT", max(1, width // 64), "gelu"))
    patch = shapes["vision_model.embeddings.patch_embedding.weight"][2]
    vision = {
        "hidden_size": width, "patch_size": patch, "num_attention_heads": heads, "hidden_act": act,
        "image_size": math.isqrt(shapes["vision_model.embeddings.position_embedding.weight"][0] - 1) * patch,
        "num_hidden_layers": _count(shapes, r"vision_model\.encoder\.layers\.(\d+)\.layer_norm1\.weight"),
        "intermediate_size": shapes["vision_model.encoder.layers.0.mlp.fc1.weight"][0],
        "projection_dim": shapes["visual_projection.weight"][0], "layer_norm_eps": 1e-5}
    if "text_projection.weight" not in shapes:
        return vision
    text_width = shapes["text_model.embeddings.token_embedding.weight"][1]
    text = {
        "vocab_size": shapes["text_model.embeddings.token_embedding.weight"][0], "hidden_size": text_width,
        "max_position_embeddings": shapes["text_model.embeddings.position_embedding.weight"][0],
        "num_hidden_layers": _count(shapes, r"text_model\.encoder\.layers\.(\d+)\.layer_norm1\.weight"),
        "intermediate_size": shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0],
        "num_attention_heads": max(1, text_width // 64), "hidden_act": act, "layer_norm_eps": 1e-5,
        "projection_dim": shapes["text_projection.weight"][0], "bos_token_id": 49406, "eos_token_id": 49407,
        "pad_token_id": 49407}
    return {"vision_config": vision, "text_config": text, "projection_dim": vision["projection_dim"]}


def _dino_config(path: Path, shapes: dict, family: str) -> dict:
    """A Dinov2Config or ViTConfig (DINO v1) from tensor shapes (head width 64, as every DINO and DINOv2 size has)."""
    if "embeddings.register_tokens" in shapes:
        raise EmbedderError(f"{path} is DINOv2 with registers, which this pack does not read; use a plain DINOv2 or "
                            "DINO ViT")
    width, _, patch, _ = shapes["embeddings.patch_embeddings.projection.weight"]
    positions = shapes["embeddings.position_embeddings"][1] - 1
    config = {"hidden_size": width, "patch_size": patch, "num_attention_heads": max(1, width // 64),
              "image_size": math.isqrt(positions) * patch}
    if family == "dinov2":
        swiglu = "encoder.layer.0.mlp.weights_in.weight" in shapes
        fc1 = shapes["encoder.layer.0.mlp.fc1.weight"][0] if not swiglu else 4 * width  # SwiGLU: DINOv2-g, ratio 4
        return {**config, "model_type": "dinov2", "use_swiglu_ffn": swiglu, "mlp_ratio": fc1 // width,
                "layer_norm_eps": 1e-6, "qkv_bias": True,
                "num_hidden_layers": _count(shapes, r"encoder\.layer\.(\d+)\.norm1\.weight")}
    return {**config, "model_type": "vit", "layer_norm_eps": 1e-12, "qkv_bias": True,
            "intermediate_size": shapes["encoder.layer.0.intermediate.dense.weight"][0],
            "num_hidden_layers": _count(shapes, r"encoder\.layer\.(\d+)\.layernorm_before\.weight")}


FOLDER_FAMILIES = {"clip": ("clip", True), "clip_vision_model": ("clip", False), "dinov2": ("dinov2", False),
                   "vit": ("vit", False)}


def _identify_folder(folder: Path) -> ModelInfo:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise EmbedderError(f"{folder} is not a transformers model folder (no config.json)")
    config = json.loads(config_file.read_text())
    model_type = config.get("model_type", "")
    if model_type not in FOLDER_FAMILIES:
        raise EmbedderError(f"{folder}: model_type {model_type!r} is not an embedder this pack reads (clip, "
                            "clip_vision_model, vit for DINO, dinov2)")
    if not any((folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        raise EmbedderError(f"{folder} has no model.safetensors; pickled weights (pytorch_model.bin) are never "
                            "loaded: download model.safetensors from the same repository into it")
    family, text = FOLDER_FAMILIES[model_type]
    if family == "clip":
        vision = config.get("vision_config", config)
        label = f"CLIP {CLIP_TOWERS.get(vision.get('hidden_size', 768), ('ViT',))[0]}/{vision.get('patch_size', 32)}"
        return ModelInfo(folder, CLIP, family, label, text, config)
    name = "DINOv2" if family == "dinov2" else "DINO"
    label = f"{name} {DINO_SIZES.get(config.get('hidden_size', 768), 'ViT')}/{config.get('patch_size', 16)}"
    return ModelInfo(folder, DINO, family, label, False, {"hidden_size": config.get("hidden_size", 768),
                                                          "patch_size": config.get("patch_size", 16)})


# --- loading and embedding ---------------------------------------------------------------------------------------

class Embedder:
    """One loaded model: `embed_images` for any model, `embed_texts` for a CLIP with its text tower."""

    def __init__(self, info: ModelInfo, model: torch.nn.Module, preprocess: Preprocess, tokenizer=None):
        self.info, self.model, self.preprocess, self.tokenizer = info, model.eval(), preprocess, tokenizer

    @property
    def kind(self) -> str:
        return self.info.kind

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def has_text(self) -> bool:
        return self.tokenizer is not None

    def to(self, device: str | torch.device) -> "Embedder":
        self.model.to(device)
        return self

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 16) -> torch.Tensor:
        """[N, D] float32 on the CPU: CLIP's projected image features, or DINO's last-layer class token."""
        if not images:
            raise ValueError("no images to embed")
        out = []
        for start in range(0, len(images), batch_size):
            pixels = self.preprocess(images[start:start + batch_size]).to(self._device, self._dtype)
            if self.kind == CLIP:
                features = self.model.visual_projection(self.model.vision_model(pixel_values=pixels).pooler_output)
            else:
                features = self.model(pixel_values=pixels).last_hidden_state[:, 0]
            out.append(features.float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """[N, D] float32 on the CPU: CLIP's projected text features (prompts cut at CLIP's 77 tokens)."""
        if not self.has_text:
            raise ValueError(f"{self.name} is a CLIP image encoder only; it cannot embed prompts")
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        output = self.model.text_model(input_ids=tokens.input_ids.to(self._device),
                                       attention_mask=tokens.attention_mask.to(self._device))
        return self.model.text_projection(output.pooler_output).float().cpu()


def load(source: str | Path | ModelInfo, dtype: torch.dtype = torch.float32) -> Embedder:
    """Load an embedding model (a .safetensors file or a transformers folder, see the module's notes) on the CPU."""
    info = source if isinstance(source, ModelInfo) else identify(source)
    model_class = _model_class(info)
    extra = {"add_pooling_layer": False} if info.family == "vit" else {}
    preprocessor = info.path / "preprocessor_config.json"
    if info.path.is_dir():
        model, loading = model_class.from_pretrained(str(info.path), local_files_only=True, use_safetensors=True,
                                                     output_loading_info=True, **extra)
    else:
        model, loading = model_class.from_pretrained(None, config=_config_object(info),
                                                     state_dict=_file_tensors(info), output_loading_info=True,
                                                     **extra)
    if preprocessor.is_file():
        try:
            preprocess = Preprocess.from_config(json.loads(preprocessor.read_text()))
        except ValueError as error:  # json's too
            raise EmbedderError(f"{preprocessor}: {error}") from None
    else:  # a single file, or a folder without it (IP-Adapter's image_encoder): the family's, at the model's size
        preprocess = DEFAULT_PREPROCESS[info.family]
        size = getattr(model.config, "vision_config", model.config).image_size
        if info.family == "clip":
            preprocess = replace(preprocess, shortest_edge=size, crop=(size, size))
        elif info.family == "vit":  # DINO v1's position embeddings fit one size (DINOv2 interpolates its own)
            preprocess = replace(preprocess, resize_to=(size, size))
    missing = [key for key in loading["missing_keys"] if not key.endswith("mask_token")]  # DINOv2's, unused here
    if missing:
        raise EmbedderError(f"{info.path} lacks weights the {info.label} needs ({', '.join(missing[:4])}...): the "
                            "file is incomplete or not this model; download it again")
    tokenizer = None
    if info.text:
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(str(CONFIG_DIR / "sd1" / "tokenizer"))  # CLIP's BPE, the same in all
    return Embedder(info, model.to(dtype), preprocess, tokenizer)


def _model_class(info: ModelInfo):
    from transformers import CLIPModel, CLIPVisionModelWithProjection, Dinov2Model, ViTModel

    if info.family == "clip":
        return CLIPModel if info.text else CLIPVisionModelWithProjection
    return Dinov2Model if info.family == "dinov2" else ViTModel


def _config_object(info: ModelInfo):
    from transformers import CLIPConfig, CLIPVisionConfig, Dinov2Config, ViTConfig

    if info.family == "clip":
        return CLIPConfig(**info.config) if info.text else CLIPVisionConfig(**info.config)
    settings = {k: v for k, v in info.config.items() if k != "model_type"}
    return Dinov2Config(**settings) if info.family == "dinov2" else ViTConfig(**settings)


def _file_tensors(info: ModelInfo) -> dict[str, torch.Tensor]:
    """The file's tensors in transformers' names, only those of the model being built (a full CLIP file can serve
    as a vision-only CLIP)."""
    from safetensors.torch import load_file

    tensors = load_file(str(info.path))
    if info.layout == "open_clip":
        tensors = _from_open_clip(tensors)
    if info.family == "clip" and not info.text:
        tensors = {k: v for k, v in tensors.items() if k.startswith(("vision_model.", "visual_projection."))}
    return tensors


_OPEN_CLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                    "attn.out_proj": "self_attn.out_proj"}
_OPEN_CLIP_TOP = {"class_embedding": "embeddings.class_embedding", "conv1.weight": "embeddings.patch_embedding.weight",
                  "positional_embedding": "embeddings.position_embedding.weight", "ln_pre.weight": "pre_layrnorm.weight",
                  "ln_pre.bias": "pre_layrnorm.bias", "ln_post.weight": "post_layernorm.weight",
                  "ln_post.bias": "post_layernorm.bias"}


def _from_open_clip(tensors: dict) -> dict:
    """open_clip's vision tower (`visual.*`) in transformers' CLIP names, as ComfyUI converts it
    (comfy/clip_vision.py); the rest of the file (its text tower) is left out."""
    out = {}
    for key, value in tensors.items():
        if not key.startswith("visual."):
            continue
        name = key[len("visual."):]
        if name == "proj":
            out["visual_projection.weight"] = value.transpose(0, 1)
        elif name in _OPEN_CLIP_TOP:
            out[f"vision_model.{_OPEN_CLIP_TOP[name]}"] = value
        elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", name):
            block, kind = m.groups()
            third = value.shape[0] // 3  # q, k and v stacked
            for i, projection in enumerate(("q_proj", "k_proj", "v_proj")):
                out[f"vision_model.encoder.layers.{block}.self_attn.{projection}.{kind}"] = \
                    value[third * i:third * (i + 1)]
        elif (m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", name)) \
                and m.group(2) in _OPEN_CLIP_BLOCK:
            block, part, kind = m.groups()
            out[f"vision_model.encoder.layers.{block}.{_OPEN_CLIP_BLOCK[part]}.{kind}"] = value
    return out
