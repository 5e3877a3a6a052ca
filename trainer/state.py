"""Resumable training state: weights, optimizer, schedule, randomness and data position, without pickle.

Tensors go to safetensors and everything else to JSON, so resuming never unpickles a file. The folder is written
next to the output as a whole and swapped in by rename, so a crash while saving leaves the previous state usable.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

STATE_FORMAT = 1
# safetensors files, named so that ComfyUI's checkpoint lists (which take every *.safetensors) do not offer them
WEIGHTS, OPTIMIZER = "weights.tensors", "optimizer.tensors"
_TENSOR = "__tensor__"  # marks where a tensor stood in the JSON part of the optimizer state
_STANDARD = ("state", "param_groups")  # an optimizer state dict's own entries


@dataclass
class Position:
    step: int  # optimizer steps done
    epoch_order: list[int]  # dataset order of the current epoch
    epoch_pos: int  # how many items of that order were used


def state_dir_for(output: str) -> Path:
    path = Path(output)
    return path.with_name(path.stem + ".state")


def save_state(directory: Path, *, fingerprint: str, position: Position, modules: dict[str, torch.nn.Module],
               optimizer, lr_scheduler, randomness, scaler, losses: list[float], made_from: dict | None = None,
               evaluations: list[dict] = (), processes: int = 1, weights: dict | None = None,
               staged: bool = False) -> None:
    """`weights`: the modules' full state dicts by name when `modules` cannot give them (a sharded run's, gathered);
    `staged`: the other processes' optimizer shards are in staging_dir(directory) already (save_optimizer_shard)."""
    opt_tensors, opt_rest = _split_tensors(optimizer.state_dict())
    opt_tensors["randomness.generator"] = randomness.state_dict()["generator"]
    meta = {
        "format": STATE_FORMAT,
        "fingerprint": fingerprint,
        "processes": processes,  # data parallel: the global batch was this many processes' batches
        "sharded": staged,  # each process's optimizer state is its own file (trainer/sharding.py)
        "step": position.step,
        "epoch_order": position.epoch_order,
        "epoch_pos": position.epoch_pos,
        "optimizer": opt_rest,
        "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "losses": losses,
        "made_from": made_from,  # trainer/provenance.py: to say what differs when a run does not resume
        "evaluations": list(evaluations),  # trainer/evaluation.py: the scores so far
    }
    _write(directory, {WEIGHTS: _weights(modules, weights), OPTIMIZER: opt_tensors}, meta, staged)


def staging_dir(directory: Path) -> Path:
    """Where a state is written before it is swapped in."""
    return directory.with_name(directory.name + ".tmp")


def start_staging(directory: Path) -> None:
    tmp = staging_dir(directory)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)


def save_optimizer_shard(path: Path, optimizer) -> None:
    """One process's optimizer state on its own (a sharded run: each process steps its own shards)."""
    tensors, rest = _split_tensors(optimizer.state_dict())
    save_file(tensors, path, metadata={"rest": json.dumps(rest)})


def save_finished_state(directory: Path, *, fingerprint: str, position: Position,
                        modules: dict[str, torch.nn.Module], losses: list[float], made_from: dict | None = None,
                        evaluations: list[dict] = ()) -> None:
    """A run whose steps are all done but whose output could not be written: its weights only (no more steps will
    need the optimizer), so that running it again only saves."""
    meta = {"format": STATE_FORMAT, "fingerprint": fingerprint, "step": position.step, "finished": True,
            "epoch_order": position.epoch_order, "epoch_pos": position.epoch_pos, "losses": losses,
            "made_from": made_from, "evaluations": list(evaluations)}
    _write(directory, {WEIGHTS: _weights(modules)}, meta)


