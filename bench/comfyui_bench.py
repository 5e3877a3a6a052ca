"""The example workflow in a real ComfyUI, with the process's GPU memory capped as on a smaller card: each node's peak
and each phase of the pack's run, allocated and reserved, against the card's budget.

    python bench/comfyui_bench.py --comfyui PATH/TO/ComfyUI [--caps 5.8 7.6 11.6] [--steps 40] [--class-images 200]

For each cap a fresh ComfyUI is started (its Python: --python, default the checkout's .venv) on a throw-away base
directory holding this pack, a full-size SD 1.5 of random weights (speed and memory do not depend on the values) and
5 noise photos. bench/comfyui_probe, linked in as a second custom-node folder, caps the memory
(torch.cuda.set_per_process_memory_fraction; ComfyUI's own planning is told the rest is reserved) and prints each
node's peak. example_workflows/dreambooth_personalize.json is queued as the editor queues it: Pick Rare Token, Generate
Class Priors (--class-images at --size px, 30 steps), DreamBooth Train (the text encoder trained, the preset for the
cap: 6 GB under 7 GiB, 8 GB under 11, else 12 GB; previews at the end), Load Subject Model, KSampler and decoding at
--size px. Budgets, reserved: 5.3 GiB for 5.8 (a 6 GB card), 7.0 for 7.6 (8 GB), 10.5 for 11.6 (12 GB), issue 10's.

--small runs example_workflows/dreambooth_toy.json as shipped instead (the toy model, 40 s on a CPU): the wiring,
where there is no GPU. Without CUDA ComfyUI runs with --cpu and no memory is measured.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.comfyui import ComfyUI, api_prompt, execution_errors, pack_home  # noqa: E402 (after the path above)
from bench.dreambooth_bench import WHOLE_RUN_PHASE, card_budget, preset_for_cap  # noqa: E402
from bench.models import random_bundle  # noqa: E402
from trainer.checkpoint import save_checkpoint  # noqa: E402
from trainer.presets import PRESET_NAMES, short_name  # noqa: E402

PROBE = REPO_ROOT / "bench" / "comfyui_probe"
WORKFLOW = REPO_ROOT / "example_workflows" / "dreambooth_personalize.json"
TOY_WORKFLOW = REPO_ROOT / "example_workflows" / "dreambooth_toy.json"
BASE_MODEL = "sd15-random.safetensors"
NODE_LINE = re.compile(r"\[bench\] node (\S+) (\S+): ([\d.]+) s(?:, peak ([\d.]+) GiB allocated / ([\d.]+) GiB reserved)?")


def node_preset(cap: float) -> str:
    """The Train node's memory_preset for a card that reports `cap` GiB (its own spelling, e.g. "8 GB")."""
    return {short_name(name): name for name in PRESET_NAMES}[preset_for_cap(cap)]


def personalize_prompt(object_info: dict, photos: Path, cap: float, args) -> dict:
    """The example workflow with the benchmark's settings (the rest as shipped)."""
    prompt = api_prompt(json.loads(WORKFLOW.read_text()), object_info)
    by_type = {node["class_type"]: node["inputs"] for node in prompt.values()}
    for inputs in by_type.values():
        if "ckpt_name" in inputs and not isinstance(inputs["ckpt_name"], list):
            inputs["ckpt_name"] = BASE_MODEL
    by_type["DBStudioGenerateClassPriors"].update(count=args.class_images, size=args.size, steps=30)
    by_type["DBStudioTrain"].update(instance_folder=str(photos), steps=args.steps, resolution=args.size,
                                    train_text_encoder=True, memory_preset=node_preset(cap), output_name="bench-dog",
                                    overwrite=True)
    by_type["EmptyLatentImage"].update(width=args.size, height=args.size, batch_size=1)
    return prompt


