"""A run's phases: what each puts on the device comes back untouched, out-of-memory becomes an answer naming the phase,
the hosts' calls keep nothing alive, and the training step waits for the device once."""
import collections
import gc
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

import bitsandbytes.optim.optimizer as bnb_optimizer
import trainer.api
import trainer.loop
import trainer.priors
from bench.step_profile import Counter as StepCounter
from tests.tiny import one_thread, tiny_bundle  # noqa: F401  (autouse: one torch thread in this module)
from trainer import phases
from trainer.callbacks import Callbacks
from trainer.checkpoint import save_checkpoint
from trainer.config import TrainConfig
from trainer.device import GIB, emulating_gpu, inference_dtype, resolve_precision
from trainer.fused import PerTensorOptimizer
from trainer.optim import adamw8bit_without_syncs
from trainer.phases import OutOfMemory, Phase, Watcher

OOM_TEXT = ("CUDA out of memory. Tried to allocate 1.50 GiB. GPU 0 has a total capacity of 7.60 GiB of which "
            "3.44 MiB is free.")


class Log(Callbacks):
    def __init__(self):
        self.lines = []

    def log(self, message):
        self.lines.append(message)


class Recorder(Watcher):
    """Every phase event, and the device tensors put on and not yet taken off (by identity, with their uses)."""

    def __init__(self):
        self.events, self.on_device, self.uses = [], {}, {}

    def entered(self, phase):
        self.events.append(("enter", phase.name))

    def placed(self, phase, tensors):
        for t in tensors:
            self.on_device[id(t)], self.uses[id(t)] = t, self.uses.get(id(t), 0) + 1

    def released(self, phase, tensors):
        for t in tensors:
            self.uses[id(t)] -= 1
            if not self.uses[id(t)]:
                del self.on_device[id(t)], self.uses[id(t)]

    def exited(self, phase, report):
        self.events.append(("exit", phase.name))


def noise_images(folder, n, size=64, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


def run_config(tmp_path, **overrides) -> TrainConfig:
    settings = dict(base_model="tiny-sd1", instance_dir=str(noise_images(tmp_path / "photos", 3)), identifier="zwx",
                    class_noun="dog", output=str(tmp_path / "out" / "zwx-dog.safetensors"), resolution=32,
                    max_train_steps=2, learning_rate=1e-3, num_class_images=2, prior_steps=2, optimizer="adamw",
                    device="cpu", seed=0, prior_cache_dir=str(tmp_path / "priors"), sample_prompts=["a zwx dog"],
                    sample_steps=2)
    settings.update(overrides)
    return TrainConfig(**settings)


def test_a_borrowed_module_gets_its_own_tensors_back_untouched():
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)).eval()
    before = {name: (tensor.data_ptr(), tensor.clone()) for name, tensor in module.state_dict().items()}
    with Phase("probe", "cpu") as phase:
        phase.borrow(module, dtype=torch.bfloat16)
        assert all(p.dtype == torch.bfloat16 for p in module.parameters())
        assert module[1].running_mean.dtype == torch.bfloat16
        assert module[1].num_batches_tracked.dtype == torch.int64  # integers keep their dtype
        module(torch.randn(2, 4, dtype=torch.bfloat16))
    after = module.state_dict()
    assert all(after[name].data_ptr() == pointer for name, (pointer, _) in before.items())  # its own memory again
    assert all(torch.equal(after[name], copy) for name, (_, copy) in before.items())  # bit for bit, not a round trip
    assert module[0].weight.dtype == torch.float32


def test_a_borrowed_module_comes_back_when_the_phase_fails():
    module = torch.nn.Linear(4, 4)
    original = module.weight.data_ptr()
    with pytest.raises(ZeroDivisionError), Phase("probe", "cpu") as phase:
        phase.borrow(module, dtype=torch.float16)
        1 / 0
    assert module.weight.data_ptr() == original and module.weight.dtype == torch.float32


