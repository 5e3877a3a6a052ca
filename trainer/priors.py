"""Class-prior images for prior preservation: "a [class noun]" from the frozen base model, cached on disk.

Layout: cache_root/<key>/00000.png, 00001.png, ... plus manifest.json. The key covers the model and every
setting that changes the pixels, and image i always uses seed + i, so a repeat call generates nothing and a
larger count only generates the missing images. Each file is written to a temp name and renamed into place:
a crash loses at most the image being written and never leaves a half-written PNG under a real name.
One process fills a given cache folder at a time (leftover temp files are deleted on entry).
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from .atomic import replacing
from .bundle import ModelBundle
from .device import inference_dtype
from .phases import CLASS_IMAGES, OutOfMemory, Phase
from .sampling import sample_images, vae_dtype, validate_settings

CACHE_FORMAT = 1  # bump when a change to sampling alters the pixels of existing caches
KEY_LENGTH = 16
MANIFEST = "manifest.json"
TEMP_SUFFIX = ".tmp"


def default_cache_root() -> Path:
    """Where the command line caches class images unless told otherwise, shared by `priors` and `train`:
    $XDG_CACHE_HOME/dreambooth-studio/class-images, or ~/.cache/... when XDG_CACHE_HOME is not set."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dreambooth-studio" / "class-images"


def model_fingerprint(bundle: ModelBundle) -> str:
    """bundle.source_hash when known, else a sha256 over the UNet, text-encoder(s) and VAE weights.

    Pass the base model: a bundle that has been trained since loading still carries its base file's hash.
    """
    if bundle.source_hash:
        return bundle.source_hash
    digest = hashlib.sha256()
    modules = [("unet", bundle.unet), ("text_encoder", bundle.text_encoder), ("vae", bundle.vae)]
    if bundle.text_encoder_2 is not None:  # (after the others: SD1/SD2 fingerprints stay as they were)
        modules.append(("text_encoder_2", bundle.text_encoder_2))
    for prefix, module in modules:
        for name, tensor in module.state_dict().items():
            digest.update(f"{prefix}.{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            # A byte view hashes any dtype (bf16 included) exactly, without a float round trip.
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def prior_settings(bundle: ModelBundle, class_prompt: str, *, width: int, height: int, steps: int,
                   guidance: float, sampler: str, negative_prompt: str, seed: int) -> dict:
    """Everything that decides the pixels of a prior image, normalised so equal settings hash equally."""
    return {
        "format": CACHE_FORMAT,
        "model": model_fingerprint(bundle),
        "prediction_type": bundle.prediction_type,
        "prompt": class_prompt.strip(),
        "negative_prompt": negative_prompt.strip(),
        "width": int(width),
        "height": int(height),
        "steps": int(steps),
        "guidance": float(guidance),
        "sampler": sampler,
        "seed": int(seed),
    }


def cache_key(settings: dict) -> str:
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:KEY_LENGTH]


def _image_path(folder: Path, index: int) -> Path:
    return folder / f"{index:05d}.png"


