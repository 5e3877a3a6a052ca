"""Fixtures shared by the test modules."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest


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
