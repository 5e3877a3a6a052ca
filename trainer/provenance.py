"""What a run is made from: its learning settings, base model, photos and class images.

A saved training state is resumed only by a run made from the same things (and when it is not, the log says what
differs); an existing output is replaced only by a run of the same settings and photos, unless the user says so.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace

from .dataset import image_fingerprint

# Settings that do not change what is learned; a saved state stays valid when only these differ. (Not channels_last:
# 8-bit AdamW's saved moments are flat memory in the layout of the run that made them; see trainer/speed.py.)
NOT_LEARNING = ("output", "overwrite", "checkpoint_every", "resume", "sample_every", "sample_prompts", "sample_steps",
                "save_dtype", "device", "prior_cache_dir", "compile_unet", "memory_preset")


@dataclass(frozen=True)
class Provenance:
    settings: dict
    base_model_sha256: str
    base_model: str
    photos: str  # image_fingerprint of the photos
    class_images: str  # ... of the class images ("" before they exist)

    @classmethod
    def of(cls, cfg, bundle, instance_images, class_images=None) -> "Provenance":
        settings = {k: v for k, v in json.loads(cfg.to_json()).items() if k not in NOT_LEARNING}
        return cls(settings, bundle.source_hash, bundle.source_name, image_fingerprint(instance_images),
                   "" if class_images is None else image_fingerprint(class_images))

    def with_class_images(self, class_images) -> "Provenance":
        return replace(self, class_images=image_fingerprint(class_images))

    def fingerprint(self) -> str:
        """Of everything: what a saved state must match to be resumed."""
        return _sha256(json.dumps(self.settings, sort_keys=True), self.base_model_sha256, self.base_model,
                       self.photos, self.class_images)

    def request(self) -> str:
        """Of the settings, base model and photos (the class images follow from them): what an output records, and
        what a run must match to replace it without being told to."""
        return _sha256(json.dumps(self.settings, sort_keys=True), self.base_model_sha256, self.base_model,
                       self.photos)

    def to_dict(self) -> dict:
        return asdict(self)

    def differences(self, saved: dict | None) -> list[str]:
        """What differs from a saved provenance, in words: 'learning_rate 1e-06 (now 2e-06)', 'other photos'."""
        if not saved:
            return ["a version of the pack that did not record what it was made from"]
        out = [f"{key} {saved['settings'].get(key)!r} (now {value!r})" for key, value in self.settings.items()
               if saved["settings"].get(key) != value]
        out += [f"{key} {value!r} (now not set)" for key, value in saved["settings"].items()
                if key not in self.settings]
        if (saved["base_model_sha256"], saved["base_model"]) != (self.base_model_sha256, self.base_model):
            out.append(f"base model {saved['base_model']} (now {self.base_model}, or the file changed)")
        out += [f"other {what}" for what, key in (("photos", "photos"), ("class images", "class_images"))
                if saved[key] != getattr(self, key)]
        return out


def _sha256(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()
