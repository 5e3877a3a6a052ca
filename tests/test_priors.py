import io
import json

import pytest
import torch
from PIL import Image

import trainer.priors as priors
from tests.tiny import tiny_bundle
from trainer.device import GIB, emulating_gpu
from trainer.priors import cache_key, ensure_class_priors, load_prior_images, model_fingerprint, prior_settings
from trainer.sampling import sample_images

FAST = {"width": 16, "height": 16, "steps": 2, "guidance": 7.5, "sampler": "euler_a", "negative_prompt": "",
        "seed": 0}


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle("sd1")


@pytest.fixture
def sampled(monkeypatch):
    """How many images each call into the sampler asked for."""
    calls = []
    real = priors.sample_images

    def counting(bundle, prompts, **kwargs):
        calls.append(len(prompts))
        return real(bundle, prompts, **kwargs)

    monkeypatch.setattr(priors, "sample_images", counting)
    return calls


def priors_for(bundle, root, count, **overrides):
    return ensure_class_priors(bundle, "a dog", count=count, cache_root=root, **{**FAST, **overrides})


def file_bytes(paths):
    return [path.read_bytes() for path in paths]


def key_for(bundle, prompt="a dog", **overrides):
    return cache_key(prior_settings(bundle, prompt, **{**FAST, **overrides}))


def test_repeat_samples_nothing_and_top_up_samples_only_the_missing(bundle, tmp_path, sampled):
    first = priors_for(bundle, tmp_path, 2, batch_size=2)
    assert sampled == [2]
    assert [p.name for p in first] == ["00000.png", "00001.png"]
    original = file_bytes(first)

    assert priors_for(bundle, tmp_path, 2, batch_size=1) == first  # batch_size is not part of the key
    assert sampled == [2]

    topped_up = priors_for(bundle, tmp_path, 4, batch_size=2)
    assert sampled == [2, 2]
    assert topped_up[:2] == first
    assert file_bytes(first) == original

    # The same four images as one run of the same batches: byte for byte.
    one_go = priors_for(bundle, tmp_path / "fresh", 4, batch_size=2)
    assert file_bytes(one_go) == file_bytes(topped_up)
    assert len(set(file_bytes(one_go))) == 4  # image i uses seed + i


def test_fewer_than_cached_returns_a_prefix_and_manifest_keeps_the_count(bundle, tmp_path, sampled):
    four = priors_for(bundle, tmp_path, 4)
    assert priors_for(bundle, tmp_path, 3) == four[:3]
    assert sampled == [4]
    manifest = json.loads((four[0].parent / "manifest.json").read_text())
    assert manifest["count"] == 4
    assert manifest["key"] == four[0].parent.name == key_for(bundle)
    assert manifest["settings"]["prompt"] == "a dog"
    assert manifest["settings"]["sampler"] == "euler_a"


def test_processes_sharing_the_cache_draw_each_missing_image_once_and_the_same_pixels(bundle, tmp_path, sampled):
    priors_for(bundle, tmp_path, 1)  # image 0 cached already: process 0 draws images 2 and 4, process 1 1 and 3
    leftover = next((tmp_path / key_for(bundle)).glob("*.png")).with_suffix(".tmp")
    leftover.write_bytes(b"another process, mid-write")
    progress = []
    first = priors_for(bundle, tmp_path, 5, share=(0, 2), on_progress=lambda done, total: progress.append(done))
    second = priors_for(bundle, tmp_path, 5, share=(1, 2))
    assert sampled == [1, 2, 2]
    assert progress == [1, 3, 5]  # this process's images, counted as if the other kept pace
    assert leftover.exists()  # a temp file may be another process's, being written: left alone
    manifest = tmp_path / key_for(bundle) / "manifest.json"
    assert json.loads(manifest.read_text())["count"] == 1  # process 0 saw image 1 missing (the other's)...
    after = priors_for(bundle, tmp_path, 5)  # ...and records all once all are done (what train() does)
    assert sampled == [1, 2, 2] and json.loads(manifest.read_text())["count"] == 5 and not leftover.exists()
    assert first == second == after
    assert file_bytes(after) == file_bytes(priors_for(bundle, tmp_path / "one process", 5))


def test_progress_counts_cached_then_new_images(bundle, tmp_path):
    progress = []
    priors_for(bundle, tmp_path, 2, on_progress=lambda done, total: progress.append((done, total)))
    priors_for(bundle, tmp_path, 2, on_progress=lambda done, total: progress.append((done, total)))
    priors_for(bundle, tmp_path, 3, on_progress=lambda done, total: progress.append((done, total)))
    assert progress == [(0, 2), (1, 2), (2, 2), (2, 2), (2, 3), (3, 3)]


@pytest.mark.parametrize("change", [
    {"prompt": "a cat"}, {"negative_prompt": "blurry"}, {"width": 24}, {"height": 24}, {"steps": 3},
    {"guidance": 5.0}, {"sampler": "ddim"}, {"seed": 1},
])
def test_every_setting_that_changes_pixels_changes_the_key(bundle, change):
    assert key_for(bundle, **change) != key_for(bundle)


def test_key_is_stable_and_ignores_incidental_formatting(bundle):
    assert key_for(tiny_bundle("sd1", seed=0)) == key_for(bundle)
    assert key_for(bundle, prompt=" a dog ", guidance=7.5, width=16.0) == key_for(bundle)


def test_model_identity_is_part_of_the_key(bundle):
    assert key_for(tiny_bundle("sd1", seed=1)) != key_for(bundle)  # other random weights
    assert key_for(tiny_bundle("sd1", "v_prediction")) != key_for(bundle)  # same weights, other prediction
    hashed = tiny_bundle("sd1")
    hashed.source_hash = "ab" * 32
    assert model_fingerprint(hashed) == "ab" * 32
    assert key_for(hashed) != key_for(bundle)


