"""train(cfg): the DreamBooth fine-tune, read top to bottom.

images -> cached VAE posteriors (+ cached text embeddings when the text encoder is frozen) -> steps of the
prior-preservation loss -> single-file checkpoint. A resumable state is saved every `checkpoint_every` steps and
when the caller cancels; running the same config again continues from it and ends with the same weights.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import conditioning
from . import metadata as meta
from . import speed
from . import state as state_io
from .bundle import ModelBundle
from .callbacks import Callbacks, StepInfo, TrainingCancelled
from .checkpoint import save_checkpoint
from .config import ConfigError, TrainConfig
from .dataset import SubjectImage, load_image_folder, size_conditioning, to_training_tensor
from .evaluation import BestStep, Evaluation, StepScores
from .device import inference_dtype, resolve_device, training_precision, with_memory_preset
from .fused import FusedBackward, PerTensorOptimizer
from . import distributed
from .locking import exclusive
from .loss import dreambooth_loss, prediction_target
from .models import load_model
from .optim import make_lr_scheduler, make_optimizer
from .output import check_output, check_writable, save_dtype
from .phases import ENCODING, PREVIEWS, SAVING, TRAINING, OutOfMemory, Phase
from .priors import default_cache_root, ensure_class_priors, load_prior_images, make_class_priors
from .provenance import Provenance
from .randomness import StepRandomness
from . import sharding
from .sampling import native_size, sample_images, size_multiple, vae_dtype
from .tokens import identifier_warnings



@dataclass
class TrainResult:
    output: str
    steps: int
    losses: list[float] = field(default_factory=list)
    samples: list = field(default_factory=list)  # PIL previews of cfg.sample_prompts at the end
    resumed_from: int = 0
    evaluations: list[StepScores] = field(default_factory=list)  # with evaluate_every, step 0 included
    saved_step: int = 0  # the step whose weights are in the output: the best evaluated one, else the last


def train(cfg: TrainConfig, bundle: ModelBundle | None = None, callbacks: Callbacks | None = None,
          randomness=None, instance_images: list[SubjectImage] | None = None,
          class_images: list[SubjectImage] | None = None, evaluation: Evaluation | None = None) -> TrainResult:
    """Fine-tune `bundle` (loaded from cfg.base_model when None) in place and write cfg.output.

    Photos come from cfg.instance_dir unless given as `instance_images`; class images from `class_images`, else
    cfg.class_dir, else the prior cache (generated on demand). With cfg.evaluate_every, `evaluation` scores the model
    (trainer/evaluation.py) and the output holds the best evaluated step."""
    callbacks = callbacks or Callbacks()
    processes = distributed.join()
    device = processes.device(resolve_device(cfg.device))
    cfg.validate()
    if processes.parallel and not processes.main:
        callbacks = _OnlyStop(callbacks)  # one log, from rank 0
    if instance_images is None and not cfg.instance_dir:
        raise ConfigError("instance_dir is not set: give the folder with 3-5 photos of your subject")
    if cfg.evaluate_every and evaluation is None:
        raise ConfigError("evaluate_every: needs embedding models to score the samples with; see the README "
                          "(Measure Subject Fidelity) for where to put them, or set evaluate_every to 0")
    if cfg.compile_unet:
        speed.check_compile_toolchain(device)  # before any waiting: loading, class images, encoding
    check_writable(Path(cfg.output).resolve().parent)  # (before the lock file is made there)
    # ComfyUI runs nodes under inference_mode; training needs autograd and ordinary tensors.
    lock = exclusive(cfg.output) if processes.main else contextlib.nullcontext()
    with torch.inference_mode(False), torch.enable_grad(), lock:
        if bundle is None:
            callbacks.log(f"Loading {cfg.base_model}")
            zero_snr = {"": None, "default": False, "zero_terminal_snr": True}[cfg.noise_schedule]
            bundle = load_model(cfg.base_model, cfg.prediction_type or None, zero_terminal_snr=zero_snr)
        cfg = with_memory_preset(for_model(cfg, bundle), device, callbacks.log, bundle.spec).validate()
        if processes.parallel:
            processes = dataclasses.replace(processes, sharded=sharding.asked(cfg.shard))
            if processes.sharded and cfg.optimizer == "adafactor" and cfg.memory_preset != "custom":
                cfg = dataclasses.replace(cfg, optimizer="adamw8bit")
                callbacks.log(f"Sharded: optimizer adamw8bit instead of the memory preset {cfg.memory_preset!r}'s "
                              "adafactor, whose statistics span whole rows of weights that the processes hold in "
                              "pieces (8-bit AdamW's state is divided by the number of processes instead)")
            _check_data_parallel(cfg, processes.sharded)  # (after the memory preset, which may turn levers on)
            callbacks.log(f"Data parallel: {processes.size} processes x batch {cfg.batch_size} = a global batch of "
                          f"{processes.size * cfg.batch_size}; gradients averaged; learning rate {cfg.learning_rate:g} "
                          "as given (not scaled by the number of processes)")
            if processes.sharded:
                callbacks.log(f"Sharded (FSDP): each process holds 1/{processes.size} of the trained weights, their "
                              "gradients and the optimizer's state")
        return _train(cfg, bundle, callbacks, randomness or StepRandomness(cfg.seed), device,
                      training_precision(cfg, device), instance_images, class_images,
                      evaluation if cfg.evaluate_every else None, processes)


def for_model(cfg: TrainConfig, bundle: ModelBundle) -> TrainConfig:
    """`cfg` with what it leaves to the model: resolution 0 is the size the model was made for (512 px for SD 1.5,
    768 for SD 2.1-768, 1024 for SDXL), the size class images and samples are drawn at too."""
    return cfg if cfg.resolution else dataclasses.replace(cfg, resolution=native_size(bundle))


def _train(cfg, bundle, callbacks, randomness, device, precision, instance_images, class_images,
           evaluation, processes=distributed.SINGLE) -> TrainResult:
    multiple = size_multiple(bundle)
    if cfg.resolution % multiple:
        nearest = max(1, round(cfg.resolution / multiple)) * multiple
        raise ConfigError(f"resolution: {cfg.resolution} must be a multiple of {multiple} for this model "
                          f"(e.g. {nearest})")
    if instance_images is None:
        instance_images = load_image_folder(cfg.instance_dir)
    elif not 1 <= len(instance_images) <= 100:
        raise ConfigError(f"instance images: got {len(instance_images)}; DreamBooth needs 3-5 photos of one subject "
                          "(1 to 100 are accepted)")
    provenance = Provenance.of(cfg, bundle, instance_images)
    check_output(cfg, bundle, provenance.request(), callbacks.log)
    for warning in _warnings(cfg, bundle, instance_images):
        callbacks.log(f"Warning: {warning}")
    if not cfg.with_prior_preservation:
        class_images = []
    elif class_images is None:
        class_images = _class_images(cfg, bundle, callbacks, device, processes)
    # The frozen VAE and text encoders encode in the training step's precision, as the reference script does; SDXL's
    # VAE in fp32, as it overflows in fp16 (its config's force_upcast).
    with Phase(ENCODING, device, log=callbacks.log, advice="Lower the resolution.") as phase:
        latents = LatentCache.build(bundle, instance_images, class_images, cfg.resolution, phase,
                                    vae_dtype(bundle, precision or torch.float32))
        text = TextConditioning(bundle, cfg, phase, precision or torch.float32)

    state_dir = state_io.state_dir_for(cfg.output)
    provenance = provenance.with_class_images(class_images)
    modules = {"unet": bundle.unet}
    if cfg.train_text_encoder:
        modules.update(zip(("text_encoder", "text_encoder_2"), bundle.text_encoders))
    with Phase(TRAINING, device, log=callbacks.log, advice=lambda: _training_advice(cfg, state_dir)) as phase:
        result, position = _fine_tune(cfg, bundle, modules, callbacks, randomness, phase, precision, latents, text,
                                      state_dir, provenance, evaluation, processes)
    del latents, text  # the last of the run on the GPU: saving needs none of it
    if not processes.main:
        return result  # rank 0 draws the previews and writes the output
    # The final previews after the training phase: the optimizer's state is gone and the modules are off the GPU, so
    # they draw with more room than previews during training (an SDXL run on a 12 GB card needs it).
    result.samples = _previews(bundle, cfg, callbacks, device, precision)
    if result.samples:
        callbacks.on_samples(result.steps, result.samples)
    with Phase(SAVING, device, log=callbacks.log, host_only=True):
        best_file = best_file_for(cfg.output)
        if result.saved_step != result.steps:  # an earlier evaluated step was better: its file is the output
            best_file.replace(cfg.output)
            callbacks.log(f"Saved the weights of step {result.saved_step}, the best evaluated step")
        else:
            try:
                _save_output(cfg, bundle, result.steps, provenance, result.evaluations)
            except OSError:
                with contextlib.suppress(OSError):  # keep the finished run if there is room: a rerun then only saves
                    state_io.save_finished_state(state_dir, fingerprint=provenance.fingerprint(), position=position,
                                                 modules=modules, losses=result.losses, made_from=provenance.to_dict(),
                                                 evaluations=[asdict(s) for s in result.evaluations])
                raise
            best_file.unlink(missing_ok=True)
    shutil.rmtree(state_dir, ignore_errors=True)  # the run is complete; the state is gigabytes nobody needs now
    return result


def best_file_for(output: str) -> Path:
    """Where the best evaluated step so far is kept while training: a complete checkpoint, usable if the run dies."""
    path = Path(output)
    return path.with_name(path.stem + ".best-so-far.safetensors")


def _fine_tune(cfg, bundle, modules, callbacks, randomness, phase, precision, latents, text, state_dir,
               provenance: Provenance, evaluation: Evaluation | None,
               processes=distributed.SINGLE) -> tuple[TrainResult, state_io.Position]:
    """The steps, with the trained modules and the optimizer on the device; both leave it when this returns."""
    device = phase.device
    _prepare_for_training(bundle, cfg, modules, phase, callbacks)
    shards = None
    if processes.sharded:
        shards = sharding.Shards(modules, processes)
        for module in modules.values():
            phase.forget(module)  # FSDP holds it now; the run ends in this process, not back on the CPU
    unet = bundle.unet  # the step's forward; with compile_unet a compiled wrapper, and bundle.unet stays plain
    if cfg.compile_unet:
        unet = speed.compile_for_training(bundle, latents, text, cfg, device, lambda: _autocast(device, precision),
                                          callbacks)
    # Sharded: the optimizer steps this process's shards, and clipping (over all shards) is done before it.
    params = shards.local if shards else [p for m in modules.values() for p in m.parameters()]
    max_grad_norm = 0.0 if shards else cfg.max_grad_norm
    optimizer = make_optimizer(dataclasses.replace(cfg, max_grad_norm=max_grad_norm), params, device,
                               shards.windows if shards else None)
    lr_scheduler = make_lr_scheduler(cfg, optimizer)
    scaler = torch.amp.GradScaler(device.type) if precision == torch.float16 else None
    # fused_backward, sharded: backward() steps each shard as FSDP hands over its gradient
    in_backward = functools.partial(shards.stepping_in_backward, optimizer, cfg.max_grad_norm) if shards else None

    position, losses, evaluated = _resume(cfg, state_dir, provenance, modules, optimizer, lr_scheduler, randomness,
                                          scaler, callbacks, processes, shards)
    if cfg.channels_last:
        speed.match_state_layout(optimizer)
    resumed_from = position.step
    best = BestStep.from_list(cfg.max_pres_rise, evaluated)

    def save_state():
        # Data parallel: every process holds the same weights, optimizer state and stream; rank 0 writes them.
        # Sharded: the weights are gathered for rank 0, and each process stages its own optimizer state first.
        weights = shards.stage_state(state_dir, optimizer) if shards else None
        if processes.main:
            state_io.save_state(state_dir, fingerprint=provenance.fingerprint(), position=position, modules=modules,
                                optimizer=optimizer, lr_scheduler=lr_scheduler, randomness=randomness,
                                scaler=scaler, losses=losses, made_from=provenance.to_dict(),
                                evaluations=best.to_list(), processes=processes.size, weights=weights,
                                staged=shards is not None)
        processes.barrier()

    def evaluate() -> bool:
        """Score this step; keep its weights if it is the best so far. True: fidelity stopped rising, stop here."""
        scores = evaluation.score(position.step, lambda prompts, seeds: _draw(
            bundle, cfg, device, precision, prompts, seeds, sampler=evaluation.sampler, guidance=evaluation.guidance,
            steps=evaluation.steps))
        if best.add(scores) and position.step < cfg.max_train_steps:
            save_checkpoint(bundle, best_file_for(cfg.output),
                            _output_metadata(cfg, bundle, position.step, provenance, best.history),
                            dtype=save_dtype(cfg.save_dtype))
        callbacks.on_evaluation(scores, best)
        return best.stalled(cfg.early_stop_patience)

    if evaluation is not None and not best.history:
        evaluate()  # step 0: the base model's scores, PRES's baseline

    started = time.monotonic()
    while position.step < cfg.max_train_steps:
        if processes.any(callbacks.should_stop()):
            save_state()
            raise TrainingCancelled(position.step, str(state_dir))
        if position.epoch_pos >= len(position.epoch_order):
            position.epoch_order, position.epoch_pos = randomness.epoch_order(latents.num_items), 0
        items = position.epoch_order[position.epoch_pos:position.epoch_pos + cfg.batch_size * processes.size]
        position.epoch_pos += len(items)

        # Every process draws the whole global batch, so the stream stays one; each trains on its own share.
        model_input = latents.sample(items, randomness) * bundle.vae.config.scaling_factor
        noise = randomness.noise(model_input.shape)
        timesteps = randomness.timesteps(model_input.shape[0], bundle.noise_scheduler.config.num_train_timesteps)
        global_n, share = len(items), processes.share(items, cfg.batch_size)
        local_n = share.stop - share.start
        if processes.parallel:
            if not local_n:  # an epoch's last batch left this process nothing: a row at weight 0 keeps it in step
                share = slice(0, 1)
            rows = _share_rows(global_n, share, latents.with_prior)
            model_input, noise, timesteps, items = model_input[rows], noise[rows], timesteps[rows], items[share]
        noise, timesteps = noise.to(device), timesteps.to(device)
        noisy = bundle.noise_scheduler.add_noise(model_input, noise, timesteps)
        if cfg.channels_last:
            noisy = speed.channels_last_input(noisy)
        with speed.compile_help(cfg.compile_unet):
            with _autocast(device, precision, cache_casts=False):
                cond = text.states(len(items), latents.with_prior)
                time_ids = latents.time_ids(items) if bundle.spec.is_xl else None  # (no per-step indexing for SD)
                pred = unet(noisy, timesteps, **cond.unet_kwargs(time_ids)).sample
            target = prediction_target(bundle.noise_scheduler, model_input, noise, timesteps)
            loss, instance_loss, prior_loss = dreambooth_loss(pred, target, len(items), cfg.prior_loss_weight)
            backward_loss, sync = loss, lambda: processes.average_gradients(params, local_n, global_n)
            if shards:  # FSDP averages the gradients itself; the weight makes that the global batch's
                backward_loss = loss * shards.loss_weight(local_n, global_n)
                sync = lambda: shards.take_gradients(cfg.max_grad_norm)  # noqa: E731
            _optimizer_step(backward_loss, params, optimizer, lr_scheduler, scaler, max_grad_norm, sync=sync,
                            in_backward=in_backward)

        position.step += 1
        loss_value, instance_value, prior_value = processes.totals(  # the global batch's, as one process sees it
            *(value * local_n / global_n for value in to_host(loss, instance_loss, prior_loss)))
        losses.append(loss_value)
        if not math.isfinite(loss_value):
            raise FloatingPointError(
                f"The loss became {loss_value} at step {position.step}: training diverged. Lower learning_rate, use "
                "mixed_precision 'bf16' or 'no' instead of 'fp16', and check the base model loads and samples well.")
        elapsed = time.monotonic() - started
        done_here = position.step - resumed_from
        callbacks.on_step(StepInfo(
            step=position.step, total=cfg.max_train_steps, loss=loss_value, instance_loss=instance_value,
            prior_loss=prior_value, lr=lr_scheduler.get_last_lr()[0], elapsed_s=elapsed,
            eta_s=elapsed / done_here * (cfg.max_train_steps - position.step)))
        if evaluation is not None and (position.step % cfg.evaluate_every == 0
                                       or position.step == cfg.max_train_steps):
            if evaluate():
                callbacks.log(f"Stopping early at step {position.step}: subject fidelity has not improved for "
                              f"{cfg.early_stop_patience} evaluations since step {best.best.step}")
                break  # (no state to save: the run ends here)
        if cfg.checkpoint_every and position.step % cfg.checkpoint_every == 0 and position.step < cfg.max_train_steps:
            save_state()
        if cfg.sample_every and position.step % cfg.sample_every == 0 and position.step < cfg.max_train_steps \
                and (processes.main or shards):  # sharded: every process runs the UNet's blocks together
            callbacks.on_samples(position.step, _previews(bundle, cfg, callbacks, device, precision))

    if cfg.channels_last:
        speed.to_contiguous(bundle.unet)  # the caller gets the UNet laid out as it gave it
    if shards:
        modules.update(shards.unshard(bundle))  # rank 0: plain modules with the full weights, for previews and saving
    saved_step = best.best.step if best.best is not None else position.step
    if evaluation is not None and best.best is None:
        callbacks.log(f"Warning: every evaluated step let 'a {cfg.class_noun}' drift past the PRES limit "
                      f"({best.pres_limit:.3f}); the last step is saved. Keep prior preservation on, or lower the "
                      "learning rate or steps.")
    return TrainResult(cfg.output, position.step, losses, [], resumed_from, list(best.history), saved_step), position


def to_host(*values: torch.Tensor) -> list[float]:
    """The values as Python floats in one transfer: the step's one wait for the GPU."""
    return torch.stack([value.detach() for value in values]).tolist()


