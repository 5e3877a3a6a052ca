"""The paper's metrics on fixed embeddings, against hand-computed values and an independent loop; which images go into
which metric; prompts and folders of generated images."""
from __future__ import annotations

import math

import pytest
import torch
from PIL import Image, PngImagePlugin

from trainer import fidelity, measure
from trainer.embedders import CLIP, DINO, EmbedderError

R = 1 / math.sqrt(2)


def loop_mean_cosine(a, b, pairs):
    """The plain formula: mean of u.v / (|u| |v|) over the given index pairs."""
    total = 0.0
    for i, j in pairs:
        u, v = a[i].tolist(), b[j].tolist()
        dot = sum(x * y for x, y in zip(u, v))
        total += dot / (math.sqrt(sum(x * x for x in u)) * math.sqrt(sum(y * y for y in v)))
    return total / len(pairs)


def test_subject_fidelity_is_the_mean_over_all_generated_photo_pairs_by_hand():
    generated = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    photos = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # cos: (g0,p0)=1, (g0,p1)=1/sqrt2, (g1,p0)=0, (g1,p1)=1/sqrt2
    assert fidelity.subject_fidelity(generated, photos) == pytest.approx((1 + R + 0 + R) / 4, abs=1e-12)
    # Cosine: the lengths of the embeddings do not count.
    assert fidelity.subject_fidelity(generated * 3, photos * 0.5) == pytest.approx((1 + 2 * R) / 4, abs=1e-12)


def test_pres_is_the_same_mean_over_class_sample_photo_pairs_by_hand():
    class_samples = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0], [1.0, 1.0, 0.0]])
    photos = torch.tensor([[0.0, 1.0, 0.0]])
    assert fidelity.pres(class_samples, photos) == pytest.approx((1 + 0 + R) / 3, abs=1e-12)


def test_clip_t_pairs_each_image_with_its_own_prompt_only():
    images = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    prompts = torch.tensor([[1.0, 1.0], [0.0, -1.0]])
    assert fidelity.prompt_fidelity(images, prompts) == pytest.approx((R - 1) / 2, abs=1e-12)
    # Not the mean over all (image, prompt) pairs, which would be (R + 0 + R - 1) / 4.
    assert fidelity.prompt_fidelity(images, prompts) != pytest.approx((2 * R - 1) / 4, abs=1e-3)


def test_metrics_match_the_plain_formula_on_random_embeddings():
    torch.manual_seed(0)
    generated, photos, prompts = torch.randn(7, 16), torch.randn(4, 16), torch.randn(7, 16)
    all_pairs = [(i, j) for i in range(7) for j in range(4)]
    assert fidelity.subject_fidelity(generated, photos) == pytest.approx(
        loop_mean_cosine(generated, photos, all_pairs), abs=1e-9)
    assert fidelity.pres(generated, photos) == pytest.approx(loop_mean_cosine(generated, photos, all_pairs), abs=1e-9)
    assert fidelity.prompt_fidelity(generated, prompts) == pytest.approx(
        loop_mean_cosine(generated, prompts, [(i, i) for i in range(7)]), abs=1e-9)
    # Half-precision embeddings (a model run in fp16) give the same answer: the arithmetic is in float64.
    assert fidelity.subject_fidelity(generated.half(), photos.half()) == pytest.approx(
        loop_mean_cosine(generated.half().double(), photos.half().double(), all_pairs), abs=1e-9)


