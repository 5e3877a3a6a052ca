"""Embedding models from the files users have, on tiny random CLIP and DINO models built from config: every layout
loads and embeds exactly as transformers' own model and image processor do on the same images; the architecture read
from a full-size file's shapes is the one ComfyUI uses; nothing pickled is ever loaded."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from transformers import (CLIPConfig, CLIPModel, CLIPTokenizer, CLIPVisionConfig, CLIPVisionModelWithProjection,
                          Dinov2Config, Dinov2Model, ViTConfig, ViTModel)

from trainer import embedders, image_processors, measure
from trainer.embedders import CLIP, DINO, EmbedderError
from trainer.image_processors import Preprocess
from trainer.families import CONFIG_DIR

pytestmark = pytest.mark.usefixtures("one_thread")

# Tiny towers whose heads (width / 64) and activation (gelu) are what a file of an unknown width is read as.
VISION = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96, image_size=32,
              patch_size=8, hidden_act="gelu", projection_dim=24)
TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, intermediate_size=96, hidden_act="gelu",
            max_position_embeddings=77, projection_dim=24, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
DINOV2 = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, image_size=32, patch_size=8)
DINO_V1 = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96, image_size=32,
               patch_size=8)
# Preprocessor configs as the models' repositories have them, at the tiny models' sizes.
CLIP_PREPROCESSOR = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 32},
                     "crop_size": {"height": 32, "width": 32}, "do_center_crop": True, "resample": 3,
                     "image_mean": list(image_processors.OPENAI_MEAN), "image_std": list(image_processors.OPENAI_STD)}
DINOV2_PREPROCESSOR = {"image_processor_type": "BitImageProcessor", "size": {"shortest_edge": 37},
                       "crop_size": {"height": 32, "width": 32}, "do_center_crop": True, "resample": 3,
                       "image_mean": list(image_processors.IMAGENET_MEAN), "image_std": list(image_processors.IMAGENET_STD)}
DINO_V1_PREPROCESSOR = {"feature_extractor_type": "ViTFeatureExtractor", "size": 32, "resample": 2,
                        "do_normalize": True, "do_resize": True, "image_mean": list(image_processors.IMAGENET_MEAN),
                        "image_std": list(image_processors.IMAGENET_STD)}


def images() -> list[Image.Image]:
    """Odd sizes and aspect ratios, landscape and portrait, so that resize and crop matter."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((45, 70), (61, 33),
                                                                                            (32, 32))]


def hf_processor(name: str, config: dict):
    """transformers' own image processor for this config (its PIL implementation, which needs no torchvision)."""
    settings = {k: v for k, v in config.items() if not k.endswith("_type")}
    cls = getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)
    return cls(**settings)


