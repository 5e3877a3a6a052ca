"""bf16_weights: trained weights kept in bf16 with stochastic rounding. The rounding is unbiased and keeps updates far
below bf16's spacing, training learns what fp32 weights learn (statistically; round-to-nearest does not), a resumed
run is bit-exact, the only fp32 copy of a weight is one tensor's scratch, and the saved checkpoint holds the weights.

The thresholds of the training comparison were measured on this tiny model (numbers beside each assertion)."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import trainer.device
import trainer.fused
import trainer.loop
from trainer.__main__ import main
from trainer.callbacks import TrainingCancelled
from trainer.checkpoint import read_metadata
from trainer.config import ConfigError
from trainer.fused import FusedBackward, PerTensorOptimizer, stochastic_round_to_bf16_
from trainer.loop import train
from trainer.models import load_model
from trainer.state import OPTIMIZER, WEIGHTS, state_dir_for
from tests.test_fused import same_weights
from tests.test_train import CrashAt, StopAfter, config, images  # noqa: F401 (fixture)
from tests.tiny import tiny_bundle

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread in this module


def bits(values) -> torch.Tensor:
    """fp32 values from their bit patterns (int32)."""
    return torch.tensor(values, dtype=torch.int64).to(torch.int32).view(torch.float32)


def sr(src: torch.Tensor, seed: int = 0) -> torch.Tensor:
    return stochastic_round_to_bf16_(torch.empty(src.shape, dtype=torch.bfloat16), src,
                                     torch.Generator().manual_seed(seed))


def round_to_nearest(dst, src, generator=None, *, noise=None):
    """The control: torch's own fp32 -> bf16 conversion (round to nearest even)."""
    return dst.copy_(src)


def round_toward_zero(dst, src, generator=None, *, noise=None):
    """A biased control: drop the low 16 bits."""
    return dst.copy_((src.view(torch.int32) & -65536).view(torch.float32))


# --- 1. the rounding itself ------------------------------------------------------------------------------------------

def test_values_already_in_bf16_come_back_unchanged():
    values = torch.cat([torch.randn(10_000, generator=torch.Generator().manual_seed(1)) * 10.0 ** torch.arange(
        -20, 20, 4).repeat_interleave(1000), torch.tensor([0.0, -0.0, float("inf"), float("-inf")])]).bfloat16()
    specials = torch.tensor([0x0001, 0x8001, 0x007F, 0x0080, 0x7F7F, 0xFF7F], dtype=torch.int32).to(torch.int16)
    values = torch.cat([values, specials.view(torch.bfloat16)])  # subnormals, the smallest normal, +-the largest
    for seed in range(3):
        rounded = sr(values.float(), seed)
        assert torch.equal(rounded.view(torch.int16), values.view(torch.int16))  # bit for bit, signed zeros too


@pytest.mark.parametrize("low_bits, fraction", [(0x3FC00000, 0.3), (0xBFC00000 - (1 << 32), 0.7),  # 1.5, -1.5
                                                (0x3F7F0000, 0.3),  # 0.99609375, whose upper neighbour is 1.0
                                                (0x00010000, 0.55)])  # a subnormal
def test_the_mean_of_many_roundings_is_the_value_itself(low_bits, fraction):
    lo = bits([low_bits])
    hi = bits([low_bits + 0x10000])  # the next bf16 value away from zero
    x = bits([low_bits + round(fraction * 0x10000)])  # fraction of the way from lo to hi
    f = ((x.double() - lo.double()) / (hi.double() - lo.double())).item()
    n = 200_000
    rounded = sr(x.repeat(n)).double()
    assert set(rounded.unique().tolist()) == {lo.item(), hi.item()}  # always one of its two neighbours, both seen
    gap = abs(hi.item() - lo.item())
    standard_error = gap * math.sqrt(f * (1 - f) / n)
    assert abs(rounded.mean().item() - x.item()) < 4 * standard_error
    assert abs((rounded == hi.item()).double().mean().item() - f) < 4 * math.sqrt(f * (1 - f) / n)
    # round to nearest is off by min(f, 1 - f) of the gap every time: hundreds of standard errors
    nearest = x.bfloat16().double().item()
    assert abs(nearest - x.item()) > 100 * standard_error