def _is_valid_image(path: Path, size: tuple[int, int]) -> bool:
    """A complete, decodable PNG of the expected size (anything else is regenerated)."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.format == "PNG" and image.size == size
    except (OSError, SyntaxError, ValueError):  # missing, truncated or not an image
        return False


def _write_atomic(path: Path, write: Callable) -> None:
    """write(file) into a temp file beside path, then rename it over path in one step."""
    with replacing(path, TEMP_SUFFIX) as temp, open(temp, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())


def _write_manifest(folder: Path, key: str, settings: dict, count: int) -> None:
    manifest = {"key": key, "count": count, "settings": settings}
    _write_atomic(folder / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=2).encode()))


def _manifest_count(folder: Path) -> int:
    try:
        return int(json.loads((folder / MANIFEST).read_text())["count"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _count_on_disk(valid: list[bool], known: int) -> int:
    """How many images from index 0 on are present without a gap; those beyond len(valid) as last recorded."""
    return valid.index(False) if False in valid else max(known, len(valid))


def ensure_class_priors(
    bundle: ModelBundle,
    class_prompt: str,
    *,
    count: int,
    cache_root: str | Path,
    width: int = 512,
    height: int = 512,
    steps: int = 30,
    guidance: float = 7.5,
    sampler: str = "euler_a",
    negative_prompt: str = "",
    seed: int = 0,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    share: tuple[int, int] = (0, 1),
) -> list[Path]:
    """Paths of `count` cached prior images for class_prompt, generating only those not on disk yet.

    on_progress(done, count) is called once with what the cache already held, then after each new image.
    batch_size and device only change speed, so they are not part of the cache key.
    share=(k, n): one of n processes filling the cache together (data parallel), which draws the missing ones of
    images k, k + n, ... (each image's seed is its own, so who draws it changes nothing). Only process 0 writes the cache's
    manifest, none removes leftover temp files (another may be writing them): call again with the default share
    once all are done. Progress then counts this process's images as if the others kept pace.
    """
    if not class_prompt.strip():
        raise ValueError('The class prompt is empty; give the class noun the priors show, e.g. "a dog".')
    if count < 1:
        raise ValueError(f"count must be at least 1 prior image, got {count}.")
    validate_settings(bundle, width=width, height=height, steps=steps, sampler=sampler)

    settings = prior_settings(bundle, class_prompt, width=width, height=height, steps=steps, guidance=guidance,
                              sampler=sampler, negative_prompt=negative_prompt, seed=seed)
    key = cache_key(settings)
    folder = Path(cache_root) / key
    folder.mkdir(parents=True, exist_ok=True)
    rank, processes = share
    if processes == 1:
        for leftover in folder.glob(f"*{TEMP_SUFFIX}"):  # from a run that crashed mid-write
            leftover.unlink(missing_ok=True)

    paths = [_image_path(folder, i) for i in range(count)]
    valid = [_is_valid_image(path, (width, height)) for path in paths]
    missing_here = [i for i, ok in enumerate(valid) if not ok]
    missing = [i for i in missing_here if i % processes == rank]  # by index: the same split whenever each looks
    known = _manifest_count(folder)  # earlier, larger runs may hold more than `count`

    def note_count() -> None:
        if rank == 0:
            _write_manifest(folder, key, settings, _count_on_disk(valid, known))

    note_count()
    if on_progress is not None:
        on_progress(count - len(missing_here), count)
    if not missing:
        return paths

    def write(i: int, image: Image.Image) -> None:
        _write_atomic(paths[i], lambda f: image.save(f, format="PNG"))
        valid[i] = True
        note_count()

    # PNGs are compressed and written by a thread of their own (one, so files and manifest go in order) while the GPU
    # draws the next batch. Progress counts the images drawn; a failed write (full disk) stops generation at the
    # next image, and every image drawn before a stop or an error is still written.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="class-images") as writer:
        writes: list[Future] = []

        def save(index: int, image: Image.Image) -> None:
            writes.append(writer.submit(write, missing[index], image))
            for done in [future for future in writes if future.done()]:
                done.result()
            if on_progress is not None:
                on_progress(count - len(missing_here) + min((index + 1) * processes, len(missing_here)), count)

        sample_images(bundle, [settings["prompt"]] * len(missing), seeds=[seed + i for i in missing],
                      negative_prompt=settings["negative_prompt"], steps=steps, guidance=guidance, width=width,
                      height=height, sampler=sampler, batch_size=batch_size, device=device, on_image=save)
        for future in writes:
            future.result()
    return paths


def make_class_priors(bundle: ModelBundle, class_prompt: str, *, count: int, cache_root: str | Path,
                      device: torch.device, batch_size: int = 4, log: Callable[[str], None] | None = None,
                      **settings) -> list[Path]:
    """ensure_class_priors as a phase of a run: the frozen model on `device` in half precision where the GPU has it
    (SDXL's VAE in fp32: see trainer/sampling.py), given back afterwards. When a batch does not fit, the images made
    so far stay cached and the rest is made with half the batch, down to one image at a time; then the phase's
    out-of-memory error says what to change."""
    device = torch.device(device)
    while True:
        advice = (f"Lower the resolution (now {settings.get('width', 512)} px), or give ready-made class images "
                  f"(class_dir, or the class_images input). The class images made so far are kept in {cache_root}; "
                  "run again to continue.")
        try:
            with Phase(CLASS_IMAGES, device, log=log, advice=advice) as phase:
                half = inference_dtype(device)
                phase.borrow(bundle.unet, *bundle.text_encoders, dtype=half)
                phase.borrow(bundle.vae, dtype=vae_dtype(bundle, half))
                return ensure_class_priors(bundle, class_prompt, count=count, cache_root=cache_root,
                                           batch_size=batch_size, device=device, **settings)
        except OutOfMemory:
            if batch_size == 1:
                raise
            batch_size //= 2
            if log is not None:
                log(f"Class images: out of GPU memory, going on {batch_size} at a time")


def load_prior_images(paths: list[Path]) -> list[Image.Image]:
    """The images at paths as RGB, fully read so no file handles stay open."""
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images