def _autocast(device: torch.device, precision: torch.dtype | None, cache_casts: bool = True):
    """cache_casts=False for the training step. autocast's cache keeps the low-precision copy of every trained weight
    until the forward pass ends (1.6 GiB for SD 1.5's UNet in bf16), beside the fp32 weights, although each weight
    is used once; without it each copy goes when its op is done, unless autograd saves it for the backward pass
    (with gradient checkpointing it seldom does). The numbers are the same either way."""
    if not precision:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=precision, cache_enabled=cache_casts)


class LatentCache:
    """VAE posteriors (mean, std) of every training image, computed once; the VAE then leaves the GPU. Also each
    image's SDXL time ids (original size, crop, target size), which SDXL's UNet is conditioned on."""

    def __init__(self, instance: tuple, prior: tuple | None):
        self.instance_mean, self.instance_std, self.instance_time_ids = instance
        self.prior_mean, self.prior_std, self.prior_time_ids = prior if prior else (None, None, None)

    @property
    def with_prior(self) -> bool:
        return self.prior_mean is not None

    @property
    def num_items(self) -> int:
        # As in the reference implementation: one pass pairs every class image with an instance image.
        n = len(self.instance_mean)
        return max(n, len(self.prior_mean)) if self.with_prior else n

    @classmethod
    @torch.no_grad()
    def build(cls, bundle, instance_images, class_images, resolution, phase: Phase, dtype) -> "LatentCache":
        phase.borrow(bundle.vae, dtype=dtype)  # given back when the phase ends
        training = bundle.vae.training
        bundle.vae.eval()
        instance = _encode(bundle.vae, instance_images, resolution, phase.device, dtype)
        prior = _encode(bundle.vae, class_images, resolution, phase.device, dtype) if class_images else None
        bundle.vae.train(training)
        return cls(instance, prior)

    def _rows(self, items: list[int]) -> tuple[list[int], list[int] | None]:
        """Rows of a batch: the instance examples, then their paired class examples."""
        instance = [i % len(self.instance_mean) for i in items]
        return instance, [i % len(self.prior_mean) for i in items] if self.with_prior else None

    def sample(self, items: list[int], randomness) -> torch.Tensor:
        """Posterior samples for a batch: the instance examples, then their paired class examples."""
        idx, pidx = self._rows(items)
        mean, std = self.instance_mean[idx], self.instance_std[idx]
        if pidx is not None:
            mean, std = torch.cat([mean, self.prior_mean[pidx]]), torch.cat([std, self.prior_std[pidx]])
        return mean + std * randomness.latent_noise(mean.shape).to(mean.device)

    def time_ids(self, items: list[int]) -> torch.Tensor:
        """The batch's SDXL time ids, rows in the order of sample()."""
        idx, pidx = self._rows(items)
        rows = self.instance_time_ids[idx]
        return torch.cat([rows, self.prior_time_ids[pidx]]) if pidx is not None else rows