def _write(directory: Path, tensor_files: dict[str, dict[str, torch.Tensor]], meta: dict, staged: bool = False) -> None:
    """The whole state into a folder beside `directory`, then swapped in; a write that fails (full disk, Ctrl-C)
    leaves the previous state as it was and nothing of its own behind."""
    tmp = staging_dir(directory)
    try:
        if not staged:
            start_staging(directory)
        for name, tensors in tensor_files.items():
            save_file(tensors, tmp / name)
        (tmp / "state.json").write_text(json.dumps(meta))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_in(tmp, directory)


def _weights(modules: dict[str, torch.nn.Module], states: dict | None = None) -> dict[str, torch.Tensor]:
    states = states if states is not None else {name: module.state_dict() for name, module in modules.items()}
    return {f"{name}.{k}": v.detach().cpu().contiguous() for name, state in states.items() for k, v in state.items()}


def read_state_meta(directory: Path) -> dict | None:
    try:
        meta = json.loads((directory / "state.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if meta.get("format") == STATE_FORMAT else None


def load_state(directory: Path, meta: dict, *, modules, optimizer, lr_scheduler, randomness, scaler,
               load_weights=None, optimizer_shard: str | None = None) -> Position:
    """`load_weights(name, state)` puts a module's full weights in place when load_state_dict cannot (sharded);
    `optimizer_shard`: this process's own optimizer file (sharded, ranks other than 0)."""
    weights = load_file(directory / WEIGHTS)
    for name, module in modules.items():
        prefix = f"{name}."
        state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        if load_weights is not None:
            load_weights(name, state)
        else:
            module.load_state_dict(state)
    if meta.get("finished"):  # all steps done: nothing else is needed to save the output
        return Position(meta["step"], meta["epoch_order"], meta["epoch_pos"])
    opt_tensors = load_file(directory / OPTIMIZER)
    randomness.load_state_dict({"generator": opt_tensors.pop("randomness.generator")})
    rest = meta["optimizer"]
    if optimizer_shard:
        with safe_open(directory / optimizer_shard, "pt") as file:
            rest = json.loads(file.metadata()["rest"])
        opt_tensors = load_file(directory / optimizer_shard)
    optimizer.load_state_dict(_join_tensors(opt_tensors, rest))
    lr_scheduler.load_state_dict(meta["lr_scheduler"])
    if scaler is not None and meta["scaler"]:
        scaler.load_state_dict(meta["scaler"])
    return Position(meta["step"], meta["epoch_order"], meta["epoch_pos"])


def _split_tensors(optimizer_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state -> flat tensors for safetensors (named by their path) and the JSON-able rest.

    Entries may nest (bitsandbytes keeps its 8-bit moments in a dict per parameter), so walk them recursively."""
    tensors: dict[str, torch.Tensor] = {}

    def split(value, path: str):
        if isinstance(value, torch.Tensor):
            # own memory (bitsandbytes shares one qmap), laid out contiguous (channels_last moments are not)
            tensors[path] = value.detach().cpu().clone(memory_format=torch.contiguous_format)
            return {_TENSOR: path}
        if isinstance(value, dict):
            return {str(k): split(v, f"{path}/{k}") for k, v in value.items()}
        return value

    rest = {str(index): split(entries, f"state/{index}") for index, entries in optimizer_state["state"].items()}
    # Entries beside the two standard ones (the bf16 weights' rounding generator) are kept the same way.
    extra = {key: split(value, key) for key, value in optimizer_state.items() if key not in _STANDARD}
    return tensors, {"state": rest, "param_groups": optimizer_state["param_groups"], **extra}


def _join_tensors(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    def join(value):
        if isinstance(value, dict):
            return tensors[value[_TENSOR]] if set(value) == {_TENSOR} else {k: join(v) for k, v in value.items()}
        return value

    return {"state": {int(index): join(entries) for index, entries in rest["state"].items()},
            "param_groups": rest["param_groups"], **{k: join(v) for k, v in rest.items() if k not in _STANDARD}}


def _swap_in(tmp: Path, directory: Path) -> None:
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