def write_photos(folder: Path, size: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")


def run_capped(args, cap: float, work: Path) -> dict:
    """One fresh ComfyUI capped at `cap` GiB, the workflow queued once: its nodes' and phases' peaks."""
    base = work / f"comfyui-{cap:g}GiB"
    checkpoints = pack_home(base, PROBE)
    cpu = not torch.cuda.is_available()
    if not args.small:
        (checkpoints / BASE_MODEL).symlink_to(work / BASE_MODEL)
        write_photos(base / "photos", max(args.size, 64))
    server = ComfyUI(Path(args.comfyui), base, *(["--cpu"] if cpu else []), python=args.python,
                     env={"DREAMBOOTH_BENCH_CAP_GIB": "" if cpu else str(cap)})
    try:
        prompt = (api_prompt(json.loads(TOY_WORKFLOW.read_text()), server.object_info) if args.small
                  else personalize_prompt(server.object_info, base / "photos", cap, args))
        started = time.monotonic()
        entry = server.wait(server.queue(prompt), timeout=args.timeout)
        seconds = time.monotonic() - started
        log = server.log()
    finally:
        server.stop()
    return {"cap_gib": cap, "budget_gib": card_budget(cap), "cpu": cpu, "seconds": seconds,
            "status": entry["status"]["status_str"], "errors": execution_errors(entry),
            "nodes": read_log(log, {key: node["class_type"] for key, node in prompt.items()}),
            "workflow": TOY_WORKFLOW.name if args.small else WORKFLOW.name}


def read_log(log: str, classes: dict[str, str]) -> list[dict]:
    """The nodes in the order they finished, each with its peak and the pack's phases it ran (the phases a node logs
    come before the probe's line for it)."""
    def gib(value: str) -> float | None:
        return float(value) if value else None

    nodes, phases = [], []
    for line in log.splitlines():
        if match := NODE_LINE.search(line):
            node_id, name, seconds, allocated, reserved = match.groups()
            nodes.append({"node": classes.get(node_id, name), "id": node_id, "seconds": float(seconds),
                          "allocated_gib": gib(allocated), "reserved_gib": gib(reserved), "phases": phases})
            phases = []
        elif match := WHOLE_RUN_PHASE.search(line):
            name, seconds, allocated, reserved = match.groups()
            phases.append({"phase": name, "seconds": float(seconds), "allocated_gib": gib(allocated),
                           "reserved_gib": gib(reserved)})
    return nodes


def table(runs: list[dict]) -> str:
    lines = ["| cap GiB | node | pack phase | s | alloc GiB | reserved GiB | within budget |",
             "|---:|---|---|---:|---:|---:|---|"]

    def gib(value: float | None) -> str:
        return "—" if value is None else f"{value:.2f}"

    def row(run, node, phase, item):
        reserved = item["reserved_gib"]
        ok = "n/a" if run["cpu"] or reserved is None else (
            "yes" if reserved <= run["budget_gib"] else f"NO (> {run['budget_gib']:g})")
        return (f"| {run['cap_gib']:g} | {node} | {phase} | {item['seconds']:.1f} | {gib(item['allocated_gib'])} | "
                f"{gib(reserved)} | {ok} |")

    for run in runs:
        for node in run["nodes"]:
            lines += [row(run, node["node"], phase["phase"], phase) for phase in node["phases"]]
            lines.append(row(run, node["node"], "(whole node)" if node["phases"] else "", node))
        if run["status"] != "success":
            lines.append(f"| {run['cap_gib']:g} | failed: {run['errors'] or run['status']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", required=True, help="a ComfyUI checkout (its main.py)")
    parser.add_argument("--python", help="ComfyUI's Python (default: the checkout's .venv/bin/python)")
    parser.add_argument("--caps", type=float, nargs="+", default=[5.8, 7.6, 11.6], help="GiB; one run each")
    parser.add_argument("--steps", type=int, default=40, help="training steps")
    parser.add_argument("--class-images", type=int, default=200)
    parser.add_argument("--size", type=int, default=512, help="px: class images, training and the KSampler's image")
    parser.add_argument("--timeout", type=float, default=1800, help="s per workflow")
    parser.add_argument("--small", action="store_true", help="the toy workflow as shipped (a CPU check)")
    parser.add_argument("--out", action="append", default=[], help="write the table (.md) or all (.json)")
    args = parser.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory(prefix="comfyui_bench_") as folder:
        work = Path(folder)
        if not args.small:
            print("a full-size SD 1.5 of random weights, saved once", file=sys.stderr, flush=True)
            save_checkpoint(random_bundle("sd1", small=False), work / BASE_MODEL, {}, dtype=torch.float16)
        for cap in args.caps:
            print(f"[ComfyUI, capped at {cap:g} GiB] {'the toy workflow' if args.small else WORKFLOW.name}",
                  file=sys.stderr, flush=True)
            runs.append(run_capped(args, cap, work))
            print(table(runs[-1:]), file=sys.stderr, flush=True)
    text = table(runs)
    print(text)
    for path in map(Path, args.out):
        path.write_text(json.dumps(runs, indent=1) if path.suffix == ".json" else text + "\n")
    return 1 if over_budget(runs) or any(run["status"] != "success" for run in runs) else 0


def over_budget(runs: list[dict]) -> list[str]:
    """What went over its run's budget: nodes, and the pack's phases (node/phase), with the cap."""
    return [f"{node['node']}{'/' + item['phase'] if 'phase' in item else ''} at {run['cap_gib']:g} GiB"
            for run in runs for node in run["nodes"] for item in (node, *node["phases"])
            if item["reserved_gib"] is not None and item["reserved_gib"] > run["budget_gib"]]


if __name__ == "__main__":
    sys.exit(main())
