"""Pretrain the toy base model on the toy world (trainer.toy.world) and write it as a single-file SD1 checkpoint.

    python -m trainer.toy.pretrain --out trainer/toy/base.safetensors --seed 0

The model is made of the classes Stable Diffusion 1.x is made of (AutoencoderKL, UNet2DConditionModel with
cross-attention, CLIPTextModel with the real 49,408-token CLIP tokenizer, the DDPM epsilon schedule SD1 was trained
with), only small: 32 px RGB images, 8x8x4 latents. It trains in two stages:

1. the VAE, on world images: reconstruction (MSE + L1) plus a small KL term; then its scaling_factor is set so
   latents have unit standard deviation, as SD's 0.18215 does for SD's VAE;
2. the UNet jointly with the text encoder, on (latent, caption) pairs with the standard epsilon-prediction DDPM
   loss, 10% of captions replaced by "" so classifier-free guidance works; an EMA of their weights is what ships.

The result is written with trainer.checkpoint.save_checkpoint (fp16, module configs in its metadata), so
trainer.models.load_model reads it back through the same code path as any real SD1 checkpoint.

Measured on the 2-core CPU machine this project is built on, one torch thread, the other core busy with other work:
    python -m trainer.toy.pretrain --out trainer/toy/base.safetensors --seed 0 --grid base_grid.png
    -> 35 min wall time (VAE 1,800 steps: 5 min; UNet + text encoder 4,000 steps at batch 32: 30 min), 1.6 GB peak
       memory, a 20.1 MB file. Parameters: UNet 4.2 M, VAE 0.7 M, text encoder 5.1 M (4.7 M of it the token table).
"""
from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import metadata as meta
from ..bundle import ModelBundle
from ..checkpoint import save_checkpoint
from ..models import build_bundle
from . import world

TEXT_HIDDEN = 96


def unet_config() -> dict:
    return {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [64, 128],
        "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": TEXT_HIDDEN,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    }


def vae_config() -> dict:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": [16, 32, 64],
        "layers_per_block": 1,
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "norm_num_groups": 16,
        "sample_size": 32,
        "scaling_factor": 1.0,  # set from the trained encoder's latent statistics
    }


def text_config() -> dict:
    return {
        "vocab_size": 49408,
        "hidden_size": TEXT_HIDDEN,
        "intermediate_size": 4 * TEXT_HIDDEN,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": TEXT_HIDDEN,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
    }