def test_watchers_see_each_phase_and_everything_it_put_on_the_device_leave():
    module, trained = torch.nn.Linear(4, 4), torch.nn.Linear(2, 2)
    with phases.watching(Recorder()) as recorder:
        with Phase("outer", "cpu") as outer:
            outer.place(trained, torch.bfloat16)
            assert {id(t) for t in trained.parameters()} <= set(recorder.on_device)
            with Phase("inner", "cpu") as inner:
                inner.borrow(module, dtype=torch.float16)
                assert any(t.dtype == torch.float16 for t in recorder.on_device.values())
            assert all(t.dtype == torch.bfloat16 for t in recorder.on_device.values())  # the borrowed copies left
    assert recorder.events == [("enter", "outer"), ("enter", "inner"), ("exit", "inner"), ("exit", "outer")]
    assert recorder.on_device == {}
    assert trained.weight.dtype == torch.bfloat16  # placed for good: trained modules keep their training dtype


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError(OOM_TEXT),
                                   RuntimeError("CUDA error: out of memory (a custom kernel)")])
def test_out_of_memory_becomes_an_answer_that_names_the_phase(error):
    module = torch.nn.Linear(4, 4)
    original = module.weight.data_ptr()
    with pytest.raises(OutOfMemory) as raised, Phase("class images", "cpu", advice="Lower the resolution.") as phase:
        phase.borrow(module, dtype=torch.float16)
        raise error
    message = str(raised.value)
    assert raised.value.phase == "class images" and isinstance(raised.value, MemoryError)
    assert message.startswith("Out of GPU memory in the class images phase") and "Lower the resolution." in message
    assert ("asking for 1.50 GiB more" in message) == isinstance(error, torch.cuda.OutOfMemoryError)
    assert module.weight.data_ptr() == original


def test_other_errors_pass_through_unchanged():
    with pytest.raises(RuntimeError, match="shape mismatch"), Phase("training", "cpu"):
        raise RuntimeError("shape mismatch")


def test_policy_of_an_emulated_gpu():
    cpu = torch.device("cpu")
    assert inference_dtype(cpu) == torch.float32 and resolve_precision("auto", cpu) is None
    with emulating_gpu(8 * GIB, bf16=True):
        assert inference_dtype(cpu) == torch.bfloat16 and resolve_precision("auto", cpu) == torch.bfloat16
    with emulating_gpu(8 * GIB, bf16=False):
        assert inference_dtype(cpu) == torch.float16 and resolve_precision("auto", cpu) == torch.float16
    assert inference_dtype(cpu) == torch.float32


def test_class_images_go_on_at_half_the_batch_when_a_batch_does_not_fit(tmp_path, monkeypatch):
    bundle = tiny_bundle("sd1")
    real, batches = trainer.priors.sample_images, []

    def tight_memory(bundle, prompts, *, batch_size, **kwargs):
        batches.append(batch_size)
        if batch_size > 1:  # the first image of the big batch is made, then the card is full
            real(bundle, prompts[:1], batch_size=1, **{**kwargs, "seeds": kwargs["seeds"][:1]})
            raise torch.cuda.OutOfMemoryError(OOM_TEXT)
        return real(bundle, prompts, batch_size=batch_size, **kwargs)

    monkeypatch.setattr(trainer.priors, "sample_images", tight_memory)
    log = Log()
    paths = trainer.priors.make_class_priors(bundle, "a dog", count=5, cache_root=tmp_path, device="cpu",
                                             batch_size=4, log=log.log, width=32, height=32, steps=2, seed=0)
    assert batches == [4, 2, 1] and len(paths) == 5 and all(p.is_file() for p in paths)
    assert "Class images: out of GPU memory, going on 2 at a time" in log.lines


def test_class_images_out_of_memory_at_one_image_keeps_what_was_made(tmp_path, monkeypatch):
    bundle = tiny_bundle("sd1")
    real = trainer.priors.sample_images

    def two_then_full(bundle, prompts, *, on_image, **kwargs):
        real(bundle, prompts[:2], on_image=on_image, **{**kwargs, "seeds": kwargs["seeds"][:2]})
        raise torch.cuda.OutOfMemoryError(OOM_TEXT)

    monkeypatch.setattr(trainer.priors, "sample_images", two_then_full)
    settings = dict(count=4, cache_root=tmp_path, device="cpu", batch_size=1, width=32, height=32, steps=2, seed=0)
    with pytest.raises(OutOfMemory, match="class images phase.*made so far are kept in"):
        trainer.priors.make_class_priors(bundle, "a dog", **settings)
    monkeypatch.setattr(trainer.priors, "sample_images", real)
    made = []
    trainer.priors.make_class_priors(bundle, "a dog", on_progress=lambda done, total: made.append(done), **settings)
    assert made[0] == 2  # the rerun found the two images of the failed run and made only the rest


