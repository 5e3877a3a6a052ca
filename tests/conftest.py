"""Fixtures shared by the test modules, and the switch for tests that need diffusers' reference script.

Tests marked `reference` need DREAMBOOTH_REFERENCE_SCRIPT (a copy of diffusers' examples/dreambooth/
train_dreambooth.py) and a Python where torchvision and accelerate import; tests marked `torchvision` need torchvision
only. Without them they skip with the reason; with REQUIRE_REFERENCE=1 (CI's reference step) they fail instead, so a
broken reference environment cannot pass as a row of skips.
"""
from __future__ import annotations

import functools
import importlib
import os
import shutil
from pathlib import Path

import pytest

HOW_TO_RUN_REFERENCE = ("set DREAMBOOTH_REFERENCE_SCRIPT to a copy of diffusers' examples/dreambooth/"
                        "train_dreambooth.py and run pytest under a Python with torchvision and accelerate "
                        "(README, Tests; .ci/run builds one)")


@functools.cache
def missing_module(name: str) -> str:
    """Why `name` does not import here, or "" when it does."""
    try:
        importlib.import_module(name)
    except Exception as error:  # not installed, or a build that does not match this torch
        return f"{name} does not import here ({type(error).__name__}: {str(error)[:200]})"
    return ""


def reference_missing(need_script: bool) -> str:
    modules = ["torchvision", "accelerate"] if need_script else ["torchvision"]
    missing = [reason for reason in map(missing_module, modules) if reason]
    script = os.environ.get("DREAMBOOTH_REFERENCE_SCRIPT", "")
    if need_script and not Path(script).is_file():
        missing.append(f"DREAMBOOTH_REFERENCE_SCRIPT={script!r} is not a file")
    return "; ".join(missing)


def pytest_runtest_setup(item):
    for marker, need_script in (("torchvision", False), ("reference", True)):
        if item.get_closest_marker(marker) is None:
            continue
        reason = reference_missing(need_script)
        if reason and os.environ.get("REQUIRE_REFERENCE") == "1":
            pytest.fail(f"REQUIRE_REFERENCE=1, but {reason}", pytrace=False)
        if reason:
            pytest.skip(f"{reason}; {HOW_TO_RUN_REFERENCE}")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (pytestmark = pytest.mark.usefixtures("one_thread")): the machine is shared, and
    tiny models gain nothing from more."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def subject_photos(tmp_path_factory):
    """make(dog=3, cat=2) -> a new folder with one sub-folder per subject holding its first n test photos
    (tests/data/dreambooth, as tests.tiny.PHOTOS), for the tests that train on or alter them."""
    from tests.tiny import PHOTOS

    def make(**counts: int) -> Path:
        root = tmp_path_factory.mktemp("photos")
        for subject, n in counts.items():
            photos = sorted((PHOTOS / subject).glob("*.jpg"))
            assert len(photos) >= n, f"{PHOTOS / subject} holds {len(photos)} photos; the test wants {n}"
            (root / subject).mkdir()
            for photo in photos[:n]:
                shutil.copy(photo, root / subject / photo.name)
        return root

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The tiny SD1 model as a single-file checkpoint (fp32), what a user's --model would be for the command line."""
    import torch

    from tests.tiny import tiny_bundle
    from trainer.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("models") / "tiny-sd1.safetensors"
    save_checkpoint(tiny_bundle("sd1"), path, {}, dtype=torch.float32)
    return path