def test_metric_inputs_are_checked():
    with pytest.raises(ValueError, match="one model"):
        fidelity.subject_fidelity(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="no embeddings"):
        fidelity.pres(torch.ones(0, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="one prompt embedding per image"):
        fidelity.prompt_fidelity(torch.ones(3, 4), torch.ones(2, 4))


# --- which images count -----------------------------------------------------------------------------------------

class FakeEmbedder:
    """Embeds an image as its colour (R, G, B) and a prompt as a fixed vector per word count; records what it saw."""

    def __init__(self, kind: str, text: bool = False):
        self.kind, self.has_text, self.name = kind, text, f"fake {kind}"
        self.seen_images, self.seen_texts = [], []

    def embed_images(self, images):
        self.seen_images.append(len(images))
        return torch.tensor([image.getpixel((0, 0)) for image in images], dtype=torch.float32)

    def embed_texts(self, texts):
        self.seen_texts.extend(texts)
        return torch.tensor([TEXT_VECTORS[text] for text in texts])


TEXT_VECTORS = {"a dog on the beach": [1.0, 0.0, 0.0], "a dog in the snow": [0.0, 0.0, 1.0]}


def solid(rgb) -> Image.Image:
    return Image.new("RGB", (8, 8), rgb)


def test_measure_puts_each_image_set_into_its_metric():
    photos = [solid((1, 0, 0)), solid((1, 1, 0))]
    generated = [solid((1, 0, 0)), solid((0, 1, 0)), solid((0, 0, 1))]
    prompts = ["a zwx dog on the beach", "a zwx dog in the snow", None]
    class_samples = [solid((0, 0, 1))]
    dino, clip = FakeEmbedder(DINO), FakeEmbedder(CLIP, text=True)
    rows = {row.metric: row for row in measure.measure(photos, generated, prompts, class_samples,
                                                       measure.Embedders(dino, clip), identifier="zwx")}
    # DINO and CLIP-I: all 3 generated x 2 photos; cos with (1,0,0): 1, 0, 0; with (1,1,0): R, R, 0.
    expected = (1 + 0 + 0 + R + R + 0) / 6
    assert rows["DINO"].value == pytest.approx(expected) and rows["CLIP-I"].value == pytest.approx(expected)
    assert rows["DINO"].images == "3 generated x 2 photos"
    # CLIP-T: the two images with a prompt, each against its own prompt without the identifier.
    assert clip.seen_texts == ["a dog on the beach", "a dog in the snow"]
    assert rows["CLIP-T"].value == pytest.approx((1 + 0) / 2)
    assert "1 images without a prompt left out" in rows["CLIP-T"].note
    # PRES: the class sample (0,0,1) against the photos, with DINO: 0.
    assert rows["PRES"].value == pytest.approx(0.0) and rows["PRES"].better == "lower"
    assert rows["DIV"].value is None and "pickled" in rows["DIV"].note
    # Each image set is embedded once per model: DINO saw photos, generated, class samples; CLIP photos, generated.
    assert sorted(dino.seen_images) == [1, 2, 3] and sorted(clip.seen_images) == [2, 3]


def test_measure_skips_what_it_cannot_compute_and_says_why():
    photos, generated = [solid((1, 0, 0))], [solid((0, 1, 0))]
    rows = {row.metric: row for row in measure.measure(photos, generated, ["a zwx dog"],
                                                       models=measure.Embedders(home="/models/here"))}
    assert all(row.value is None for row in rows.values())
    assert "no DINO model" in rows["DINO"].note and "/models/here/dino-vits16/" in rows["DINO"].note
    assert "no CLIP model" in rows["CLIP-I"].note and "/models/here/clip-vit-large-patch14/" in rows["CLIP-I"].note
    assert rows["CLIP-T"].note == "needs a CLIP model, as CLIP-I does"
    assert rows["PRES"].note == "needs a DINO model, as DINO does"

    vision_only = FakeEmbedder(CLIP)
    rows = {row.metric: row for row in measure.measure(photos, generated, ["a zwx dog"],
                                                       models=measure.Embedders(FakeEmbedder(DINO), vision_only))}
    assert rows["CLIP-I"].value is not None and rows["CLIP-T"].value is None
    assert "image encoder only" in rows["CLIP-T"].note
    assert rows["PRES"].value is None and "no class samples" in rows["PRES"].note
    text = measure.table_text(list(rows.values()))
    assert "PRES    skipped" in text and "CLIP-T: fake clip is a CLIP image encoder only" in text
    image = measure.table_image(list(rows.values()))
    assert image.mode == "RGB" and image.width > 200 and image.height == 6 * 18 + 16


def test_measure_needs_photos_and_a_prompt_per_image():
    with pytest.raises(ValueError, match="no photos"):
        measure.measure([], [solid((1, 0, 0))])
    with pytest.raises(ValueError, match="2 generated images but 1 prompts"):
        measure.measure([solid((1, 0, 0))], [solid((1, 0, 0))] * 2, ["a"])


def test_the_scorer_for_training_uses_dino_and_keeps_the_photos_embeddings():
    dino = FakeEmbedder(DINO)
    scorer = measure.EmbeddingScorer(measure.Embedders(dino, FakeEmbedder(CLIP)))
    photos = [solid((1, 0, 0)), solid((1, 1, 0))]
    assert scorer.metric == "DINO"
    assert scorer.subject_fidelity([solid((1, 0, 0))], photos) == pytest.approx((1 + R) / 2)
    assert scorer.pres([solid((0, 0, 1))], [image.copy() for image in photos]) == pytest.approx(0.0)
    assert dino.seen_images == [1, 2, 1]  # the photos once, though passed twice (as copies)
    clip_only = measure.EmbeddingScorer(measure.Embedders(clip=FakeEmbedder(CLIP)))
    assert clip_only.metric == "CLIP-I"
    with pytest.raises(EmbedderError, match="PRES needs a DINO model"):
        clip_only.pres(photos, photos)
    with pytest.raises(EmbedderError, match="no DINO or CLIP model"):
        measure.EmbeddingScorer(measure.Embedders())


# --- prompts ------------------------------------------------------------------------------------------------------

def test_prompts_typed_one_per_line_are_spread_over_the_images():
    assert measure.assign_prompts("", 3) == [None, None, None]
    assert measure.assign_prompts("a zwx dog\n", 2) == ["a zwx dog", "a zwx dog"]
    assert measure.assign_prompts("p1\n\n p2 \n", 4) == ["p1", "p1", "p2", "p2"]
    assert measure.assign_prompts("p1\np2\np3", 3) == ["p1", "p2", "p3"]
    with pytest.raises(ValueError, match="3 lines for 4 images"):
        measure.assign_prompts("p1\np2\np3", 4)


def test_the_identifier_leaves_the_prompt_for_clip_t():
    assert measure.without_identifier("a zwx dog on the beach", "zwx") == "a dog on the beach"
    assert measure.without_identifier("zwx, a zwx-dog", "zwx") == ", a -dog"
    assert measure.without_identifier("a zwxy dog", "zwx") == "a zwxy dog"  # whole words only
    assert measure.without_identifier("a zwx dog", "") == "a zwx dog"


def test_a_folder_of_generated_images_with_their_prompts(tmp_path):
    solid((10, 20, 30)).save(tmp_path / "000.png")
    (tmp_path / "000.txt").write_text("a zwx dog on the beach\n")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a zwx dog in the snow\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a")
    solid((40, 50, 60)).save(tmp_path / "001.png", pnginfo=info)
    solid((70, 80, 90)).save(tmp_path / "002.jpg")
    (tmp_path / "notes.md").write_text("not an image")
    images, prompts, names = measure.read_images(tmp_path)
    assert names == ["000.png", "001.png", "002.jpg"]
    assert prompts == ["a zwx dog on the beach", "a zwx dog in the snow", None]
    assert images[0].getpixel((0, 0)) == (10, 20, 30) and images[2].mode == "RGB"
    (tmp_path / "003.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="003.png cannot be read"):
        measure.read_images(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        measure.read_images(empty)
