"""Train the toy world's evaluators (attribute classifier + identity embedding) and write evaluators.safetensors.

    python -m trainer.toy.train_evaluators --out trainer/toy/evaluators.safetensors --seed 0

Measured (seed 0, the defaults): 3 min 16 s wall on one thread of a 2-core CPU shared with another job: 17 s to
render 22,000 scenes, 118 s for the attribute classifier (1,000 steps of 128), 56 s for the identity embedding (800
steps of 192), the rest for the held-out checks. It writes a 1.1 MB file whose metadata holds the class lists, the
network sizes, this command and the held-out checks it printed. One torch thread is the default: on a busy 2-core
machine two threads ran these small convolutions about 6x slower.

Data: scenes rendered from the world with every attribute drawn uniformly (the pretraining `dataset` is mostly large
centred photos; generated images may be anything), plus ordinary stars (most of them the subject's own colour: the
hard negatives) and the subject itself with varied colour, background, pattern, position, size and style. The
subject's held-out views are never used: every scene equal to one of `subject_views("heldout")` is excluded (checked
by an assertion), so subject fidelity against them stays an honest held-out measure. Light augmentation (pixel noise,
blur, brightness) makes the evaluators tolerate the imperfect images a small diffusion model draws.

- Attribute classifier: cross-entropy summed over the heads; a sketch's colour and background are not drawn, so they
  are not trained there.
- Identity embedding: supervised-contrastive loss (Khosla et al. 2020, temperature 0.1) over batches of P identities x
  K views. An identity is "the subject" for every subject view, else the object an ordinary scene shows:
  (shape, colour, pattern) for photos, (shape, pattern) for sketches. Half of the ordinary identities in a batch are
  stars, so the subject is pushed away from its plain twins above all.

Deterministic in --seed (renders, sampling and initialisation are seeded; CPU kernels are deterministic).
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import world
from .evaluators import IMAGE_SIZE, NOT_DRAWN, Evaluators, build_networks, normalize, save_evaluators

ATTRIBUTES = ("shape", "color", "background", "pattern", "position", "size", "style")
CONFIG = {"attribute_widths": [32, 64, 128], "attribute_hidden": 64,
          "identity_widths": [16, 32, 64], "identity_hidden": 128, "embed_dim": 64}
SUBJECT_ID = 0


def class_lists() -> dict[str, list[str]]:
    return {"shape": list(world.SHAPES), "color": list(world.COLORS), "background": list(world.BACKGROUNDS),
            "pattern": list(world.PATTERNS), "position": list(world.POSITIONS), "size": list(world.SIZES),
            "style": list(world.STYLES)}


def any_scene(rng: random.Random, shape: str | None = None, color: str | None = None, subject: bool = False,
              sketch_rate: float = 0.2) -> world.Scene:
    """A scene with every attribute drawn uniformly (pattern: plain half the time); `shape`/`color` fix those."""
    shape = shape or rng.choice(world.SHAPES)
    color = color or rng.choice(list(world.COLORS))
    background = rng.choice([b for b in world.BACKGROUNDS if b != color])
    pattern = rng.choices(world.PATTERNS, weights=(2, 1, 1))[0]
    style = "sketch" if rng.random() < sketch_rate else "photo"
    return world.Scene(shape, color, background, pattern, rng.choice(world.POSITIONS), rng.choice(world.SIZES),
                       style, subject)


def identity_key(scene: world.Scene) -> tuple:
    if scene.subject:
        return ("subject",)
    return (scene.shape, scene.pattern, "sketch") if scene.style == "sketch" else (scene.shape, scene.color,
                                                                                  scene.pattern)


def training_scenes(rng: random.Random, n_ordinary: int, n_stars: int, n_subject: int) -> list[world.Scene]:
    heldout = {scene for _, scene in world.subject_views("heldout")}
    star = world.SUBJECT_SHAPE
    scenes = [any_scene(rng) for _ in range(n_ordinary)]
    # Hard negatives: ordinary stars, two thirds of them in the subject's colour.
    scenes += [any_scene(rng, star, world.SUBJECT_COLOR if i % 3 else None) for i in range(n_stars)]
    subjects = []
    while len(subjects) < n_subject:
        scene = any_scene(rng, star, world.SUBJECT_COLOR if len(subjects) % 2 else None, subject=True)
        if scene not in heldout:
            subjects.append(scene)
    scenes += subjects
    assert not heldout & set(scenes), "a held-out subject view leaked into the evaluators' training data"
    return scenes


def render_pool(scenes: list[world.Scene], rng: random.Random, classes: dict[str, list[str]]):
    images = np.stack([np.asarray(world.render(s, IMAGE_SIZE, seed=rng.getrandbits(31)), np.uint8) for s in scenes])
    labels = {}
    for name in ATTRIBUTES:
        values = [classes[name].index(getattr(s, name)) for s in scenes]
        labels[name] = torch.tensor([v if name not in NOT_DRAWN.get(s.style, ()) else -100
                                     for v, s in zip(values, scenes)])
    keys = sorted({identity_key(s) for s in scenes if not s.subject})
    index = {key: i + 1 for i, key in enumerate(keys)}
    index[("subject",)] = SUBJECT_ID
    identities = torch.tensor([index[identity_key(s)] for s in scenes])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels, identities, keys


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float 0..1 with a little blur, brightness change and pixel noise."""
    x = x.float() / 255
    b = x.shape[0]
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None]) / 16
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel.expand(3, 1, 3, 3).contiguous(), groups=3)
    blur = (torch.rand(b, 1, 1, 1, generator=g) < 0.3) * torch.rand(b, 1, 1, 1, generator=g)
    x = x + blur * (blurred - x)
    x = x * (1 + 0.08 * (torch.rand(b, 1, 1, 1, generator=g) - 0.5))
    x = x + torch.randn(x.shape, generator=g) * 0.04 * torch.rand(b, 1, 1, 1, generator=g)
    return x.clamp(0, 1)


