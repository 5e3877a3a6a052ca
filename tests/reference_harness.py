"""Run diffusers' reference DreamBooth script (examples/dreambooth/train_dreambooth.py) with its random draws recorded,
and replay those draws into our train().

The script is not part of this repository; point DREAMBOOTH_REFERENCE_SCRIPT at a copy of it. It imports torchvision,
so it runs in an environment that has torchvision (the same torch as ours is best, so the arithmetic matches).

How it works: `run_reference` starts `python tests/reference_harness.py RECORD_DIR SCRIPT -- ARGS...` (the current
interpreter, offline). That child installs recording hooks, loads the script with runpy (without running its
`__main__` block), hooks its DreamBoothDataset, then calls the script's own `main(parse_args(ARGS))`. The hooks record,
in order, every draw the training loop makes:

- `epoch_order`: the permutation the DataLoader's RandomSampler yields at the start of each epoch;
- `latent_noise`: the standard-normal tensor DiagonalGaussianDistribution.sample() draws (latents = mean + std * it);
- `noise`: the result of torch.randn_like (the noise added to the latents);
- `timesteps`: the result of torch.randint (the timesteps);

plus, for checking, the posterior mean and std each step's latents were sampled from, each DreamBoothDataset.__getitem__
(index and file names), the token ids of the prompts, and the loss and lr the script logs each step. Records land in
RECORD_DIR/records.json and RECORD_DIR/draws.safetensors; the trained weights are where the script saves them
(OUTPUT_DIR/unet, OUTPUT_DIR/text_encoder).

Two things are changed in the reference, neither of them its method:

- DreamBoothDataset lists its folders with Path.iterdir(), whose order is whatever the file system returns. The hook
  sorts both lists by file name (as trainer.dataset does), so dataset index i means the same pair of images in both
  implementations.
- The script encodes each step's images through the VAE as one batch; our latent cache encodes each image alone. The
  two differ by rounding (~2e-6 in the posteriors), which AdamW turns into visible weight differences wherever a
  gradient element is itself near rounding level. The hook turns on the VAE's own slicing (AutoencoderKL.use_slicing:
  a batch goes through the encoder one image at a time, the results concatenated), so both sides sample from the
  same posteriors bit for bit.

The same harness runs diffusers' examples/text_to_image/train_text_to_image_sdxl.py (it has no DreamBoothDataset to
hook; where Hugging Face `datasets` does not import, the child puts bench/stand_ins' stand-in on sys.path). That script
samples each image's latents once, before training: those draws are recorded as `precomputed_latent_noise`, with the
posterior mean and std they were sampled from (`precomputed_posterior_mean`, `precomputed_posterior_std`), and its
`train_loss` logs are the losses.

The child also runs with the caller's torch thread count (OMP_NUM_THREADS): a CPU kernel may split its sums by thread,
so both sides must use the same number to round the same way.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


DRAW_KINDS = ("epoch_order", "latent_noise", "noise", "timesteps")
RECORDS_JSON = "records.json"
DRAWS_FILE = "draws.safetensors"

# --------------------------------------------------------------------------------------------------------------------
# Parent side: build the inputs, run the reference, read its records and weights.
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ReferenceRun:
    output_dir: Path
    events: list[dict]  # every recorded event, in order
    draws: dict[str, torch.Tensor]  # tensors of the events that have one (draws, posteriors), by their "key"
    log: str = ""  # the script's stdout + stderr

    def of_kind(self, kind: str) -> list[dict]:
        return [event for event in self.events if event["kind"] == kind]

    def tensors_of_kind(self, kind: str) -> list[torch.Tensor]:
        return [self.draws[event["key"]] for event in self.of_kind(kind)]

    def step_items(self, batch_size: int = 1) -> list[list[int]]:
        """The dataset indices each step trained on: consecutive batches of each epoch's order."""
        steps, orders = len(self.losses), [e["order"] for e in self.of_kind("epoch_order")]
        batches = [order[i:i + batch_size] for order in orders for i in range(0, len(order), batch_size)]
        return batches[:steps]

    @property
    def losses(self) -> list[float]:
        return [event["loss"] if "loss" in event else event["train_loss"] for event in self.of_kind("log")]

    @property
    def prompt_ids(self) -> dict[str, list[int]]:
        return next(event for event in self.events if event["kind"] == "prompt_ids")["ids"]

    def unet_state(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.output_dir / "unet" / "diffusion_pytorch_model.safetensors"))

    def text_encoder_state(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.output_dir / "text_encoder" / "model.safetensors"))

    def draw_sequence(self) -> list[str]:
        return [event["kind"] for event in self.events if event["kind"] in DRAW_KINDS]

    def check_draw_pattern(self, steps: int, num_items: int, batch_size: int = 1) -> None:
        """The reference drew exactly: an epoch order at each epoch start, then per step latent noise, noise,
        timesteps (nothing else, nothing more); raise AssertionError naming the first difference otherwise."""
        expected, used = [], num_items  # `used` items of the current epoch's order already taken
        for _ in range(steps):
            if used + batch_size > num_items:
                expected.append("epoch_order")
                used = 0
            used += batch_size
            expected += ["latent_noise", "noise", "timesteps"]
        actual = self.draw_sequence()
        if actual != expected:
            first = next((i for i, (a, e) in enumerate(zip(actual, expected)) if a != e),
                         min(len(actual), len(expected)))
            raise AssertionError(f"reference draws differ from the expected pattern at draw {first}: "
                                 f"expected {expected[first:first + 4]}, got {actual[first:first + 4]} "
                                 f"({len(actual)} draws vs {len(expected)} expected)")