def test_nan_stays_nan_and_infinities_stay():
    nans = bits([0x7FC00000, 0x7F800001, 0x7F80FFFF, 0x7FFFFFFF, -1, 0xFF800001 - (1 << 32)])  # quiet, low payloads
    rounded = sr(nans.repeat(1000))
    assert rounded.isnan().all()  # a payload in the low bits alone would carry to inf or wrap around to 0
    infs = sr(torch.tensor([float("inf"), float("-inf")]).repeat(1000))
    assert torch.equal(infs.float(), torch.tensor([float("inf"), float("-inf")]).repeat(1000))
    # fp32's largest lies between bf16's largest and inf (where round to nearest goes): one of those two
    largest = sr(torch.tensor([torch.finfo(torch.float32).max]).repeat(1000)).float()
    assert set(largest.unique().tolist()) <= {torch.finfo(torch.bfloat16).max, float("inf")}


def test_the_rounding_is_repeatable_from_its_generator_and_leaves_the_source():
    src = torch.randn(5000, generator=torch.Generator().manual_seed(2))
    kept = src.clone()
    noise = torch.empty(5000)
    a = stochastic_round_to_bf16_(torch.empty(5000, dtype=torch.bfloat16), src, torch.Generator().manual_seed(7),
                                  noise=noise)
    assert torch.equal(src, kept)
    assert torch.equal(a, sr(src, 7)) and not torch.equal(a, sr(src, 8))
    with pytest.raises(ValueError, match="fp32 source and a bf16 destination"):
        stochastic_round_to_bf16_(torch.empty(3), src[:3])


# --- 2. small updates survive -----------------------------------------------------------------------------------------

def test_a_thousand_updates_far_below_bf16_spacing_add_up():
    n, steps, update = 100_000, 1000, 1e-5
    weights = torch.ones(n, dtype=torch.bfloat16)
    nearest = torch.ones(n, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        stochastic_round_to_bf16_(weights, weights.float() + update, generator)
        round_to_nearest(nearest, nearest.float() + update)
    # In [1, 2) fp32's spacing is 2^-23, so every step adds exactly 84 * 2^-23 (1e-5 rounded): the expected end.
    step = (torch.tensor(1.0) + update).item() - 1.0
    assert step == 84 * 2 ** -23
    expected = 1.0 + steps * step  # 1.0100136
    # Each step rounds up by bf16's spacing 2^-7 with probability p = step / 2^-7, else stays: variance per weight
    # steps * spacing^2 * p(1-p) (sd 0.0088), over n independent weights sd 2.8e-5 for the mean.
    spacing = 2 ** -7
    p = step / spacing
    sd_of_mean = spacing * math.sqrt(steps * p * (1 - p) / n)
    assert abs(weights.double().mean().item() - expected) < 4 * sd_of_mean
    assert torch.equal(nearest, torch.ones(n, dtype=torch.bfloat16))  # round to nearest lost all 1000 updates


# --- 3. training learns what fp32 weights learn -----------------------------------------------------------------------

# A learning rate at which AdamW's updates (about the learning rate each) are mostly below half of bf16's spacing near
# the weights, so round to nearest loses them; bf16 autocast in every run, as bf16_weights computes in it.
EQUIVALENCE = dict(learning_rate=3e-5, max_train_steps=30, mixed_precision="bf16")


def bf16_start():
    """The tiny model with UNet weights that bf16 holds exactly: the fp32 and the bf16 runs start from the same."""
    bundle = tiny_bundle("sd1")
    with torch.no_grad():
        for p in bundle.unet.parameters():
            p.copy_(p.bfloat16().float())
    return bundle


def flat(module) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in module.parameters()])


def movement(images, path, monkeypatch, rounding=None, **settings) -> tuple[torch.Tensor, torch.Tensor]:
    bundle = bf16_start()
    start = flat(bundle.unet)
    with monkeypatch.context() as patch:
        if rounding is not None:
            patch.setattr(trainer.fused, "stochastic_round_to_bf16_", rounding)
        train(config(images, path, **EQUIVALENCE, **settings), bundle=bundle)
    return flat(bundle.unet) - start, start


def agreement(moved: torch.Tensor, reference: torch.Tensor, start: torch.Tensor) -> dict:
    """How the bf16 run's weight movement compares with the fp32 run's, over all UNet weights."""
    error = moved - reference
    n = error.numel()
    shrink = error * start.sign()  # < 0 on average if the weights were pulled towards zero

    def z(x):  # mean over its standard error, as if the weights were independent
        return (x.mean() / (x.std() / math.sqrt(n))).item()

    return dict(
        correlation=torch.corrcoef(torch.stack([moved, reference]))[0, 1].item(),
        slope=(moved @ reference / (reference @ reference)).item(),  # least squares moved ~ slope * reference
        moved=(moved != 0).double().mean().item(),
        z_mean=z(error), z_shrink=z(shrink))