def test_out_of_memory_in_previews_skips_them_and_the_run_ends_saved(tmp_path, monkeypatch):
    real = trainer.loop.sample_images

    def previews_do_not_fit(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError(OOM_TEXT)

    monkeypatch.setattr(trainer.loop, "sample_images", previews_do_not_fit)
    log = Log()
    result = trainer.loop.train(run_config(tmp_path), bundle=tiny_bundle("sd1"), callbacks=log)
    assert result.samples == [] and (tmp_path / "out" / "zwx-dog.safetensors").is_file()
    assert any(line.startswith("Previews skipped: Out of GPU memory in the previews phase") for line in log.lines)
    monkeypatch.setattr(trainer.loop, "sample_images", real)


def test_out_of_memory_in_training_says_where_the_saved_state_is(tmp_path):
    cfg = run_config(tmp_path, max_train_steps=4, checkpoint_every=2, sample_prompts=[])
    bundle = tiny_bundle("sd1")
    forward, calls = bundle.unet.forward, []

    def out_of_memory_at_step_3(*args, **kwargs):
        calls.append(bundle.unet.training)  # (class images are drawn in eval mode)
        if sum(calls) == 3:
            raise torch.cuda.OutOfMemoryError(OOM_TEXT)
        return forward(*args, **kwargs)

    bundle.unet.forward = out_of_memory_at_step_3
    with pytest.raises(OutOfMemory, match="training phase, asking for 1.50 GiB more") as raised:
        trainer.loop.train(cfg, bundle=bundle)
    assert "The state saved at step 2 is kept in" in str(raised.value)
    resumed = trainer.loop.train(cfg, bundle=tiny_bundle("sd1"))  # the rerun loads the base model again
    assert resumed.resumed_from == 2 and resumed.steps == 4


def test_a_run_gives_back_everything_it_put_on_the_device_phase_by_phase(tmp_path):
    log = Log()
    with phases.watching(Recorder()) as recorder:
        trainer.loop.train(run_config(tmp_path, train_text_encoder=True), bundle=tiny_bundle("sd1"), callbacks=log)
    assert [name for kind, name in recorder.events if kind == "enter"] == [
        "class images", "photo encoding", "training", "previews", "saving"]
    assert recorder.on_device == {}
    assert [line.split(":")[0] for line in log.lines if line.startswith("Phase ")] == [
        "Phase class images", "Phase photo encoding", "Phase training", "Phase previews", "Phase saving"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_checkpoint(tiny_bundle("sd1"), path, {})
    return path


@pytest.mark.parametrize("call", ["pick_identifiers", "class_images", "sample"])
def test_the_hosts_calls_keep_no_model_alive(checkpoint, tmp_path, monkeypatch, call):
    loaded = []
    real = trainer.api.load_model

    def remembering(*args, **kwargs):
        bundle = real(*args, **kwargs)
        loaded.append(weakref.ref(bundle.unet))
        return bundle

    monkeypatch.setattr(trainer.api, "load_model", remembering)
    arguments = {
        "pick_identifiers": lambda: trainer.api.pick_identifiers(str(checkpoint), "dog", count=2, candidates=6,
                                                                 shortlist=3, device="cpu"),
        "class_images": lambda: trainer.api.class_images(str(checkpoint), "a dog", count=2, cache_root=tmp_path,
                                                         size=32, steps=2, device="cpu"),
        "sample": lambda: trainer.api.sample(str(checkpoint), ["a dog"], seeds=[0], size=32, steps=2, device="cpu"),
    }
    result = arguments[call]()
    assert result and len(loaded) == 1
    gc.collect()
    assert loaded[0]() is None  # the UNet (and with it the model) is gone once the call has returned


@pytest.mark.parametrize("call", ["class_images", "sample"])
def test_the_hosts_sdxl_calls_keep_no_model_alive(tmp_path, monkeypatch, call):
    checkpoint = tmp_path / "tiny-sdxl.safetensors"
    save_checkpoint(tiny_bundle("sdxl"), checkpoint, {})
    loaded = []
    real = trainer.api.load_model

    def remembering(*args, **kwargs):
        bundle = real(*args, **kwargs)
        loaded.extend(weakref.ref(module) for module in bundle.modules)
        return bundle

    monkeypatch.setattr(trainer.api, "load_model", remembering)
    if call == "class_images":
        result = trainer.api.class_images(str(checkpoint), "a dog", count=1, cache_root=tmp_path, steps=1,
                                          device="cpu")
    else:
        result = trainer.api.sample(str(checkpoint), ["a dog"], seeds=[0], steps=1, device="cpu")
    assert result and len(loaded) == 4  # UNet, VAE, both text encoders
    gc.collect()
    assert [ref() for ref in loaded] == [None] * 4


@pytest.mark.parametrize("preset", ["8 GB", "custom"])
def test_a_training_step_waits_for_the_device_once(tmp_path, preset):
    counter, per_step = StepCounter(), []  # counts .item(), .tolist(), bitsandbytes' waits, ... (bench/step_profile.py)

    class Count(Callbacks):
        def should_stop(self):  # asked as each step starts
            self.before = counter.snapshot()[1]
            return False

        def on_step(self, info):
            per_step.append(counter.snapshot()[1] - self.before)

    cfg = run_config(tmp_path, memory_preset=preset, optimizer="adamw8bit", mixed_precision="no", sample_prompts=[],
                     with_prior_preservation=False, max_train_steps=3)
    with counter:
        trainer.loop.train(cfg, bundle=tiny_bundle("sd1"), callbacks=Count())
    assert per_step == [collections.Counter({".tolist()": 1})] * 3  # the step's losses, in one transfer


def test_the_8bit_step_without_waits_learns_exactly_what_bitsandbytes_own_step_does(monkeypatch):
    import bitsandbytes as bnb

    waits = []
    monkeypatch.setattr(bnb_optimizer, "sync_gpu", lambda tensor: waits.append(tensor))
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
              for _ in range(3)]
    for model in models[1:]:
        model.load_state_dict(models[0].state_dict())
    ours = adamw8bit_without_syncs()
    # The third steps each tensor with an optimizer of its own, through step_one (as fused_backward does).
    optimizers = [bnb.optim.AdamW8bit(models[0].parameters(), lr=1e-3), ours(models[1].parameters(), lr=1e-3),
                  PerTensorOptimizer(models[2].parameters(), lambda tensors: ours(tensors, lr=1e-3))]
    for step in range(5):
        inputs = torch.randn(8, 64)
        for model, optimizer in zip(models, optimizers):
            model(inputs).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        if step == 0:
            assert len(waits) == 4  # bitsandbytes' own step waited once per tensor; ours not at all
    for model in models[1:]:
        assert all(torch.equal(a, b) for a, b in zip(models[0].state_dict().values(), model.state_dict().values()))
    states = [[s for p, s in optimizer.state.items()] for optimizer in optimizers[:2]]
    assert all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
               for a, b in zip(*states))
    assert any(state["state1"].dtype == torch.uint8 for state in states[1])  # 8-bit moments: the 8-bit step ran