def run_reference(script, args: list[str], record_dir, *, python: str | None = None, timeout: float = 1800,
                  threads: int | None = None) -> ReferenceRun:
    """Run the reference script offline in a subprocess with the recording hooks; return its records. The child
    uses `threads` torch threads, by default as many as this process."""
    record_dir = Path(record_dir)
    record_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               DIFFUSERS_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false",
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1")
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads or torch.get_num_threads())
    command = [python or sys.executable, str(Path(__file__).resolve()), str(record_dir), str(script), "--", *args]
    proc = subprocess.run(command, cwd=record_dir, env=env, capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    (record_dir / "reference.log").write_text(log)
    if proc.returncode != 0:
        raise RuntimeError(f"reference script failed (exit {proc.returncode}); last output:\n{log[-6000:]}")
    output_dir = Path(args[args.index("--output_dir") + 1])
    events = json.loads((record_dir / RECORDS_JSON).read_text())
    draws = load_file(str(record_dir / DRAWS_FILE))
    return ReferenceRun(output_dir, events, draws, log)


# --------------------------------------------------------------------------------------------------------------------
# Replay: our train() draws through this object and gets exactly the reference's numbers.
# --------------------------------------------------------------------------------------------------------------------


class ReplayRandomness:
    """trainer.randomness.StepRandomness's interface, answering each request with the reference's next recorded
    draw of that kind; a request the reference never made (wrong shape, wrong size, one too many) raises."""

    def __init__(self, run: ReferenceRun):
        self.queues = {kind: [] for kind in DRAW_KINDS}
        for event in run.events:
            if event["kind"] == "epoch_order":
                self.queues["epoch_order"].append(list(event["order"]))
            elif event["kind"] in DRAW_KINDS:
                self.queues[event["kind"]].append(run.draws[event["key"]])
        self.position = {kind: 0 for kind in DRAW_KINDS}
        self.calls: list[str] = []  # the kinds requested, in order, for comparing with the reference's sequence

    def _next(self, kind: str):
        queue, pos = self.queues[kind], self.position[kind]
        if pos >= len(queue):
            raise AssertionError(f"train() asked for {kind} #{pos + 1}, but the reference drew only {len(queue)} "
                                 f"(calls so far: {self.calls})")
        self.position[kind] = pos + 1
        self.calls.append(kind)
        return queue[pos]

    def epoch_order(self, n: int) -> list[int]:
        order = self._next("epoch_order")
        if len(order) != n:
            raise AssertionError(f"train() asked for an epoch order of {n} items; the reference's dataset had "
                                 f"{len(order)}")
        return list(order)

    def latent_noise(self, shape) -> torch.Tensor:
        return self._tensor("latent_noise", shape)

    def noise(self, shape) -> torch.Tensor:
        return self._tensor("noise", shape)

    def timesteps(self, n: int, num_train_timesteps: int) -> torch.Tensor:
        t = self._next("timesteps")
        if tuple(t.shape) != (n,):
            raise AssertionError(f"train() asked for {n} timesteps; the reference drew {tuple(t.shape)}")
        if int(t.max()) >= num_train_timesteps:
            raise AssertionError(f"reference timestep {int(t.max())} is outside train()'s range "
                                 f"0..{num_train_timesteps - 1}")
        return t.clone()

    def _tensor(self, kind: str, shape) -> torch.Tensor:
        t = self._next(kind)
        if tuple(t.shape) != tuple(shape):
            raise AssertionError(f"train() asked for {kind} #{self.position[kind]} of shape {tuple(shape)}; the "
                                 f"reference drew {tuple(t.shape)}")
        return t.clone()

    def unused(self) -> dict[str, int]:
        """Draws the reference made that train() has not asked for, by kind (empty when all were consumed)."""
        return {kind: len(q) - self.position[kind] for kind, q in self.queues.items() if len(q) > self.position[kind]}

    def state_dict(self) -> dict:
        return {"position": dict(self.position), "calls": list(self.calls)}

    def load_state_dict(self, state: dict) -> None:
        self.position = dict(state["position"])
        self.calls = list(state["calls"])


# --------------------------------------------------------------------------------------------------------------------
# Child side: runs inside the reference's process.
# --------------------------------------------------------------------------------------------------------------------


class _Recorder:
    def __init__(self):
        self.events: list[dict] = []
        self.tensors: dict[str, torch.Tensor] = {}
        self.in_loop = False  # draws count only once the training DataLoader has started

    def draw(self, kind: str, tensor: torch.Tensor) -> None:
        self.tensor(kind, tensor)

    def tensor(self, kind: str, tensor: torch.Tensor) -> None:
        key = f"{len(self.tensors):04d}.{kind}"
        self.tensors[key] = tensor.detach().to("cpu").clone().contiguous()
        self.events.append({"kind": kind, "key": key, "shape": list(tensor.shape), "dtype": str(tensor.dtype)})

    def other(self, kind: str, **data) -> None:
        self.events.append({"kind": kind, **data})

    def save(self, folder: Path) -> None:
        save_file(self.tensors, str(folder / DRAWS_FILE))
        (folder / RECORDS_JSON).write_text(json.dumps(self.events, indent=1))


def _install_hooks(recorder: _Recorder) -> None:
    import accelerate
    import diffusers
    import torch.utils.data
    from diffusers.models.autoencoders import vae as vae_module

    def sample(self, generator=None):  # DiagonalGaussianDistribution.sample, recording its standard-normal draw
        eps = vae_module.randn_tensor(self.mean.shape, generator=generator, device=self.parameters.device,
                                      dtype=self.parameters.dtype)
        if recorder.in_loop:
            recorder.draw("latent_noise", eps)
            recorder.tensor("posterior_mean", self.mean)  # for checking our cached posteriors
            recorder.tensor("posterior_std", self.std)
        else:  # train_text_to_image_sdxl.py samples each image's latents once, before training
            recorder.tensor("precomputed_latent_noise", eps)
            recorder.tensor("precomputed_posterior_mean", self.mean)
            recorder.tensor("precomputed_posterior_std", self.std)
        return self.mean + self.std * eps

    vae_module.DiagonalGaussianDistribution.sample = sample

    encode = diffusers.AutoencoderKL.encode

    def encode_per_image(self, x, return_dict=True):  # as our latent cache does (see the module docstring)
        self.use_slicing = True
        return encode(self, x, return_dict)

    diffusers.AutoencoderKL.encode = encode_per_image

    randn_like, randint = torch.randn_like, torch.randint

    def recording_randn_like(*args, **kwargs):
        out = randn_like(*args, **kwargs)
        if recorder.in_loop:
            recorder.draw("noise", out)
        else:
            recorder.other("randn_like_outside_loop", shape=list(out.shape))
        return out

    def recording_randint(*args, **kwargs):
        out = randint(*args, **kwargs)
        if recorder.in_loop:
            recorder.draw("timesteps", out)
        else:
            recorder.other("randint_outside_loop", shape=list(out.shape))
        return out

    torch.randn_like, torch.randint = recording_randn_like, recording_randint

    sampler_iter = torch.utils.data.RandomSampler.__iter__

    def recording_sampler_iter(self):  # a generator, like the original: the permutation is drawn at the first next()
        order = list(sampler_iter(self))
        recorder.in_loop = True
        recorder.other("epoch_order", order=order, n=len(self.data_source))
        yield from order

    torch.utils.data.RandomSampler.__iter__ = recording_sampler_iter

    accelerator_log = accelerate.Accelerator.log

    def recording_log(self, values, step=None, log_kwargs=None):
        recorder.other("log", step=step, **{k: float(v) for k, v in values.items()})
        return accelerator_log(self, values, step=step, log_kwargs=log_kwargs)

    accelerate.Accelerator.log = recording_log


def _hook_dataset(recorder: _Recorder, dataset_cls) -> None:
    init, getitem = dataset_cls.__init__, dataset_cls.__getitem__

    def sorted_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.instance_images_path = sorted(self.instance_images_path, key=lambda p: p.name)
        if getattr(self, "class_data_root", None):
            self.class_images_path = sorted(self.class_images_path, key=lambda p: p.name)
        recorder.other("dataset", length=len(self),
                       instance=[p.name for p in self.instance_images_path],
                       classes=[p.name for p in getattr(self, "class_images_path", [])],
                       num_class_images=getattr(self, "num_class_images", 0))

    def recording_getitem(self, index):
        example = getitem(self, index)
        event = {"index": int(index), "instance": self.instance_images_path[index % self.num_instance_images].name}
        if getattr(self, "class_data_root", None):
            event["class"] = self.class_images_path[index % self.num_class_images].name
        recorder.other("getitem", **event)
        if not any(e["kind"] == "prompt_ids" for e in recorder.events) and "instance_prompt_ids" in example:
            ids = {"instance": example["instance_prompt_ids"].flatten().tolist()}
            if "class_prompt_ids" in example:
                ids["class"] = example["class_prompt_ids"].flatten().tolist()
            recorder.other("prompt_ids", ids=ids)
        return example

    dataset_cls.__init__, dataset_cls.__getitem__ = sorted_init, recording_getitem


def _child_main(argv: list[str]) -> None:
    import runpy

    record_dir, script = Path(argv[0]), argv[1]
    assert argv[2] == "--", "usage: reference_harness.py RECORD_DIR SCRIPT -- SCRIPT_ARGS..."
    script_args = argv[3:]
    recorder = _Recorder()
    _install_hooks(recorder)
    try:
        import datasets  # train_text_to_image_sdxl.py's
    except ImportError:  # bench/stand_ins' stand-in for what that script uses of it
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "stand_ins"))
        import datasets
    recorder.other("datasets", version=datasets.__version__)
    namespace = runpy.run_path(script, run_name="reference_train_dreambooth")  # defines, does not train
    if "DreamBoothDataset" in namespace:
        _hook_dataset(recorder, namespace["DreamBoothDataset"])
    sys.argv = [script, *script_args]
    namespace["main"](namespace["parse_args"](script_args))
    recorder.save(record_dir)


if __name__ == "__main__":
    _child_main(sys.argv[1:])