def test_a_changed_setting_or_model_uses_another_folder(bundle, tmp_path, sampled):
    base = priors_for(bundle, tmp_path, 1)
    other_steps = priors_for(bundle, tmp_path, 1, steps=3)
    other_model = priors_for(tiny_bundle("sd1", seed=1), tmp_path, 1)
    assert len({base[0].parent, other_steps[0].parent, other_model[0].parent}) == 3
    assert sampled == [1, 1, 1]


def test_damaged_or_unfinished_files_are_regenerated(bundle, tmp_path, sampled):
    paths = priors_for(bundle, tmp_path, 4, batch_size=1)
    original = file_bytes(paths)
    folder = paths[0].parent
    paths[0].write_bytes(original[0][: len(original[0]) // 2])  # truncated PNG
    wrong_size = io.BytesIO()
    Image.new("RGB", (8, 8)).save(wrong_size, format="PNG")
    paths[1].write_bytes(wrong_size.getvalue())
    paths[2].unlink()  # a crash during its write left only the temp file
    leftover = folder / f".{paths[2].name}.abc123.tmp"
    leftover.write_bytes(original[2][:50])

    again = priors_for(bundle, tmp_path, 4, batch_size=1)
    assert sampled == [4, 3]
    assert again == paths
    assert file_bytes(again) == original  # seed + i: the very same images come back
    assert not leftover.exists()


def test_an_interrupted_run_keeps_the_images_it_wrote(bundle, tmp_path, sampled):
    def stop_after_first_new(done, total):
        if done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        priors_for(bundle, tmp_path, 3, batch_size=3, on_progress=stop_after_first_new)
    folder = tmp_path / key_for(bundle)
    # The batch's other images were already drawn: their files are finished (in the background) rather than lost.
    written = sorted(p.name for p in folder.glob("*.png"))
    assert written[0] == "00000.png" and not list(folder.glob("*.tmp"))
    assert all(Image.open(folder / name).size == (16, 16) for name in written)
    assert json.loads((folder / "manifest.json").read_text())["count"] >= 1

    priors_for(bundle, tmp_path, 3, batch_size=3)
    assert sampled == [3] + ([3 - len(written)] if len(written) < 3 else [])


@pytest.mark.parametrize("prompt, count, overrides, message", [
    ("  ", 2, {}, "class prompt is empty"),
    ("a dog", 0, {}, "count must be at least 1"),
    ("a dog", 2, {"width": 20}, "width must be a positive multiple of 8"),
    ("a dog", 2, {"sampler": "plms"}, "Unknown sampler"),
])
def test_refuses_bad_requests_before_touching_disk(bundle, tmp_path, prompt, count, overrides, message):
    root = tmp_path / "cache"
    with pytest.raises(ValueError, match=message):
        ensure_class_priors(bundle, prompt, count=count, cache_root=root, **{**FAST, **overrides})
    assert not root.exists()


def test_load_prior_images(bundle, tmp_path):
    images = load_prior_images(priors_for(bundle, tmp_path, 2))
    assert [(image.mode, image.size) for image in images] == [("RGB", (16, 16))] * 2


# --- SDXL -------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def xl():
    return tiny_bundle("sdxl")


def test_sdxl_class_images_are_cached_and_are_what_sampling_draws(xl, tmp_path, sampled):
    first = priors_for(xl, tmp_path, 2)
    assert priors_for(xl, tmp_path, 2) == first and sampled == [2]  # a repeat draws nothing
    three = priors_for(xl, tmp_path, 3)
    assert three[:2] == first and sampled == [2, 1]  # a top-up draws only the missing image
    drawn = sample_images(xl, ["a dog"] * 3, seeds=[0, 1, 2], **{k: v for k, v in FAST.items() if k != "seed"})
    assert [image.tobytes() for image in load_prior_images(three)] == [image.tobytes() for image in drawn]
    assert first[0].parent.name != key_for(tiny_bundle("sd1"))


def test_sdxl_fingerprint_covers_the_second_text_encoder(xl):
    changed = tiny_bundle("sdxl")
    with torch.no_grad():
        changed.text_encoder_2.text_projection.weight.add_(1e-3)
    assert not xl.source_hash and key_for(changed) != key_for(xl)


def test_sdxl_class_images_phase_lends_both_encoders_in_half_precision_and_the_vae_in_fp32(xl, tmp_path,
                                                                                         monkeypatch):
    seen = []
    real = priors.sample_images

    def checking(bundle, prompts, **kwargs):  # what the phase lent, before sampling borrows anything itself
        seen.append({name: next(getattr(bundle, name).parameters()).dtype
                     for name in ("unet", "text_encoder", "text_encoder_2", "vae")})
        return real(bundle, prompts, **kwargs)

    monkeypatch.setattr(priors, "sample_images", checking)
    with emulating_gpu(12 * GIB):  # the choices made on a GPU with bf16, here on the CPU
        paths = priors.make_class_priors(xl, "a dog", count=1, cache_root=tmp_path, device="cpu",
                                         **{k: v for k, v in FAST.items() if k != "negative_prompt"})
    assert seen == [{"unet": torch.bfloat16, "text_encoder": torch.bfloat16, "text_encoder_2": torch.bfloat16,
                     "vae": torch.float32}]
    assert len(paths) == 1 and Image.open(paths[0]).size == (16, 16)
    assert all(p.dtype == torch.float32 for module in xl.modules for p in module.parameters())  # given back
