"""Speed levers for the training step: channels-last memory layout (TrainConfig.channels_last) and torch.compile of
the UNet (TrainConfig.compile_unet).

Neither changes what is learned beyond float rounding (the kernels differ, not the maths), and neither reaches what
is saved or what the caller gets back:
- channels_last changes how the UNet's 4-D weights and activations are laid out in memory, not their values. The
  saved checkpoint and state are written contiguous as before (same keys, same layout); optimizer moments restored
  from a state are put back channels-last, as they were created, so 8-bit AdamW's blocks (taken in memory order)
  line up again; the UNet is made contiguous again once training ends. (8-bit AdamW makes the weights contiguous
  at its first step, so with it only the activations stay channels-last.)
- compile_unet keeps the compiled wrapper local to the training step: bundle.unet stays the plain module, so the
  checkpoint, the state and everything the caller does with the bundle afterwards (sampling) see no `_orig_mod.`
  prefix, no hooks and no compiled code. Previews during training run the plain module too.
  Compilers have bugs that silently compute wrong gradients (PyTorch 2.13's CPU backend does for the tiny test UNet),
  so before the first step the compiled UNet's gradients are checked against the plain UNet's on one batch, and a
  mismatch stops the run with advice instead of training a broken model.
"""
from __future__ import annotations

import contextlib

import torch

from .config import ConfigError

_TURN_OFF = "turn compile_unet off to train without it (same result, slower steps)"


def to_channels_last(module: torch.nn.Module) -> None:
    """4-D weights in NHWC layout, in place (the Parameter objects stay, so optimizers keep them)."""
    module.to(memory_format=torch.channels_last)


def to_contiguous(module: torch.nn.Module) -> None:
    module.to(memory_format=torch.contiguous_format)


