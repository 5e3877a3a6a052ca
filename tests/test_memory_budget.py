"""Every phase of the 8 GB preset's whole run fits an 8 GB card, at full SD 1.5 size, measured on the CPU.

bench/memory_model.py runs the real run (token probing, 4 class images generated, photo encoding, 2 training steps with
the text encoder trained, a preview, saving) on a random full-size SD 1.5 under its storage tracker, every choice made
as on an 8 GB GPU with bf16 (7.6 GiB, what such a card reports). Each phase's allocated peak, turned into the reserved
memory the caching allocator would hold (bench/memory_model.estimated_reserved), must stay within 7.0 GiB: what an
8 GB card keeps for one process after the CUDA context and a desktop. A regression in any phase shows here without a
GPU. About 5 minutes on 2 cores and 8 GB of RAM.
"""
import pytest
import torch

from bench import memory_model
from bench.dreambooth_bench import parse_setting
from bench.models import random_bundle

GIB = memory_model.GIB
BUDGET = 7.0 * GIB  # reserved, for an 8 GB card


@pytest.mark.slow
def test_every_phase_of_the_8gb_preset_fits_an_8gb_card():
    torch.set_num_threads(2)
    result = memory_model.measure(random_bundle("sd1", small=False), parse_setting("8GB+te").ours, steps=2,
                                  gpu_memory=int(7.6 * GIB), whole_run=True, num_images=4)
    phases = {phase["phase"]: phase for phase in result["phases"]}
    assert list(phases) == ["token probing", "class images", "photo encoding", "training", "previews", "saving"]
    report = memory_model.phase_markdown([{**result, "setting": "8GB+te"}])
    for name, phase in phases.items():
        assert memory_model.estimated_reserved(phase["peak"]) <= BUDGET, f"{name} is over budget:\n{report}"
    # nothing is carried from one phase into the next but the cached latents and text states (a few MiB)
    for name in ("token probing", "class images", "photo encoding", "training", "saving"):
        assert phases[name]["live_at_start"] < 0.05 * GIB, f"{name} found the device in use:\n{report}"
    assert result["left_on_device"] == 0
    # the training step itself is where the H200 measured it (4.70 GiB allocated, issue 10): within 10%
    assert 0.9 * 4.70 * GIB <= result["peak"] <= 1.1 * 4.70 * GIB, report


@pytest.mark.slow
def test_every_phase_of_the_6gb_preset_fits_a_6gb_card():
    # The same whole run decided as on a 6 GB laptop card with bf16 (5.8 GiB, what such a card reports), held to the
    # 5.3 GiB it leaves for one process (issue 10), in ShapesOnly (see below; about 2 minutes). Its levers are the
    # 8 GB preset's: this is what says they fit the smaller card.
    torch.set_num_threads(2)
    with memory_model.ShapesOnly():
        bundle = random_bundle("sd1", small=False)
    result = memory_model.measure(bundle, parse_setting("6GB+te").ours, steps=2, gpu_memory=int(5.8 * GIB),
                                  whole_run=True, num_images=4)
    phases = {phase["phase"]: phase for phase in result["phases"]}
    assert list(phases) == ["token probing", "class images", "photo encoding", "training", "previews", "saving"]
    report = memory_model.phase_markdown([{**result, "setting": "6GB+te"}])
    for name, phase in phases.items():
        assert memory_model.estimated_reserved(phase["peak"]) <= 5.3 * GIB, f"{name} is over budget:\n{report}"
    assert result["left_on_device"] == 0


# --- SDXL at 1024 px: the 12 GB preset on a 12 GB card (the UNet trained) and on a 16 GB card (both text encoders) ---
# The same whole run on a full-size SDXL (2.57 B-parameter UNet), in ShapesOnly: tensors with sizes and no data, so
# that it takes minutes and little RAM where real tensors would take hours and more RAM than CI has; it counts what
# the real tracker counts (tests/test_memory_model.py, and full-size SD 1.5 reproduces the table above to 0.01 GiB).
# Issue 12's budgets, reserved: 11.0 GiB on a 12 GB card, 15.0 on a 16 GB card. Needs SDXL sampling in the loop's
# class-image and preview phases. About 2-3 minutes a run on 2 cores.
SDXL_RUNS = {"12GB": (11.6, 11.0), "12GB+te": (15.6, 15.0)}  # setting -> (the card's GiB, the budget in GiB)
_sdxl_results: dict[str, dict] = {}


def sdxl_whole_run(setting: str) -> dict:
    if setting not in _sdxl_results:
        torch.set_num_threads(2)
        with memory_model.ShapesOnly():
            bundle = random_bundle("sdxl", small=False)
        card, _ = SDXL_RUNS[setting]
        _sdxl_results[setting] = memory_model.measure(bundle, parse_setting(setting).ours, steps=2,
                                                      gpu_memory=int(card * GIB), whole_run=True, num_images=4)
    return _sdxl_results[setting]


@pytest.mark.slow
@pytest.mark.parametrize("setting", list(SDXL_RUNS))
def test_every_phase_of_an_sdxl_run_fits_the_card(setting):
    result = sdxl_whole_run(setting)
    budget = SDXL_RUNS[setting][1] * GIB
    phases = {phase["phase"]: phase for phase in result["phases"]}
    assert list(phases) == ["token probing", "class images", "photo encoding", "training", "previews", "saving"]
    report = memory_model.phase_markdown([{**result, "setting": setting}])
    for name in ("token probing", "class images", "photo encoding", "saving"):
        assert memory_model.estimated_reserved(phases[name]["peak"]) <= budget, f"{name} is over budget:\n{report}"
    # the training steps themselves (the training phase's peak is its previews', nested in it)
    assert memory_model.estimated_reserved(result["peak"]) <= budget, f"a training step is over budget:\n{report}"
    for name in ("token probing", "class images", "photo encoding", "training", "saving"):
        assert phases[name]["live_at_start"] < 0.05 * GIB, f"{name} found the device in use:\n{report}"
    assert result["left_on_device"] == 0
    # what the levers promise: bf16 weights (2 bytes a parameter) and Adafactor's factored moments, no gradients
    # between steps, and the trained encoders' weights in bf16 too
    start = result["steps"][-1]["start_breakdown"]
    assert abs(start["weights"] - 2 * result["trained_params"]) < 2 ** 20 and start["grads"] == 0
    assert start["optimizer state"] < 0.5 * start["weights"]


@pytest.mark.slow
@pytest.mark.parametrize("setting", list(SDXL_RUNS))
def test_sdxl_previews_fit_the_card(setting):
    """The final previews are drawn after the training phase, without the optimizer's state: beside it (as previews
    every N steps are) the 12 GB preset's came to 10.91 GiB allocated, est. 12.10 reserved (measured 2026-11-30)."""
    result = sdxl_whole_run(setting)
    previews = next(phase for phase in result["phases"] if phase["phase"] == "previews")
    report = memory_model.phase_markdown([{**result, "setting": setting}])
    assert memory_model.estimated_reserved(previews["peak"]) <= SDXL_RUNS[setting][1] * GIB, report