@pytest.mark.slow
@pytest.mark.parametrize("optimizer, fused", [("adamw", False), ("adamw", True), ("adamw8bit", False),
                                              ("adamw8bit", True)])
def test_bf16_weights_learn_what_fp32_weights_learn(images, tmp_path, monkeypatch, optimizer, fused):
    if optimizer == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    settings = dict(optimizer=optimizer, fused_backward=fused)  # max_grad_norm 1.0: clipping on in every run
    reference, start = movement(images, tmp_path / "fp32", monkeypatch, **settings)
    assert (reference != 0).double().mean() > 0.99  # fp32 moves (almost) every weight (measured 0.99999)
    bf16, _ = movement(images, tmp_path / "sr", monkeypatch, bf16_weights=True, **settings)
    nearest, _ = movement(images, tmp_path / "rtn", monkeypatch, round_to_nearest, bf16_weights=True, **settings)
    sr_stats, rtn_stats = agreement(bf16, reference, start), agreement(nearest, reference, start)

    # Measured for all four combinations: correlation 0.736, slope 0.990-0.992, 75% of the weights moved, |z| of the
    # mean difference and of the pull towards zero at most 1.8. The bf16 run is the fp32 run plus noise uncorrelated
    # with it: correlation = 1 / sqrt(1 + |noise|^2 / |movement|^2) holds to 0.004. The slope's 1% short of 1 is not
    # the rounding: an fp32 run started from weights perturbed by +-half a bf16 spacing has it too (0.9905); it is
    # how this training reacts to any perturbation. The z thresholds are 5, not 4: neighbouring weights' errors are
    # not independent, which the standard error assumes.
    assert sr_stats["correlation"] > 0.65
    assert 0.95 < sr_stats["slope"] < 1.05  # what fp32 learned arrives in full, in expectation
    assert abs(sr_stats["z_mean"]) < 5 and abs(sr_stats["z_shrink"]) < 5  # no drift, no pull towards zero
    assert sr_stats["moved"] > 0.6
    # Round to nearest (measured: correlation 0.35, slope 0.13, 16% moved) loses most of what was learned: its
    # error is the movement itself, negated, for most weights.
    assert rtn_stats["correlation"] < 0.5 and rtn_stats["slope"] < 0.5 and rtn_stats["moved"] < 0.3
    assert sr_stats["correlation"] > rtn_stats["correlation"] + 0.25

    if optimizer == "adamw" and not fused:
        # The drift checks have teeth: rounding toward zero (measured: z of the pull towards zero -606) fails them.
        truncated, _ = movement(images, tmp_path / "trunc", monkeypatch, round_toward_zero, bf16_weights=True,
                                **settings)
        assert agreement(truncated, reference, start)["z_shrink"] < -50


# --- 4. resume --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer, fused, interrupt", [("adamw", False, StopAfter), ("adamw8bit", True, CrashAt)])
def test_cancelled_and_resumed_run_ends_with_the_same_weights(images, tmp_path, monkeypatch, optimizer, fused,
                                                              interrupt):
    if optimizer == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    settings = dict(bf16_weights=True, fused_backward=fused, optimizer=optimizer, max_train_steps=6,
                    checkpoint_every=2, batch_size=2, train_text_encoder=True, lr_scheduler="linear")
    straight = tiny_bundle("sd1")
    train(config(images, tmp_path / "straight", **settings), bundle=straight)

    cfg = config(images, tmp_path / "resumed", **settings)
    with pytest.raises((RuntimeError, TrainingCancelled)):
        train(cfg, bundle=tiny_bundle("sd1"), callbacks=interrupt(3))
    state = state_dir_for(cfg.output)
    assert all(v.dtype == torch.bfloat16 for v in load_file(state / WEIGHTS).values() if v.is_floating_point())
    assert "stochastic_rounding/rounds" in load_file(state / OPTIMIZER)
    assert "stochastic_rounding" in json.loads((state / "state.json").read_text())["optimizer"]
    resumed = tiny_bundle("sd1")
    assert train(cfg, bundle=resumed).resumed_from == (2 if interrupt is CrashAt else 3)
    assert same_weights(straight, resumed)

    if interrupt is StopAfter:
        # Teeth: a resume that restarted the rounding's random stream instead of restoring it ends elsewhere.
        cfg = config(images, tmp_path / "forgetful", **settings)
        with pytest.raises(TrainingCancelled):
            train(cfg, bundle=tiny_bundle("sd1"), callbacks=interrupt(3))
        load = PerTensorOptimizer.load_state_dict

        def load_but_reseed(self, state_dict):
            load(self, state_dict)
            self.rounds = [0] * len(self.rounds)

        monkeypatch.setattr(PerTensorOptimizer, "load_state_dict", load_but_reseed)
        forgetful = tiny_bundle("sd1")
        assert train(cfg, bundle=forgetful).resumed_from == 3
        assert not same_weights(straight, forgetful)