def supcon(z: torch.Tensor, y: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised-contrastive loss (Khosla et al. 2020, L_out) on unit-norm embeddings z [B, D] with labels y [B]."""
    eye = torch.eye(len(y), dtype=torch.bool)
    logits = (z @ z.T / temperature).masked_fill(eye, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (y[:, None] == y[None]) & ~eye
    count = positive.sum(1)
    keep = count > 0
    return -(log_prob.masked_fill(~positive, 0).sum(1)[keep] / count[keep]).mean()


def train_attributes(net, images, labels, steps, batch, lr, g) -> list[float]:
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    losses = []
    net.train()
    for _ in range(steps):
        idx = torch.randint(len(images), (batch,), generator=g)
        out = net(normalize(augment(images[idx], g)))
        loss = sum(F.cross_entropy(out[name], labels[name][idx], ignore_index=-100) for name in out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def train_identity(net, images, identities, keys, steps, n_subject, n_ids, per_id, lr, g) -> list[float]:
    by_id = {}
    for i, ident in enumerate(identities.tolist()):
        by_id.setdefault(ident, []).append(i)
    by_id = {k: torch.tensor(v) for k, v in by_id.items()}
    stars = torch.tensor([i + 1 for i, key in enumerate(keys) if key[0] == world.SUBJECT_SHAPE])
    others = torch.tensor([i + 1 for i, key in enumerate(keys) if key[0] != world.SUBJECT_SHAPE])
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)

    def pick(pool: torch.Tensor, n: int) -> torch.Tensor:
        return pool[torch.randint(len(pool), (n,), generator=g)]

    losses = []
    net.train()
    for _ in range(steps):
        chosen = torch.cat([stars[torch.randperm(len(stars), generator=g)[:n_ids // 2]],
                            others[torch.randperm(len(others), generator=g)[:n_ids - n_ids // 2]]])
        idx = torch.cat([pick(by_id[SUBJECT_ID], n_subject)] + [pick(by_id[int(c)], per_id) for c in chosen])
        z = net(normalize(augment(images[idx], g)))
        loss = supcon(z, identities[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def measure(ev: Evaluators, seed: int) -> dict:
    """Held-out checks, on scenes and render seeds the training never saw."""
    rng = random.Random(f"evaluators-measure:{seed}")
    fresh = [any_scene(rng) for _ in range(1000)]
    images = [world.render(s, IMAGE_SIZE, seed=rng.getrandbits(31) | 1 << 31) for s in fresh]
    read = ev.attributes(images)
    accuracy = {name: float(np.mean([r[name] == getattr(s, name) for r, s in zip(read, fresh)
                                     if name not in NOT_DRAWN.get(s.style, ())])) for name in ATTRIBUTES}
    pretrain = world.dataset(500, seed=10_000 + seed)
    read = ev.attributes([im for im, _, _ in pretrain])
    pretrain_accuracy = {name: float(np.mean([r[name] == getattr(s, name) for r, (_, _, s) in zip(read, pretrain)
                                              if name not in NOT_DRAWN.get(s.style, ())])) for name in ATTRIBUTES}
    train = [im for im, _ in world.subject_views("train")]
    heldout_views = world.subject_views("heldout")
    heldout = [im for im, _ in heldout_views]
    twins = [world.render(world.plain_twin(s), IMAGE_SIZE, seed=k) for k, (_, s) in enumerate(heldout_views)]
    stars = [world.render(any_scene(rng, world.SUBJECT_SHAPE, sketch_rate=0), IMAGE_SIZE, seed=k) for k in range(64)]
    return {
        "attribute_accuracy_uniform_scenes": accuracy,
        "attribute_accuracy_pretraining_scenes": pretrain_accuracy,
        "subject_fidelity_heldout_vs_train_views": ev.subject_fidelity(heldout, train),
        "subject_fidelity_plain_twins_vs_train_views": ev.subject_fidelity(twins, train),
        "subject_fidelity_random_stars_vs_train_views": ev.subject_fidelity(stars, train),
        "div_random_stars": ev.div(stars),
        "div_one_scene_8_seeds": ev.div([world.render(heldout_views[0][1], IMAGE_SIZE, seed=k) for k in range(8)]),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("evaluators.safetensors"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ordinary", type=int, default=14000, help="ordinary scenes rendered")
    parser.add_argument("--stars", type=int, default=3000, help="ordinary stars rendered (hard negatives)")
    parser.add_argument("--subject", type=int, default=5000, help="subject scenes rendered")
    parser.add_argument("--attribute-steps", type=int, default=1000)
    parser.add_argument("--identity-steps", type=int, default=800)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest for these small convs on a shared CPU)")
    args = parser.parse_args(argv)

    start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(f"evaluators:{args.seed}")
    g = torch.Generator().manual_seed(args.seed)
    classes = class_lists()
    scenes = training_scenes(rng, args.ordinary, args.stars, args.subject)
    images, labels, identities, keys = render_pool(scenes, rng, classes)
    rendered = time.time()
    print(f"rendered {len(images)} scenes in {rendered - start:.0f} s", flush=True)

    config = {**CONFIG, "classes": classes}
    attribute_net, identity_net = build_networks(config)
    a_loss = train_attributes(attribute_net, images, labels, args.attribute_steps, 128, 3e-3, g)
    print(f"attribute classifier: loss {np.mean(a_loss[:20]):.3f} -> {np.mean(a_loss[-20:]):.3f} "
          f"({time.time() - rendered:.0f} s)", flush=True)
    mid = time.time()
    i_loss = train_identity(identity_net, images, identities, keys, args.identity_steps, 48, 36, 4, 3e-3, g)
    print(f"identity embedding: loss {np.mean(i_loss[:20]):.3f} -> {np.mean(i_loss[-20:]):.3f} "
          f"({time.time() - mid:.0f} s)", flush=True)

    ev = Evaluators(attribute_net, identity_net, classes)
    metrics = measure(ev, args.seed)
    seconds = round(time.time() - start, 1)
    print(json.dumps(metrics, indent=1))
    print(f"total {seconds} s", flush=True)
    extra = {"seed": args.seed, "scenes": len(scenes), "attribute_steps": args.attribute_steps,
             "identity_steps": args.identity_steps, "seconds": seconds, "threads": args.threads,
             "command": f"python -m trainer.toy.train_evaluators --out {args.out} --seed {args.seed}",
             "metrics": metrics}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_evaluators(args.out, attribute_net, identity_net, config, extra)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")
    return metrics


if __name__ == "__main__":
    main()