def pixels(processor, batch) -> torch.Tensor:
    return torch.as_tensor(np.stack(processor(images=batch, return_tensors="np")["pixel_values"]))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Each tiny model as the files a user would have, and the model itself for the expected values."""
    root = tmp_path_factory.mktemp("embedders")
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=24)).eval()
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION)).eval()
    dinov2 = Dinov2Model(Dinov2Config(**DINOV2)).eval()
    dino = ViTModel(ViTConfig(**DINO_V1), add_pooling_layer=False).eval()
    for name, model, preprocessor in (("clip-folder", clip, CLIP_PREPROCESSOR), ("dinov2-folder", dinov2,
                                      DINOV2_PREPROCESSOR), ("dino-vits-folder", dino, DINO_V1_PREPROCESSOR)):
        model.save_pretrained(root / name)
        (root / name / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    vision.save_pretrained(root / "clip-vision-folder")  # as IP-Adapter's image_encoder: no preprocessor_config.json
    dino.save_pretrained(root / "dino-vits-bare")  # no preprocessor_config.json either
    files = root / "files"
    files.mkdir()
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, files / "clip-full.safetensors")
    save_file({k: v.contiguous() for k, v in vision.state_dict().items()}, files / "clip-vision.safetensors")
    save_file(open_clip_layout(vision), files / "clip-vision-open_clip.safetensors")
    shutil.copy(root / "dinov2-folder" / "model.safetensors", files / "dinov2.safetensors")
    shutil.copy(root / "dino-vits-folder" / "model.safetensors", files / "dino-vits.safetensors")
    return {"root": root, "files": files, "clip": clip, "vision": vision, "dinov2": dinov2, "dino": dino}


def open_clip_layout(model: CLIPVisionModelWithProjection) -> dict[str, torch.Tensor]:
    """The vision tower in open_clip's names (`visual.*`, q/k/v stacked, projection transposed), written out here
    from open_clip's VisionTransformer, independently of the loader's conversion."""
    sd = model.state_dict()
    out = {"visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
           "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
           "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
           "visual.ln_pre.weight": sd["vision_model.pre_layrnorm.weight"],
           "visual.ln_pre.bias": sd["vision_model.pre_layrnorm.bias"],
           "visual.ln_post.weight": sd["vision_model.post_layernorm.weight"],
           "visual.ln_post.bias": sd["vision_model.post_layernorm.bias"],
           "visual.proj": sd["visual_projection.weight"].T.contiguous()}
    for i in range(VISION["num_hidden_layers"]):
        src, dst = f"vision_model.encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([sd[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for theirs, ours in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                                 ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[f"{dst}{theirs}.{kind}"] = sd[f"{src}{ours}.{kind}"]
    out["text_projection"] = torch.zeros(4, 4)  # an open_clip file's text tower is left alone
    return {k: v.contiguous() for k, v in out.items()}


# --- preprocessing ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, config", [("CLIPImageProcessor", CLIP_PREPROCESSOR),
                                          ("BitImageProcessor", DINOV2_PREPROCESSOR),
                                          ("ViTImageProcessor", DINO_V1_PREPROCESSOR)],
                         ids=["clip", "dinov2", "dino-v1"])
def test_preprocessing_follows_the_models_config_as_transformers_does(name, config):
    ours = Preprocess.from_config(config)(images())
    theirs = pixels(hf_processor(name, config), images())
    assert ours.shape == theirs.shape == (3, 3, 32, 32)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_preprocessing_defaults_are_each_processors_own():
    clip = Preprocess.from_config({"image_processor_type": "CLIPImageProcessor"})
    assert (clip.shortest_edge, clip.crop, clip.resample, clip.mean) == (224, (224, 224), 3, image_processors.OPENAI_MEAN)
    vit = Preprocess.from_config({"feature_extractor_type": "ViTFeatureExtractor", "size": 224})
    assert (vit.shortest_edge, vit.resize_to, vit.crop, vit.resample) == (None, (224, 224), None, 2)
    with pytest.raises(ValueError, match="SiglipImageProcessor"):
        Preprocess.from_config({"image_processor_type": "SiglipImageProcessor"})


# --- every layout loads and embeds as transformers does -------------------------------------------------------------

def clip_image_features(model, batch, preprocessor=CLIP_PREPROCESSOR):
    with torch.no_grad():
        pooled = model.vision_model(pixel_values=pixels(hf_processor("CLIPImageProcessor", preprocessor),
                                                        batch)).pooler_output
        return model.visual_projection(pooled)


@pytest.mark.parametrize("source, reference, text", [
    ("files/clip-full.safetensors", "clip", True),
    ("files/clip-vision.safetensors", "vision", False),
    ("files/clip-vision-open_clip.safetensors", "vision", False),
    ("clip-folder", "clip", True),
    ("clip-vision-folder", "vision", False),
])
def test_clip_embeds_images_as_transformers_does(models, source, reference, text):
    embedder = embedders.load(models["root"] / source)
    assert embedder.kind == CLIP and embedder.has_text is text
    expected = clip_image_features(models[reference], images())
    got = embedder.embed_images(images(), batch_size=2)  # two batches
    assert got.shape == (3, 24) and got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


@pytest.mark.parametrize("source", ["files/clip-full.safetensors", "clip-folder"])
def test_a_full_clip_embeds_prompts_as_transformers_does(models, source):
    embedder = embedders.load(models["root"] / source)
    prompts = ["a dog on the beach", "a photo of a red backpack in the snow, " * 10]  # the second is cut at 77
    tokens = CLIPTokenizer.from_pretrained(str(CONFIG_DIR / "sd1" / "tokenizer"))(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        clip = models["clip"]
        expected = clip.text_projection(clip.text_model(input_ids=tokens.input_ids).pooler_output)
    got = embedder.embed_texts(prompts)
    assert got.shape == (2, 24) and torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got[0], got[1], atol=1e-3)


@pytest.mark.parametrize("source, reference, name, preprocessor", [
    ("dinov2-folder", "dinov2", "BitImageProcessor", DINOV2_PREPROCESSOR),
    ("dino-vits-folder", "dino", "ViTImageProcessor", DINO_V1_PREPROCESSOR),
    ("dino-vits-bare", "dino", "ViTImageProcessor", DINO_V1_PREPROCESSOR),  # DINO's own settings, at the model's size
    # A bare file has no config: the architecture comes from its shapes, the preprocessing is the family's published
    # one (DINO v1's at the model's size: its position embeddings fit one size; DINOv2 interpolates its own).
    ("files/dino-vits.safetensors", "dino", "ViTImageProcessor", DINO_V1_PREPROCESSOR),
    ("files/dinov2.safetensors", "dinov2", "BitImageProcessor", {**DINOV2_PREPROCESSOR, "size": {"shortest_edge": 256},
                                                                 "crop_size": {"height": 224, "width": 224}}),
])
def test_dino_models_embed_the_class_token_as_transformers_does(models, source, reference, name, preprocessor):
    embedder = embedders.load(models["root"] / source)
    assert embedder.kind == DINO and not embedder.has_text
    with torch.no_grad():
        output = models[reference](pixel_values=pixels(hf_processor(name, preprocessor), images()))
    expected = output.last_hidden_state[:, 0]
    got = embedder.embed_images(images())
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    if reference == "dinov2":
        assert torch.allclose(got, output.pooler_output, atol=1e-5)  # DINOv2's own pooled output: the same token


def test_a_single_clip_file_is_preprocessed_at_its_own_image_size(models):
    embedder = embedders.load(models["files"] / "clip-vision.safetensors")
    assert (embedder.preprocess.shortest_edge, embedder.preprocess.crop) == (32, (32, 32))
    assert embedder.preprocess.mean == image_processors.OPENAI_MEAN


# --- full-size files: the architecture ComfyUI reads -----------------------------------------------------------------

def shapes_of(model_class, config) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in model_class(config).state_dict().items()}


# ComfyUI's comfy/clip_vision_config_{vitl,h,g}.json and its DINOv2 large (image_encoders/dino2_large.json).
COMFY_CLIP = {
    "ViT-L/14": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                     hidden_act="quick_gelu", projection_dim=768, image_size=224, patch_size=14),
    "ViT-H/14": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120,
                     hidden_act="gelu", projection_dim=1024, image_size=224, patch_size=14),
    "ViT-bigG/14": dict(hidden_size=1664, num_hidden_layers=48, num_attention_heads=16, intermediate_size=8192,
                        hidden_act="gelu", projection_dim=1280, image_size=224, patch_size=14),
}


@pytest.mark.parametrize("label", COMFY_CLIP)
def test_full_size_clip_vision_files_are_read_as_comfyui_reads_them(tmp_path, label):
    config = COMFY_CLIP[label]
    info = embedders._identify_shapes(tmp_path / "x.safetensors",
                                      shapes_of(CLIPVisionModelWithProjection, CLIPVisionConfig(**config)))
    assert info.label == f"CLIP {label}" and info.kind == CLIP and not info.text
    assert {k: info.config[k] for k in config} == config


def dino_hub_shapes(width: int, layers: int, patch: int, image: int, mlp: str, hidden: int) -> dict:
    """The tensor shapes of a published DINO checkpoint (facebook/dinov2-*, facebook/dino-vit*: the names
    transformers writes and ComfyUI reads), the parts the architecture is read from."""
    shapes = {"embeddings.cls_token": (1, 1, width), "embeddings.position_embeddings": (1, (image // patch) ** 2 + 1,
                                                                                        width),
              "embeddings.patch_embeddings.projection.weight": (width, 3, patch, patch), "layernorm.weight": (width,)}
    for i in range(layers):
        if mlp == "vit":
            shapes.update({f"encoder.layer.{i}.layernorm_before.weight": (width,),
                           f"encoder.layer.{i}.intermediate.dense.weight": (hidden, width)})
        else:
            shapes.update({f"encoder.layer.{i}.norm1.weight": (width,),
                           f"encoder.layer.{i}.layer_scale1.lambda1": (width,)})
            shapes[f"encoder.layer.{i}.mlp.{'weights_in' if mlp == 'swiglu' else 'fc1'}.weight"] = (hidden, width)
    return shapes


def test_full_size_dino_files_are_read_from_their_shapes(tmp_path):
    read = lambda shapes: embedders._identify_shapes(tmp_path / "x.safetensors", shapes)  # noqa: E731
    large = read(dino_hub_shapes(1024, 24, 14, 518, "fc1", 4096))  # ComfyUI's dino2_large.json
    assert large.label == "DINOv2 ViT-L/14" and large.family == "dinov2"
    assert {k: large.config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size",
                                         "mlp_ratio", "use_swiglu_ffn")} == {
        "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 518, "mlp_ratio": 4,
        "use_swiglu_ffn": False}
    giant = read(dino_hub_shapes(1536, 40, 14, 518, "swiglu", 8192))  # dino2_giant.json
    assert giant.label == "DINOv2 ViT-g/14" and giant.config["use_swiglu_ffn"] is True
    assert (giant.config["num_hidden_layers"], giant.config["num_attention_heads"]) == (40, 24)
    small = read(dino_hub_shapes(384, 12, 16, 224, "vit", 1536))  # facebook/dino-vits16, the paper's
    assert small.label == "DINO ViT-S/16" and small.is_papers and small.family == "vit"
    assert {k: small.config[k] for k in ("num_hidden_layers", "num_attention_heads", "intermediate_size",
                                         "image_size")} == {"num_hidden_layers": 12, "num_attention_heads": 6,
                                                            "intermediate_size": 1536, "image_size": 224}
    with pytest.raises(EmbedderError, match="registers"):
        read({**dino_hub_shapes(384, 1, 14, 518, "fc1", 1536), "embeddings.register_tokens": (1, 4, 384)})


# --- safety and messages --------------------------------------------------------------------------------------------

def test_pickled_weights_are_refused_and_never_opened(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    (tmp_path / "clip.pth").write_bytes(b"pickle")
    with pytest.raises(EmbedderError, match="pickled weights are never loaded"):
        embedders.identify(tmp_path / "clip.pth")
    folder = tmp_path / "dino-vits16"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "vit"}))
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(EmbedderError, match="no model.safetensors.*download model.safetensors"):
        embedders.identify(folder)
    found, notes = measure.find_models([tmp_path])
    assert found == [] and len(notes) == 2


def test_unusable_files_get_messages_that_name_them(tmp_path, models):
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(EmbedderError, match="broken.safetensors is not a readable .safetensors"):
        embedders.identify(tmp_path / "broken.safetensors")
    save_file({"weight": torch.zeros(2)}, tmp_path / "lora.safetensors")
    with pytest.raises(EmbedderError, match="lora.safetensors holds no CLIP or DINO image encoder"):
        embedders.identify(tmp_path / "lora.safetensors")
    tensors = {k: v.contiguous() for k, v in models["vision"].state_dict().items() if "layers.1.mlp" not in k}
    save_file(tensors, tmp_path / "truncated.safetensors")
    with pytest.raises(EmbedderError, match="truncated.safetensors lacks weights"):
        embedders.load(tmp_path / "truncated.safetensors")
    save_file({**tensors, "vision_model.head.probe": torch.zeros(1, 1, 128)}, tmp_path / "siglip.safetensors")
    with pytest.raises(EmbedderError, match="siglip.safetensors is a SigLIP image encoder"):
        embedders.identify(tmp_path / "siglip.safetensors")
    no_projection = {k: v for k, v in tensors.items() if not k.startswith("visual_projection")}
    save_file(no_projection, tmp_path / "no-projection.safetensors")
    with pytest.raises(EmbedderError, match="without its projection"):
        embedders.identify(tmp_path / "no-projection.safetensors")


def test_auto_picks_the_papers_dino_and_a_clip_with_text(models, tmp_path):
    found, notes = measure.find_models([models["root"]])
    assert notes == []
    assert sorted(info.path.name for info in found) == sorted(
        ["clip-folder", "clip-vision-folder", "dinov2-folder", "dino-vits-folder", "dino-vits-bare",
         "clip-full.safetensors",
         "clip-vision.safetensors",
         "clip-vision-open_clip.safetensors", "dinov2.safetensors", "dino-vits.safetensors"])
    assert measure.choose(found, DINO).family == "vit"  # DINO v1 before DINOv2 (the tiny one is not ViT-S/16)
    assert measure.choose(found, CLIP).text
    assert measure.choose([i for i in found if not i.text], CLIP).kind == CLIP
    papers = embedders.ModelInfo(tmp_path / "big", DINO, "vit", "DINO ViT-S/16", False,
                                 {"hidden_size": 384, "patch_size": 16})
    (tmp_path / "big").mkdir()
    assert measure.choose([*found, papers], DINO) is papers


def test_load_embedders_loads_what_there_is_and_measure_says_where_the_rest_goes(models, tmp_path):
    loaded = measure.load_embedders([models["files"] / "clip-vision.safetensors"], home="/comfy/models/x")
    assert loaded.dino is None and loaded.clip is not None and not loaded.clip.has_text and loaded.notes == []
    photo = [Image.new("RGB", (40, 40), (200, 10, 10))]
    rows = {row.metric: row for row in measure.measure(photo, photo, ["a zwx dog"], models=loaded)}
    assert rows["CLIP-I"].value == pytest.approx(1.0, abs=1e-5)  # an image against itself
    assert "put the paper's DINO ViT-S/16" in rows["DINO"].note and "/comfy/models/x/dino-vits16/" in rows["DINO"].note
    assert "CLIP-T needs the text half" in rows["CLIP-T"].note
    assert "/comfy/models/x/clip-vit-large-patch14/" in rows["CLIP-T"].note
    none = measure.load_embedders([tmp_path / "absent"], dino="none", clip="none")
    assert (none.dino, none.clip) == (None, None) and "does not exist" in none.notes[0]
    with pytest.raises(EmbedderError, match="is a CLIP .*not a DINO model"):
        measure.load_embedders([], dino=models["files"] / "clip-vision.safetensors", clip="none")


# --- the command line, the whole path ------------------------------------------------------------------------------

def test_evaluate_command_scores_folders_with_the_models_given(models, tmp_path, capsys):
    from tests.tiny import PHOTOS
    from trainer.__main__ import main

    generated = tmp_path / "generated"
    generated.mkdir()
    for i, photo in enumerate(sorted((PHOTOS / "cat").glob("*.jpg"))):
        shutil.copy(photo, generated / f"{i:03d}.jpg")
    (generated / "000.txt").write_text("a zwx cat on the beach")
    table = tmp_path / "table.png"
    code = main(["evaluate", "--photos", str(PHOTOS / "dog"), "--generated", str(generated), "--prompt",
                 "a zwx cat in the snow", "--class-samples", str(PHOTOS / "cat"), "--identifier", "zwx",
                 "--models", str(models["root"]), "--table", str(table)])
    out = capsys.readouterr().out
    assert code == 0, out
    lines = {line.split()[0]: line for line in out.splitlines() if line.split()}

    # The DINO score by hand, with transformers' own processor and model (auto picked a DINO v1 over the DINOv2s).
    def cls_tokens(folder):
        batch = [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.jpg"))]
        with torch.no_grad():
            return models["dino"](pixel_values=pixels(hf_processor("ViTImageProcessor", DINO_V1_PREPROCESSOR),
                                                      batch)).last_hidden_state[:, 0]
    gen, photos = cls_tokens(generated), cls_tokens(PHOTOS / "dog")
    expected = torch.nn.functional.cosine_similarity(gen[:, None], photos[None], dim=-1).mean()
    assert lines["DINO"].split()[1:3] == [f"{expected:.4f}", "higher"], out
    assert "DINO ViT/8 (dino-vits-bare)" in lines["DINO"] and "3 generated x 5 photos" in lines["DINO"]
    assert "(clip-full.safetensors)" in lines["CLIP-I"]  # a full CLIP (CLIP-T too), the smallest
    assert "3 images with their prompts" in lines["CLIP-T"]
    assert "3 class samples x 5 photos" in lines["PRES"]
    assert "DIV     skipped" in out and "DIV: DIV needs LPIPS" in out
    assert Image.open(table).size[0] > 200

    code = main(["evaluate", "--photos", str(PHOTOS / "dog"), "--generated", str(generated)])
    out = capsys.readouterr().out
    assert code == 0 and "DINO    skipped" in out and "no --models given" in out
    assert "put the paper's DINO ViT-S/16" in out and "models/dino-vits16/" in out
    assert main(["evaluate", "--photos", str(PHOTOS / "dog")]) == 2
    assert "give --generated" in capsys.readouterr().err
