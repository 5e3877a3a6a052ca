"""The ComfyUI side of a run: model folders, progress bar, live messages to the page, cancel, memory."""
from __future__ import annotations

import gc
import logging
from pathlib import Path

import comfy.model_management
import comfy.utils
import folder_paths
from server import PromptServer

from ..trainer.callbacks import Callbacks, StepInfo
from ..trainer.hosts import StepLog
from .comfy_io import RunLog, node_message

Interrupted = comfy.model_management.InterruptProcessingException
OUTPUT_SUBFOLDER = "dreambooth"  # trained checkpoints land in models/checkpoints/dreambooth/

# The pack's toy base model is offered in the pack's checkpoint lists under this name, read from the pack itself: it
# needs no copy in models/checkpoints, and it stays out of ComfyUI's own Load Checkpoint, which cannot load it.
TOY_BASE = "DreamBooth Studio toy base (32 px demo)"
TOY_BASE_PATH = Path(__file__).resolve().parents[1] / "trainer" / "toy" / "base.safetensors"


def checkpoint_names() -> list[str]:
    """ComfyUI's checkpoints, then the toy base (last, so a real checkpoint stays the default)."""
    return folder_paths.get_filename_list("checkpoints") + [TOY_BASE]


def checkpoint_path(name: str) -> str:
    return str(TOY_BASE_PATH) if name == TOY_BASE else folder_paths.get_full_path_or_raise("checkpoints", name)


def output_folder() -> str:
    return f"{folder_paths.get_folder_paths('checkpoints')[0]}/{OUTPUT_SUBFOLDER}"


def prior_cache_folder() -> str:
    return f"{folder_paths.get_output_directory()}/dreambooth_priors"


def device() -> str:
    return str(comfy.model_management.get_torch_device())


def free_comfy_models() -> None:
    """Give the GPU to training: ComfyUI's own loaded models leave first."""
    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()


def release() -> None:
    """Hand back the memory of what the pack loaded. The engine's calls keep no reference to their models once they
    return (trainer/api.py), so collecting and emptying the cache frees all of it."""
    gc.collect()
    comfy.model_management.soft_empty_cache()


# Each Train node's last run (server node id -> its log), served to a page that opens later.
RUNS: dict[str, RunLog] = {}


def add_routes() -> None:
    """GET /dreambooth/runs: {node id: the messages of its last run} (web/dreambooth_progress.js, on load)."""
    from aiohttp import web

    @PromptServer.instance.routes.get("/dreambooth/runs")
    async def last_runs(request):
        return web.json_response({node: list(run.events) for node, run in list(RUNS.items())})


def log(message: str) -> None:
    logging.info("[DreamBooth] %s", message)


class ComfyCallbacks(Callbacks):
    """Progress bar every step, a status line and loss points for web/, a step line in the server log now and then
    (for headless runs), previews, and the stop button."""

    def __init__(self, node_id: str, total: int, renames: dict[str, str] | None = None):
        self.node_id = node_id
        self.renames = renames or {}  # the engine's setting names -> the node's inputs
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)
        self.stop_requested = False
        self.step_log = StepLog()

    def send(self, event: str, **data) -> None:
        RUNS.setdefault(self.node_id, RunLog()).add(event, data)
        PromptServer.instance.send_sync(f"dreambooth.{event}", {"node": self.node_id, **data})

    def on_step(self, info: StepInfo) -> None:
        self.update_bar(info.step, info.total)
        line = self.step_log.line(info)
        if line:
            log(line)  # the server log only: the page has the live chart
        self.send("progress", step=info.step, total=info.total, loss=info.loss, instance_loss=info.instance_loss,
                  prior_loss=info.prior_loss, lr=info.lr, elapsed_s=info.elapsed_s, eta_s=info.eta_s)

    def update_bar(self, value: int, total: int, preview=None) -> None:
        # ComfyUI's progress hook raises on the stop button (and clears the flag); remember it instead, so the
        # loop can save a resumable state before it stops.
        try:
            self.bar.update_absolute(value, total, preview)
        except Interrupted:
            self.stop_requested = True

    def should_stop(self) -> bool:
        return self.stop_requested or comfy.model_management.processing_interrupted()

    def on_samples(self, step: int, images: list) -> None:
        if images:
            self.update_bar(self.bar.current, self.bar.total, ("JPEG", images[0], 512))

    def on_evaluation(self, scores, best) -> None:
        pres = "not measured (needs a DINO model)" if scores.pres is None else f"{scores.pres:.3f}"
        chosen = f"best so far: step {best.best.step}" if best.best else "the base model's baseline"
        self.log(f"Step {scores.step}: subject fidelity {scores.subject_fidelity:.3f}, PRES {pres} ({chosen})")

    def log(self, message: str) -> None:
        message = node_message(message, self.renames)
        log(message)
        self.send("status", text=message)
