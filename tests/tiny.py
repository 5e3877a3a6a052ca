"""Tiny SD1-, SD2- and SDXL-shaped models (random weights) built from config (bench/models.py's tiny configs), for CPU tests."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.models import tiny_text_config, tiny_text_config_2, tiny_unet_config, tiny_vae_config
from trainer.bundle import ModelBundle
from trainer.models import build_bundle

# Photos from the DreamBooth dataset, downscaled to 256 px: dog/00-04, cat/00-02 (licence beside them).
PHOTOS = Path(__file__).resolve().parent / "data" / "dreambooth"


def tiny_bundle(family: str = "sd1", prediction_type: str = "epsilon", seed: int = 0,
                zero_terminal_snr: bool = False) -> ModelBundle:
    torch.manual_seed(seed)
    bundle = build_bundle(family, prediction_type, tiny_unet_config(family), tiny_vae_config(),
                          tiny_text_config(family), source_name=f"tiny-{family}.safetensors",
                          text_config_2=tiny_text_config_2() if family == "sdxl" else None,
                          zero_terminal_snr=zero_terminal_snr)
    for module in bundle.modules:
        module.eval()
    return bundle



@pytest.fixture(autouse=True, scope="module")
def one_thread(one_thread):
    """conftest.py's one_thread, autouse in modules that import it from here (as they did before conftest.py had it)."""
    yield