# --- 5. memory --------------------------------------------------------------------------------------------------------

def held_tensors(root) -> list[torch.Tensor]:
    """Every tensor reachable from an object through attributes, lists, tuples and dicts (keys too)."""
    found, seen, stack = [], set(), [root]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set)):
            stack.extend(item)
        elif isinstance(item, torch.optim.Optimizer):
            stack.extend(vars(item).values())
    return found


def storage(t: torch.Tensor) -> tuple[int, int]:
    return t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()


@pytest.mark.parametrize("optimizer, fused", [("adamw", False), ("adamw8bit", True)])
def test_weights_are_bf16_and_the_only_fp32_copy_is_one_tensor(images, tmp_path, monkeypatch, optimizer, fused):
    if optimizer == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    made = []
    real_make = trainer.loop.make_optimizer
    monkeypatch.setattr(trainer.loop, "make_optimizer", lambda *a: made.append(real_make(*a)) or made[-1])
    bundle = tiny_bundle("sd1")
    train(config(images, tmp_path, bf16_weights=True, optimizer=optimizer, fused_backward=fused,
                 train_text_encoder=True, max_train_steps=2), bundle=bundle)
    optimizer_object, = made
    assert isinstance(optimizer_object, FusedBackward if fused else PerTensorOptimizer)

    params = [p for m in (bundle.unet, bundle.text_encoder) for p in m.parameters()]
    assert all(p.dtype == torch.bfloat16 and p.element_size() == 2 for p in params)
    largest = max(p.numel() for p in params)
    model = {storage(p)[0] for p in params}
    moments = {storage(t) for inner in optimizer_object.optimizers for t in held_tensors(list(inner.state.values()))}
    held = {storage(t) for t in held_tensors(vars(optimizer_object))} - moments
    held = {(ptr, size) for ptr, size in held if ptr not in model}
    # Besides the model's weights and the moments: one fp32 weight and one fp32 gradient of the largest tensor's size,
    # which every tensor's shadow (what the optimizer steps) shares; nothing else but scalars and bitsandbytes'
    # 256-entry quantization maps (1 KiB).
    shadows = {storage(s) for s in optimizer_object.shadows}
    assert shadows == {(optimizer_object._weight_scratch.data_ptr(), 4 * largest)}
    assert sorted(size for _, size in held if size > 1024) == [4 * largest, 4 * largest]
    # (For SD 1.5's UNet: 2 x 118 MB beside 1.7 GB of bf16 weights, where fp32 weights take 3.4 GB; its largest
    # tensor has 29.5M of its 860M weights. Here the tiny text encoder's token embedding is most of the model.)

    states = [inner.state[shadow] for inner, shadow in zip(optimizer_object.optimizers, optimizer_object.shadows)]
    assert all(state for state in states)  # every tensor was stepped
    for state, p in zip(states, params):
        if optimizer == "adamw":  # fp32 moments, the size of the weight
            assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
            assert state["exp_avg"].shape == p.shape
        elif p.numel() >= 4096:  # bitsandbytes keeps 8-bit moments for tensors of 4096 elements and more
            assert state["state1"].dtype == state["state2"].dtype == torch.uint8


# --- 6. the saved checkpoint ------------------------------------------------------------------------------------------

def test_the_saved_fp16_checkpoint_holds_the_trained_weights(images, tmp_path):
    bundle = tiny_bundle("sd1")
    result = train(config(images, tmp_path, bf16_weights=True, train_text_encoder=True, max_train_steps=2),
                   bundle=bundle)
    loaded = load_model(result.output)
    for name in ("unet", "text_encoder"):
        trained = {k: v.float() for k, v in getattr(bundle, name).state_dict().items()}
        saved = getattr(loaded, name).state_dict()
        for key, value in trained.items():
            if not value.is_floating_point():
                continue
            # bf16's 8 significant bits fit in fp16's 11: equal, except below fp16's normal range (6.1e-5), where
            # fp16 keeps a spacing of 2^-24 and rounds to it.
            tolerance = torch.where(value.abs() < 2 ** -14, 2.0 ** -25, 0.0)
            assert ((saved[key].float() - value).abs() <= tolerance).all(), (name, key)
    assert json.loads(read_metadata(result.output)["dreambooth.train_config"])["bf16_weights"] is True


