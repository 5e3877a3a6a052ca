"""The toy world: deterministic, captions that say what is drawn, a subject no caption word describes."""
import random
from itertools import combinations

import numpy as np
import pytest

from trainer.models import load_tokenizer
from trainer.toy import world
from trainer.toy.world import Scene, caption, render


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def data():
    return world.dataset(400, seed=3)


def test_render_is_deterministic_and_seeds_give_different_views():
    scene = Scene("heart", "green", "black", pattern="dotted", position="left", size="small")
    a, b, c = render(scene, seed=5), render(scene, seed=5), render(scene, seed=6)
    assert a.mode == "RGB" and a.size == (32, 32)
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(c))
    assert render(scene, size=64, seed=5).size == (64, 64)


def test_dataset_is_deterministic_in_its_seed(data):
    again = world.dataset(400, seed=3)
    assert [text for _, text, _ in again] == [text for _, text, _ in data]
    assert all(np.array_equal(pixels(a), pixels(b)) for (a, _, _), (b, _, _) in zip(again, data))
    other = world.dataset(400, seed=4)
    assert [text for _, text, _ in other] != [text for _, text, _ in data]


def test_captions_follow_one_grammar():
    assert caption(Scene("star", "red", "blue")) == "a red star on a blue background"
    assert caption(Scene("star", "orange", "gray")) == "an orange star on a gray background"
    assert (caption(Scene("circle", "green", "black", "striped", "left", "small"))
            == "a small striped green circle on the left on a black background")
    assert caption(Scene("square", "white", "red", position="top")) == "a white square at the top on a red background"
    assert caption(Scene("heart", "red", "white", style="sketch")) == "a sketch of a heart"
    assert caption(Scene("star", "orange", "blue", subject=True)) == "a {V} star on a blue background"
    assert caption(Scene("star", "blue", "white", subject=True), "sks") == "a blue sks star on a white background"
    assert caption(Scene("star", "orange", "white", style="sketch", subject=True), "zwx") == "a sketch of a zwx star"


def test_a_caption_determines_its_scene(data):
    """Every distinction the world draws is said in the caption: equal captions mean equal scenes."""
    seen = {}
    for _, text, scene in data:
        assert seen.setdefault(text, scene) == scene, text
    assert len(seen) > 150  # and the data set is varied


def test_captions_name_what_is_drawn(data):
    for image, text, scene in data:
        assert scene.shape in text.split()
        if scene.style == "photo":
            assert f"{scene.color} {scene.shape}" in text and text.endswith(f"on a {scene.background} background")
            corners = pixels(image)[[0, 0, -1, -1], [0, -1, 0, -1]]
            assert np.abs(corners - world.rgb(scene.background)).max() < 20, (text, corners)
        else:
            assert text.startswith("a sketch of")
            assert np.abs(pixels(image)[:3, :3].mean((0, 1)) - world.PAPER_RGB).max() < 12


def test_the_shape_has_the_colour_it_is_said_to_have():
    for color, rgb in world.COLORS.items():
        background = "gray" if color != "gray" else "white"
        for shape in world.SHAPES:
            centre = pixels(render(Scene(shape, color, background), seed=1))[14:18, 14:18].reshape(-1, 3)
            assert np.abs(centre - rgb).max() < 12, (shape, color)


def test_shapes_are_told_apart_by_their_pixels():
    masks = {}
    for shape in world.SHAPES:
        image = pixels(render(Scene(shape, "black", "white"), seed=0))
        masks[shape] = image.sum(-1) < 3 * 128
    for a, b in combinations(world.SHAPES, 2):
        assert (masks[a] != masks[b]).sum() > 40, (a, b)


def test_random_scenes_cover_the_vocabulary_and_never_the_subject(data):
    scenes = [scene for _, _, scene in data] + [world.random_scene(random.Random(i)) for i in range(400)]
    assert not any(scene.subject for scene in scenes)
    assert not any("{V}" in text for _, text, _ in data)
    assert {s.shape for s in scenes} == set(world.SHAPES)
    assert {s.color for s in scenes if s.style == "photo"} == set(world.COLORS)
    assert {s.background for s in scenes if s.style == "photo"} == set(world.BACKGROUNDS)
    for attribute, values in (("pattern", world.PATTERNS), ("position", world.POSITIONS), ("size", world.SIZES),
                              ("style", world.STYLES)):
        assert {getattr(s, attribute) for s in scenes} == set(values)
    assert all(s.color != s.background for s in scenes)


def test_every_world_word_is_one_clip_token():
    tokenizer = load_tokenizer("sd1")
    words = (list(world.SHAPES) + list(world.COLORS) + list(world.BACKGROUNDS) + list(world.PATTERNS)
             + list(world.SIZES) + ["sketch", "background", "left", "right", "top", "bottom"])
    for word in words:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    longest = caption(Scene("triangle", "purple", "yellow", "striped", "bottom", "small"))
    assert len(tokenizer(longest).input_ids) < 30


def test_subject_views_have_an_identity_a_plain_star_lacks():
    train, heldout = world.subject_views("train"), world.subject_views("heldout")
    assert 4 <= len(train) <= 5 and len(heldout) >= 6
    assert all(s.subject and s.shape == world.SUBJECT_SHAPE and s.color == world.SUBJECT_COLOR and s.style == "photo"
               for _, s in train + heldout)
    assert len({s.background for _, s in train}) == len(train)  # varied backgrounds
    assert {s.size for _, s in train} == set(world.SIZES) and len({s.position for _, s in train}) >= 2
    for (a, _), (b, _) in combinations(train + heldout, 2):
        assert np.abs(pixels(a) - pixels(b)).sum(-1).max() > 100
    assert not {s for _, s in train} & {s for _, s in heldout}
    assert all(np.array_equal(pixels(a), pixels(b))
               for (a, _), (b, _) in zip(world.subject_views("train"), train))
    for scene in [s for _, s in train] + [Scene("star", "blue", "white", subject=True)]:
        marked, plain = pixels(render(scene, seed=7)), pixels(render(world.plain_twin(scene), seed=7))
        changed = np.abs(marked - plain).sum(-1) > 60
        assert changed.sum() >= 10 if scene.size == "small" else changed.sum() >= 25
        # the teal eye is there, whatever the body colour
        assert (np.abs(marked - world.MARK_EYE_RGB).sum(-1) < 60).sum() >= 3
    with pytest.raises(ValueError):
        world.subject_views("test")


def test_eval_prompts_are_the_captions_of_their_ground_truth():
    kinds = set()
    for template, truth in world.EVAL_PROMPTS:
        assert "{V}" in template and truth.subject
        assert caption(truth, "{V}") == template
        kinds.add(world.EVAL_PROMPT_KINDS[template])
        assert template.format(V="sks").count("sks") == 1
    assert kinds == {"recontextualization", "property", "style"}
    train_backgrounds = {s.background for _, s in world.subject_views("train")}
    assert all(truth.background not in train_backgrounds for template, truth in world.EVAL_PROMPTS
               if world.EVAL_PROMPT_KINDS[template] == "recontextualization")


def test_scenes_refuse_words_outside_the_world():
    with pytest.raises(ValueError, match="color"):
        Scene("star", "teal", "white")
    with pytest.raises(ValueError, match="subject"):
        Scene("circle", "red", "white", subject=True)