def _images_tensor(images) -> torch.Tensor:
    """PIL images -> float tensor [N, 3, H, W] in [-1, 1]."""
    array = np.stack([np.asarray(image, dtype=np.uint8) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def vae_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """World images made less uniform for the VAE, so that it is a general codec for small flat-colour images
    rather than for the world's eight colours only (as SD's VAE is not limited to what SD's UNet knows): half get
    their colour channels permuted, half get one to three small disks of random colours (e.g. markings)."""
    out = images.clone()
    n, _, height, width = out.shape
    permute = torch.rand(n, generator=generator) < 0.5
    for i in permute.nonzero().flatten().tolist():
        out[i] = out[i, torch.randperm(3, generator=generator)]
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    for i in (torch.rand(n, generator=generator) < 0.5).nonzero().flatten().tolist():
        for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
            cx, cy = (torch.rand(2, generator=generator) * torch.tensor([width, height])).tolist()
            radius = 1.0 + 4.0 * float(torch.rand(1, generator=generator))
            mask = ((xs - cx) ** 2 + (ys - cy) ** 2).sqrt().sub(radius).neg().add(0.5).clamp(0, 1)
            color = torch.rand(3, 1, 1, generator=generator) * 2 - 1
            out[i] = out[i] * (1 - mask) + color * mask
    return out


def _log(message: str, start: float) -> None:
    print(f"[{time.monotonic() - start:7.1f}s] {message}", flush=True)


def train_vae(bundle: ModelBundle, images: torch.Tensor, steps: int, batch: int, lr: float,
              generator: torch.Generator, start: float, deadline: float) -> None:
    vae = bundle.vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    for step in range(steps):
        rate = lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in optimizer.param_groups:
            group["lr"] = rate
        x = images[torch.randint(0, len(images), (batch,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        kl = posterior.kl().mean() / z[0].numel()
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + 1e-4 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            _log(f"vae step {step}/{steps} loss {loss.item():.4f} mse {F.mse_loss(recon, x).item():.4f} "
                 f"kl/dim {kl.item():.3f}", start)
        if time.monotonic() > deadline:
            _log(f"vae stopped at step {step}: time budget", start)
            break
    vae.eval()


@torch.no_grad()
def encode_latents(bundle: ModelBundle, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for chunk in images.split(512):
        posterior = bundle.vae.encode(chunk).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def train_unet(bundle: ModelBundle, means: torch.Tensor, stds: torch.Tensor, ids: torch.Tensor, steps: int,
               batch: int, lr: float, generator: torch.Generator, start: float, deadline: float,
               drop: float = 0.1, ema_decay: float = 0.999, min_snr_gamma: float = 5.0) -> dict:
    """Returns the EMA weights of the UNet and the text encoder (keys prefixed "unet." / "text.")."""
    unet, text = bundle.unet.train(), bundle.text_encoder.train()
    params = list(unet.parameters()) + list(text.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = bundle.noise_scheduler
    scale = bundle.vae.config.scaling_factor
    empty = bundle.tokenizer("", padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids[0]
    ema = {f"unet.{k}": v.detach().clone() for k, v in unet.state_dict().items()}
    ema.update({f"text.{k}": v.detach().clone() for k, v in text.state_dict().items()})
    live = {f"unet.{k}": v for k, v in unet.state_dict(keep_vars=True).items()}
    live.update({f"text.{k}": v for k, v in text.state_dict(keep_vars=True).items()})
    float_keys = [k for k, v in ema.items() if v.is_floating_point()]
    # Min-SNR-gamma loss weights (Hang et al. 2023) for epsilon prediction: min(SNR, gamma) / SNR. The target is
    # still the standard epsilon; the weights only stop easy low-noise steps from dominating a short training run.
    alphas = scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    weights = (snr.clamp(max=min_snr_gamma) / snr) if min_snr_gamma else torch.ones_like(snr)
    for step in range(steps):
        warm = min(1.0, (step + 1) / 200)
        rate = lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in optimizer.param_groups:
            group["lr"] = rate
        index = torch.randint(0, len(means), (batch,), generator=generator)
        latents = (means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)) * scale
        batch_ids = ids[index].clone()
        dropped = torch.rand(batch, generator=generator) < drop
        batch_ids[dropped] = empty
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
        noisy = scheduler.add_noise(latents, noise, t)
        states = text(batch_ids)[0]
        prediction = unet(noisy, t, encoder_hidden_states=states).sample
        loss = (F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3)) * weights[t]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        torch._foreach_lerp_([ema[k] for k in float_keys], [live[k].detach() for k in float_keys], 1 - decay)
        if step % 100 == 0 or step == steps - 1:
            _log(f"unet step {step}/{steps} loss {loss.item():.4f} lr {rate:.2e}", start)
        if time.monotonic() > deadline:
            _log(f"unet stopped at step {step}: time budget", start)
            break
    unet.eval(), text.eval()
    return ema


def _adopt_ema(bundle: ModelBundle, ema: dict) -> None:
    bundle.unet.load_state_dict({k[5:]: v for k, v in ema.items() if k.startswith("unet.")})
    bundle.text_encoder.load_state_dict({k[5:]: v for k, v in ema.items() if k.startswith("text.")})


def pretrain(out: Path, seed: int = 0, minutes: float = 40.0, n_images: int = 20000, vae_steps: int = 1800,
             unet_steps: int = 4000, batch: int = 32, vae_lr: float = 2e-3, unet_lr: float = 2e-3,
             grid: Path | None = None) -> ModelBundle:
    start = time.monotonic()
    deadline = start + 60 * minutes
    torch.manual_seed(seed)
    random.seed(seed)
    generator = torch.Generator().manual_seed(seed)
    bundle = build_bundle("sd1", "epsilon", unet_config(), vae_config(), text_config(),
                          source_name="toy-base.safetensors")
    counts = {name: sum(p.numel() for p in module.parameters())
              for name, module in (("unet", bundle.unet), ("vae", bundle.vae), ("text", bundle.text_encoder))}
    _log(f"parameters: {counts}", start)

    data = world.dataset(n_images, seed=seed)
    images = _images_tensor(image for image, _, _ in data)
    captions = [text for _, text, _ in data]
    ids = bundle.tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                           return_tensors="pt").input_ids
    _log(f"{n_images} world images, {len(set(captions))} distinct captions", start)

    vae_deadline = start + 60 * minutes * 0.3
    train_vae(bundle, vae_augment(images, generator), vae_steps, batch, vae_lr, generator, start, vae_deadline)
    means, stds = encode_latents(bundle, images)
    latent_std = means.std().item()
    bundle.vae.register_to_config(scaling_factor=round(1.0 / latent_std, 5))
    _log(f"latent std {latent_std:.4f} -> scaling_factor {bundle.vae.config.scaling_factor}", start)

    ema = train_unet(bundle, means, stds, ids, unet_steps, batch, unet_lr, generator, start, deadline - 60)
    _adopt_ema(bundle, ema)
    metadata = {meta.TITLE: "DreamBooth toy base (trainer.toy)",
                "dreambooth.toy_world": f"seed={seed} images={n_images} vae_steps={vae_steps} "
                                        f"unet_steps={unet_steps} batch={batch}"}
    save_checkpoint(bundle, out, metadata, dtype=torch.float16)
    _log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)", start)
    if grid is not None:
        save_grid(bundle, grid)
        _log(f"wrote {grid}", start)
    _log("done", start)
    return bundle


GRID_PROMPTS = [
    "a red star on a blue background", "a green circle on a white background", "a yellow heart on a black background",
    "a blue square on a yellow background", "a white triangle on a red background",
    "an orange star on a gray background", "a purple circle on a green background",
    "a striped red square on a white background", "a small blue circle on the left on a yellow background",
    "a sketch of a star", "a sketch of a heart", "a star",
]


def save_grid(bundle: ModelBundle, path: Path, seeds: int = 4, steps: int = 25, guidance: float = 5.0) -> None:
    from ..sampling import image_grid, sample_images
    prompts = [p for p in GRID_PROMPTS for _ in range(seeds)]
    images = sample_images(bundle, prompts, seeds=list(range(len(prompts))), width=32, height=32, steps=steps,
                           guidance=guidance, sampler="ddim", batch_size=16)
    image_grid(images, seeds * 2).resize((seeds * 2 * 96, len(images) // (seeds * 2) * 96), 0).save(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("base.safetensors"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=40.0,
                        help="wall-time cap: a stage that runs past it stops early (the default run takes less)")
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--vae-steps", type=int, default=1800)
    parser.add_argument("--unet-steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--grid", type=Path, default=None, help="also save a sample grid PNG here")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 by default: on a shared 2-core machine, 2 OpenMP threads competing with "
                             "another process run up to 80x slower")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pretrain(args.out, seed=args.seed, minutes=args.minutes, n_images=args.images, vae_steps=args.vae_steps,
             unet_steps=args.unet_steps, batch=args.batch, grid=args.grid)


if __name__ == "__main__":
    main()
