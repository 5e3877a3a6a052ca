"""Silence the few library messages nobody running this pack can act on, and only those (other log lines of the same
libraries, and everything other ComfyUI packs log, pass): bitsandbytes' notice about an optional CPU kernel package
for 4-bit inference, which we never use; transformers' notice that torchvision is missing for image processors, which
we never use; diffusers' warning that a module has no float32-only parts ("should be kept in float32: []")."""
from __future__ import annotations

import logging

NOISE = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",
    "transformers.utils.import_utils": "requires torchvision (not installed)",
    "diffusers.models.modeling_utils": "that should be kept in float32: []",
}


class _DropNoise(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def install() -> None:
    """Idempotent: each logger gets its filter once."""
    for name, text in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise(text))