def _encode(vae, images, resolution, device, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    means, stds, time_ids = [], [], []
    for subject_image in images:
        pixels = to_training_tensor(subject_image.image, resolution)[None].to(device, dtype)
        posterior = vae.encode(pixels).latent_dist
        means.append(posterior.mean.float())
        stds.append(posterior.std.float())
        time_ids.append(conditioning.time_ids(*size_conditioning(subject_image.image, resolution)))
    return torch.cat(means), torch.cat(stds), torch.stack(time_ids).to(device)


class TextConditioning:
    """The conditioning of the instance and class prompts (trainer/conditioning.py): cached when the text encoders
    are frozen, computed each step when they are trained."""

    def __init__(self, bundle, cfg, phase: Phase, frozen_dtype):
        self.bundle = bundle
        self.trained = cfg.train_text_encoder
        self.ids = [ids.to(phase.device) for ids in conditioning.tokenize(bundle, [cfg.instance_prompt,
                                                                                     cfg.class_prompt])]
        if not self.trained:
            phase.borrow(*bundle.text_encoders, dtype=frozen_dtype)  # given back when the phase ends
            flags = [(encoder, encoder.training) for encoder in bundle.text_encoders]
            with torch.no_grad():
                self.cached = conditioning.encode(bundle, self.ids)
            for encoder, training in flags:
                encoder.train(training)

    def states(self, n: int, with_prior: bool) -> conditioning.Conditioning:
        rows = [0] * n + ([1] * n if with_prior else [])
        if self.trained:
            return conditioning.encode(self.bundle, [ids[rows] for ids in self.ids])
        return self.cached.rows(rows)


def _class_images(cfg, bundle, callbacks, device, processes=distributed.SINGLE):
    if cfg.class_dir:
        return load_image_folder(cfg.class_dir, max_images=100_000)[:cfg.num_class_images]
    cache_root = cfg.prior_cache_dir or str(default_cache_root())
    drawn_by = f", drawn by {processes.size} processes" if processes.parallel else ""
    callbacks.log(f"Class images: {cfg.num_class_images} of {cfg.class_prompt!r} (cached in {cache_root}{drawn_by})")

    settings = dict(count=cfg.num_class_images, cache_root=cache_root, width=cfg.resolution, height=cfg.resolution,
                    steps=cfg.prior_steps, guidance=cfg.prior_guidance, seed=cfg.seed)
    paths = make_class_priors(  # data parallel: each process draws its share of the missing ones
        bundle, cfg.class_prompt, device=device, log=callbacks.log, share=(processes.rank, processes.size),
        on_progress=lambda done, total: _prior_progress(callbacks, done, total, cache_root), **settings)
    if processes.parallel:
        processes.barrier()
        if processes.main:  # all there now: this draws nothing, it records them in the cache's manifest
            ensure_class_priors(bundle, cfg.class_prompt, **settings)
    # Our own images, already at the training size: no photo checks (they refuse sizes below 64 px).
    return [SubjectImage(path.name, image) for path, image in zip(paths, load_prior_images(paths))]


def _prior_progress(callbacks, done: int, total: int, cache_root: str) -> None:
    callbacks.on_progress("Class images", done, total)
    if done < total and callbacks.should_stop():
        raise TrainingCancelled(0, cache_root)  # the images made so far stay in the cache


def _prepare_for_training(bundle, cfg, modules, phase: Phase, callbacks) -> None:
    _set_attention(bundle.unet, cfg.attention, callbacks)
    for module in modules.values():
        phase.place(module, torch.bfloat16 if cfg.bf16_weights else torch.float32).train()
        module.requires_grad_(True)
    bundle.vae.requires_grad_(False)
    if not cfg.train_text_encoder:
        for encoder in bundle.text_encoders:
            encoder.requires_grad_(False)
    if cfg.gradient_checkpointing:
        bundle.unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            for encoder in bundle.text_encoders:
                encoder.gradient_checkpointing_enable()
    if cfg.channels_last:
        speed.to_channels_last(bundle.unet)


def _set_attention(unet, choice: str, callbacks) -> None:
    """PyTorch SDPA (memory-efficient / flash kernels) by default; xformers only when asked and it truly runs."""
    from diffusers.models.attention_processor import AttnProcessor2_0
    if choice == "xformers":
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as error:  # missing, or built for another torch/CUDA
            raise ConfigError(f"attention: xformers does not load here ({error}); choose 'sdpa', which is as "
                              "memory-efficient on PyTorch 2") from error
        callbacks.log("Attention: xformers")
        return
    unet.set_attn_processor(AttnProcessor2_0())


def _optimizer_step(loss, params, optimizer, lr_scheduler, scaler, max_grad_norm, sync=lambda: None,
                    in_backward=None) -> None:
    """One step; `sync` runs between the backward pass and the update (data parallel: average the gradients).
    fused_backward: `in_backward` makes the context in which backward() steps (sharded: Shards'), by default the
    optimizer's own."""
    if isinstance(optimizer, FusedBackward):
        # backward() itself clips (per tensor), steps and frees each gradient: see trainer/fused.py. The hooks
        # are on for this backward only, so the model never keeps them (sampling, the caller, errors).
        with (in_backward or optimizer.stepping_in_backward)():
            loss.backward()
        optimizer.step()  # a no-op, for the LR scheduler's order check
        lr_scheduler.step()
        return
    if isinstance(optimizer, PerTensorOptimizer):  # bf16_weights: step() clips over all gradients, in fp32
        loss.backward()
        sync()
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return
    if scaler is not None:
        scaler.scale(loss).backward()
        sync()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
        sync()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def _training_advice(cfg, state_dir: Path) -> str:
    if cfg.memory_preset in ("6 GB", "8 GB"):
        advice = "This is already the leanest memory preset: lower the resolution or batch size"
    else:
        advice = ("Choose memory_preset '8 GB' (about 4 GiB for SD 1.5's UNet at 512 px), or with 'custom' turn "
                  "on gradient_checkpointing, fused_backward, optimizer 'adamw8bit' and, on RTX 30xx and newer, "
                  "bf16_weights")
    meta = state_io.read_state_meta(state_dir)
    kept = (f"The state saved at step {meta['step']} is kept in {state_dir}: run again to resume from it."
            if meta else "No training state was saved yet (checkpoint_every saves one every N steps); the class "
                         "images are kept, so a rerun starts training at once.")
    return (f"{advice}; keep train_text_encoder off (now {'on' if cfg.train_text_encoder else 'off'}), resolution "
            f"{cfg.resolution}, batch size {cfg.batch_size}; close other programs that use the GPU. {kept}")


def _warnings(cfg, bundle, instance_images) -> list[str]:
    """What is allowed but will likely disappoint: a known or ordinary word as the identifier, too few photos."""
    warnings = identifier_warnings(cfg.identifier, bundle.tokenizer)
    if len(instance_images) < 3:
        warnings.append(f"{len(instance_images)} photo{'s' if len(instance_images) > 1 else ''} of the subject: "
                        "DreamBooth needs 3-5, from different angles and backgrounds, to learn the subject rather "
                        "than the photo")
    return warnings


def _resume(cfg, state_dir, provenance, modules, optimizer, lr_scheduler, randomness, scaler, callbacks,
            processes=distributed.SINGLE, shards: sharding.Shards | None = None):
    fresh = state_io.Position(0, [], 0), [], []
    if not cfg.resume:
        return fresh
    for candidate in (state_dir, state_dir.with_name(state_dir.name + ".old")):  # .old: crash during a swap
        meta = state_io.read_state_meta(candidate)
        if meta is None:
            continue
        saved_by = meta.get("processes", 1)
        if saved_by != processes.size:  # its global batch was another: the same draws cannot continue
            raise ConfigError(f"{candidate} was saved by a run on {saved_by} process(es); this one has "
                              f"{processes.size}. Resume it with {saved_by} (accelerate launch --num_processes "
                              f"{saved_by}), or delete that folder to start again.")
        if meta.get("sharded", False) != processes.sharded:  # its optimizer state is laid out the other way
            raise ConfigError(f"{candidate} was saved by a {'sharded' if meta.get('sharded') else 'unsharded'} run; "
                              f"resume it {'with' if meta.get('sharded') else 'without'} --shard (or accelerate's "
                              "FSDP config), or delete that folder to start again.")
        if meta["fingerprint"] != provenance.fingerprint():
            differences = "; ".join(provenance.differences(meta.get("made_from")))
            callbacks.log(f"Not resuming from {candidate}: it was saved by a run made from {differences}. "
                          "Training starts again; the old state is replaced when this run saves one")
            return fresh
        if shards:
            shards.check_state(candidate)
        position = state_io.load_state(candidate, meta, modules=modules, optimizer=optimizer,
                                       lr_scheduler=lr_scheduler, randomness=randomness, scaler=scaler,
                                       load_weights=shards.load_full_state if shards else None,
                                       optimizer_shard=shards.own_optimizer_file if shards else None)
        callbacks.log(f"Resuming from step {position.step} ({candidate})")
        return position, list(meta["losses"]), list(meta.get("evaluations", []))
    return fresh


def _previews(bundle, cfg, callbacks, device, precision) -> list:
    """Previews of cfg.sample_prompts with the model being trained; skipped, with a warning, when they do not fit
    beside the training on the GPU (they are not worth the run)."""
    if not cfg.sample_prompts:
        return []
    seeds = [cfg.seed + i for i in range(len(cfg.sample_prompts))]  # same seeds each time: previews compare
    try:
        return _draw(bundle, cfg, device, precision, list(cfg.sample_prompts), seeds, callbacks.log)
    except OutOfMemory as error:
        callbacks.log(f"Previews skipped: {error} Training goes on; set sample_every to 0 or lower the resolution "
                      "to avoid this.")
        return []


def _draw(bundle, cfg, device, precision, prompts: list[str], seeds: list[int], log=None, steps: int | None = None,
          **sampling) -> list:
    """Images of the model being trained, one per (prompt, seed), with its frozen modules borrowed in half
    precision (the previews phase: everything it borrowed leaves the GPU when it ends). One image at a time on a GPU,
    beside the training's memory; all at once on the CPU, where each call costs more than memory does."""
    frozen = [m for m in bundle.text_encoders if not any(p.requires_grad for p in m.parameters())]
    half = inference_dtype(device)
    with Phase(PREVIEWS, device, log=log) as phase:
        phase.borrow(*frozen, dtype=half)
        phase.borrow(bundle.vae, dtype=vae_dtype(bundle, half))  # SDXL's in fp32: it overflows in fp16
        return sample_images(bundle, prompts, seeds=seeds, device=device, width=cfg.resolution, height=cfg.resolution,
                             steps=steps or cfg.sample_steps, batch_size=1 if device.type == "cuda" else len(prompts),
                             autocast=precision or (half if half != torch.float32 else None), **sampling)


def _save_output(cfg, bundle, steps: int, provenance: Provenance, evaluations: list[StepScores]) -> None:
    for module in bundle.modules:
        module.to("cpu").eval()
    Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(bundle, cfg.output, _output_metadata(cfg, bundle, steps, provenance, evaluations),
                    dtype=save_dtype(cfg.save_dtype))


def _output_metadata(cfg, bundle, steps: int, provenance: Provenance, evaluations: list[StepScores]) -> dict:
    metadata = {
        meta.TITLE: Path(cfg.output).stem,
        meta.TRIGGER_PHRASE: cfg.instance_prompt,
        meta.IDENTIFIER: cfg.identifier,
        meta.CLASS_NOUN: cfg.class_noun,
        meta.BASE_MODEL: bundle.source_name,
        meta.BASE_MODEL_SHA256: bundle.source_hash,
        meta.TRAIN_CONFIG: cfg.to_json(),
        meta.STEPS: str(steps),
        meta.REQUEST: provenance.request(),
    }
    if evaluations:  # the scores up to this step, so the file says why it is the one kept
        metadata[meta.EVALUATIONS] = json.dumps([asdict(scores) for scores in evaluations if scores.step <= steps])
    return metadata


def _share_rows(global_n: int, share: slice, with_prior: bool) -> list[int]:
    """The rows of a global batch (instance examples, then their class examples) that are this process's share."""
    rows = list(range(share.start, share.stop))
    return rows + [global_n + row for row in rows] if with_prior else rows


def _check_data_parallel(cfg: TrainConfig, sharded: bool) -> None:
    """What does not combine with several processes, or with sharding, yet."""
    problems = sharding.refusals(cfg) if sharded else []
    if problems:
        raise ConfigError("Sharded training (--shard, or accelerate's FSDP) does not combine with " +
                          "; nor with ".join(problems) + ".")
    if cfg.fused_backward and not sharded:
        raise ConfigError("fused_backward: steps the optimizer inside the backward pass, before the processes' "
                          "gradients are averaged; shard (--shard), turn it off, or choose a memory preset without "
                          "it to train on several processes.")
    if cfg.evaluate_every:
        raise ConfigError("evaluate_every: scoring while training runs on one process only for now; set it to 0 "
                          "to train on several processes, then measure the result with `python -m trainer evaluate`.")


class _OnlyStop(Callbacks):
    """A process other than rank 0: silent, but it hears a stop (Ctrl-C reaches every process)."""

    def __init__(self, callbacks: Callbacks):
        self.callbacks = callbacks

    def should_stop(self) -> bool:
        return self.callbacks.should_stop()