def channels_last_input(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous(memory_format=torch.channels_last)


def match_state_layout(optimizer) -> None:
    """Lay the moments of 4-D weights out channels-last again after loading a (contiguous) saved state.

    They were created channels-last, like their weights at the first step (zeros_like). For AdamW only speed
    depends on it. 8-bit AdamW reads its moments as flat memory: it makes each weight contiguous at its first step
    (so with it only activations stay channels-last) but keeps the moments as created, so they must come back with
    that memory order to pair each 8-bit value, and each quantization block, with the same weights. (So a state
    resumes only with the channels_last it was made with: the setting is part of its fingerprint.) Its weights, loaded
    into channels-last tensors, go back to contiguous too, as in a run never stopped: convolving with the other layout
    rounds differently, and a resumed run would no longer end where that run ends."""
    for opt in getattr(optimizer, "optimizers", [optimizer]):  # FusedBackward: one optimizer per tensor
        eight_bit = any(cls.__module__.startswith("bitsandbytes") for cls in type(opt).__mro__)  # or a subclass
        for param, entries in opt.state.items():
            if param.dim() != 4:
                continue
            if eight_bit:
                param.data = param.data.contiguous()
            for key, value in entries.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    entries[key] = value.contiguous(memory_format=torch.channels_last)


def check_compile_toolchain(device: torch.device) -> None:
    """Refuse compile_unet up front, before any images are encoded, where torch.compile's compiler is missing."""
    if not torch._dynamo.is_dynamo_supported():
        raise ConfigError(f"compile_unet: torch.compile does not run on this Python/PyTorch; {_TURN_OFF}")
    if device.type == "cuda":
        from torch.utils._triton import has_triton
        if not has_triton():
            raise ConfigError("compile_unet: torch.compile needs Triton on this GPU (`pip install triton`, "
                              "'triton-windows' on Windows; NVIDIA GPUs of compute capability 7.0 or newer); "
                              + _TURN_OFF)
    elif device.type == "cpu":
        from torch._inductor import cpp_builder, exc
        try:
            cpp_builder.get_cpp_compiler()
        except (exc.InvalidCxxCompiler, OSError, RuntimeError) as error:
            raise ConfigError(f"compile_unet: torch.compile needs a C++ compiler on the CPU ({error}); install g++ "
                              f"(Linux), the Xcode command line tools (macOS) or MSVC (Windows), or {_TURN_OFF}"
                              ) from error


# torch.compile's backend. The CPU tests use "aot_eager" (Dynamo and AOTAutograd without Inductor's code generation).
BACKEND = "inductor"
# A tensor's compiled gradient is wrong when its norm is off by more than this fraction of the plain one's plus this
# fraction of the largest tensor's: float rounding (also bf16/fp16 autocast) stays well inside; miscompiled
# gradients (zeroed, stale, unwritten) are off by their whole size.
_GRAD_RTOL, _GRAD_FLOOR = 0.25, 0.01


def compile_for_training(bundle, latents, text, cfg, device: torch.device, autocast, callbacks):
    """The UNet compiled for the training step, compiled and checked now; bundle.unet itself is left as it is.

    dynamic=False: the step sees at most two batch shapes (a full batch and an epoch's last, smaller one), each
    compiled once, with static shapes, which Inductor optimises best."""
    callbacks.log("Compiling the UNet (compile_unet): this takes a few minutes before the first step")
    compiled = torch.compile(bundle.unet, backend=BACKEND, dynamic=False)
    batch = example_batch(latents, text, cfg.batch_size, bundle.noise_scheduler.config.num_train_timesteps, device,
                          cfg.channels_last, autocast)
    with compile_help(True):
        check_compiled(bundle.unet, compiled, batch, autocast)
    return compiled


def example_batch(latents, text, batch_size: int, num_train_timesteps: int, device: torch.device,
                  channels_last: bool, autocast) -> tuple[tuple[torch.Tensor, torch.Tensor], dict]:
    """UNet inputs shaped, typed and laid out like the first step's, drawn from a generator of their own (the run's
    random stream is untouched), so that the compiled graph checked here is the one training uses."""
    n = min(batch_size, latents.num_items)
    rows = 2 * n if latents.with_prior else n
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn((rows, *latents.instance_mean.shape[1:]), generator=generator).to(device)
    if channels_last:
        noisy = channels_last_input(noisy)
    timesteps = torch.randint(0, num_train_timesteps, (rows,), generator=generator).to(device)
    with autocast():
        cond = text.states(n, latents.with_prior)
    return (noisy, timesteps), cond.unet_kwargs(latents.time_ids(list(range(n))))


def check_compiled(unet: torch.nn.Module, compiled, batch: tuple, autocast) -> None:
    """Compile now (the slow part), and refuse a compiled UNet whose gradients are not the plain UNet's.

    One forward and backward of each on `batch`; the gradient norm of every trainable tensor must agree (see
    _GRAD_RTOL). torch.autograd.grad leaves .grad and any gradient hooks alone, and frees the gradients at once."""
    params = [p for p in unet.parameters() if p.requires_grad]
    norms = []
    for forward in (unet, compiled):
        with autocast():
            output = forward(*batch[0], **batch[1]).sample
        # A sum, not a mean: fp16 autocast gradients of a mean underflow.
        grads = torch.autograd.grad(output.float().square().sum(), params, allow_unused=True)
        norms.append(torch.stack([torch.linalg.vector_norm(g.float()) if g is not None else p.new_zeros(())
                                  for g, p in zip(grads, params)]).cpu())
        del grads
    plain, compiled_norms = norms
    finite = torch.isfinite(plain)  # fp16 can overflow in both; nothing to compare there
    if not finite.any():
        return
    allowed = _GRAD_RTOL * plain + _GRAD_FLOOR * plain[finite].max()
    wrong = finite & ~((compiled_norms - plain).abs() <= allowed)  # also catches NaN/inf in the compiled ones
    if wrong.any():
        names = [name for (name, p), bad in zip(((n, p) for n, p in unet.named_parameters() if p.requires_grad),
                                                 wrong.tolist()) if bad]
        raise ConfigError(
            f"compile_unet: torch.compile ({BACKEND}, PyTorch {torch.__version__}) computes wrong gradients for this "
            f"UNet on {next(iter(params)).device.type}: {len(names)} of {len(params)} tensors differ from the plain "
            f"UNet's, e.g. {', '.join(names[:3])}. Training with it would learn the wrong thing; {_TURN_OFF}")


def _compile_errors() -> tuple[type[BaseException], ...]:
    from torch._dynamo import exc as dynamo_exc
    from torch._inductor import exc as inductor_exc
    return (dynamo_exc.BackendCompilerFailed, inductor_exc.InvalidCxxCompiler, inductor_exc.CppCompileError,
            inductor_exc.TritonMissing, inductor_exc.GPUTooOldForTriton)


@contextlib.contextmanager
def compile_help(enabled: bool):
    """A compiler failure inside a step (the first steps compile) -> ConfigError that says to turn the setting off."""
    if not enabled:
        yield
        return
    try:
        yield
    except _compile_errors() as error:
        cause = getattr(error, "inner_exception", None) or error  # BackendCompilerFailed wraps the compiler's error
        first_line = (str(cause).strip().splitlines() or [""])[0][:300]
        raise ConfigError(f"compile_unet: torch.compile failed to compile the UNet ({type(cause).__name__}: "
                          f"{first_line}); {_TURN_OFF}") from error