# --- settings ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp16", "no"])
def test_precisions_other_than_bf16_are_refused_with_the_fix(images, tmp_path, precision):
    with pytest.raises(ConfigError, match="bf16_weights.*mixed_precision 'bf16'"):
        config(images, tmp_path, bf16_weights=True, mixed_precision=precision).validate()


def test_a_gpu_without_bf16_is_refused_before_loading(images, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer.device, "resolve_precision", lambda name, device: torch.float16)
    with pytest.raises(ConfigError, match="bf16_weights: this GPU has no bf16"):
        train(config(images, tmp_path, bf16_weights=True, mixed_precision="auto"), bundle=tiny_bundle("sd1"))


def test_after_backward_the_clipping_is_over_all_gradients():
    big, small = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(3))
    g_big, g_small = torch.tensor([6.0, 8.0, 0.0, 0.0]), torch.tensor([0.3, 0.4, 0.0])  # norms 10 and 0.5
    opt = PerTensorOptimizer([big, small], lambda tensors: torch.optim.SGD(tensors, lr=1.0), max_grad_norm=1.0)
    ((big * g_big).sum() + (small * g_small).sum()).backward()
    opt.step()
    total = math.hypot(10.0, 0.5)
    assert torch.allclose(-big.detach(), g_big / total) and torch.allclose(-small.detach(), g_small / total)

    # bf16 weights: the same, up to one bf16 spacing, stepped through the fp32 shadows
    big16, small16 = (torch.nn.Parameter(torch.zeros(n, dtype=torch.bfloat16)) for n in (4, 3))
    opt = PerTensorOptimizer([big16, small16], lambda tensors: torch.optim.SGD(tensors, lr=1.0), max_grad_norm=1.0,
                             rounding_seed=0)
    ((big16 * g_big.bfloat16()).sum() + (small16 * g_small.bfloat16()).sum()).backward()
    assert big16.grad.dtype == torch.bfloat16
    opt.step()
    for param, grad in ((big16, g_big), (small16, g_small)):
        assert ((-param.float() - grad / total).abs() <= 2 ** -8 * (grad / total).abs()).all()
    assert all(s.dtype == torch.float32 for s in opt.shadows)


def bf16_tensors_and_gradients(seed: int = 0) -> tuple[list[torch.nn.Parameter], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    sizes = (300, 7, 1000)
    params = [torch.nn.Parameter(torch.randn(n, generator=generator).bfloat16()) for n in sizes]
    return params, [1e-3 * torch.randn(n, generator=generator).bfloat16() for n in sizes]


def test_each_tensor_rounds_with_bits_of_its_own_whatever_order_the_tensors_are_stepped_in():
    # fused_backward steps tensors in the order their gradients complete, and sharding changes that order: the
    # rounding must not depend on it (with one generator drawn from in turn, every tensor's bits would change).
    def stepped(order: list[int]) -> list[torch.Tensor]:
        params, grads = bf16_tensors_and_gradients()
        opt = PerTensorOptimizer(params, lambda tensors: torch.optim.SGD(tensors, lr=1.0), rounding_seed=5)
        for _ in range(3):
            for i in order:
                params[i].grad = grads[i]
                opt.step_tensor(i)
                params[i].grad = None
        return [p.detach().clone() for p in params]

    forward, backward = stepped([0, 1, 2]), stepped([2, 1, 0])
    start, _ = bf16_tensors_and_gradients()
    assert all(not torch.equal(a, p) for a, p in zip(forward, start))  # they moved
    assert all(torch.equal(a, b) for a, b in zip(forward, backward))


def test_a_state_saved_with_one_rounding_generator_resumes_its_counts_from_the_steps():
    # States saved before per-tensor rounding seeds held one generator's state; such a run goes on (with fresh bits)
    # from each tensor's step count, so that no tensor reuses the bits of a round it already had.
    params, grads = bf16_tensors_and_gradients()
    opt = PerTensorOptimizer(params, lambda tensors: torch.optim.AdamW(tensors, foreach=False), rounding_seed=5)
    for i in (0, 0, 2):
        params[i].grad = grads[i]
        opt.step_tensor(i)
    saved = opt.state_dict()
    assert saved["stochastic_rounding"]["rounds"].tolist() == [2, 0, 1]
    saved["stochastic_rounding"] = {"generator": torch.Generator().get_state()}
    again = PerTensorOptimizer(bf16_tensors_and_gradients()[0], lambda tensors: torch.optim.AdamW(tensors),
                               rounding_seed=5)
    again.load_state_dict(saved)
    assert again.rounds == [2, 0, 1]


def test_the_command_line_offers_it(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--bf16-weights" in text and "rounded stochastically" in text