def test_adamw_uses_the_fused_kernel_on_a_gpu(tmp_path):
    from trainer.optim import make_optimizer

    params = [torch.nn.Parameter(torch.randn(4))]
    cfg = run_config(tmp_path, optimizer="adamw")
    assert not make_optimizer(cfg, params, torch.device("cpu")).defaults.get("fused")
    with emulating_gpu(24 * GIB):
        assert make_optimizer(cfg, params, torch.device("cpu")).defaults["fused"]


def test_nested_phases_report_their_own_gpu_peaks(monkeypatch):
    class FakeAllocator:  # torch.cuda's peak counters, which a nested phase resets
        live = peak = reserved_peak = 0

        def allocate(self, gib):
            self.live += gib * GIB
            self.peak, self.reserved_peak = max(self.peak, self.live), max(self.reserved_peak, self.live + GIB)

        def reset(self, device=None):
            self.peak, self.reserved_peak = self.live, self.live + GIB

    cuda = FakeAllocator()
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: cuda.peak)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: cuda.reserved_peak)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", cuda.reset)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    reports = {}

    class Reports(Watcher):
        def exited(self, phase, report):
            reports[phase.name] = (report.peak_allocated / GIB, report.peak_reserved / GIB)

    with phases.watching(Reports()), Phase("training", "cuda"):
        cuda.allocate(5)
        cuda.allocate(-3)  # the training's peak (5 GiB) is behind it when previews start
        with Phase("previews", "cuda"):
            cuda.allocate(1)
            cuda.allocate(-1)
    assert reports == {"previews": (3, 4), "training": (5, 6)}
