"""The WebUI's side of a run (Automatic1111 1.x and Forge): its checkpoint list and folders, its device, and its
loaded model, which leaves the GPU while the engine works."""
from __future__ import annotations

import gc
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from modules import devices, paths, sd_models, shared

OUTPUT_SUBFOLDER = "dreambooth"  # trained checkpoints land in models/Stable-diffusion/dreambooth/
EVALUATORS = "dreambooth_evaluators"  # DINO / CLIP models for evaluate_every, as the ComfyUI nodes' folder
log = logging.getLogger("dreambooth")
# Forge moves its models onto the GPU for each generation through its own memory manager (which its modules.devices
# imports); its sd_models.send_model_to_cpu / send_model_to_device do nothing.
FORGE_MEMORY = getattr(devices, "memory_management", None)


class WebUI:
    def checkpoint_names(self) -> list[str]:
        """The titles of the WebUI's checkpoint list, as its own checkpoint menu shows them."""
        return sorted(sd_models.checkpoints_list)

    def checkpoint_path(self, name: str) -> str:
        info = sd_models.checkpoints_list.get(name) or sd_models.get_closet_checkpoint_match(name)
        if info is None:
            raise ValueError(f"Base checkpoint '{name}' is not in the WebUI's checkpoint list: choose one from the "
                             "list (press its refresh button after adding files to models/Stable-diffusion).")
        return info.filename

    def checkpoint_title(self, path: str) -> str:
        match = next((info.title for info in sd_models.checkpoints_list.values()
                      if os.path.abspath(info.filename) == os.path.abspath(path)), None)
        return match or Path(path).name

    def refresh_checkpoints(self) -> None:
        selected = shared.opts.data.get("sd_model_checkpoint")
        sd_models.list_models()
        if selected is not None:  # list_models puts --ckpt's file back as the selection; the user's choice stays
            shared.opts.data["sd_model_checkpoint"] = selected

    def output_folder(self) -> Path:
        return Path(shared.cmd_opts.ckpt_dir or sd_models.model_path) / OUTPUT_SUBFOLDER

    def work_folder(self) -> Path:
        """Uploaded photos and cached class images, beside the WebUI's other outputs."""
        return Path(paths.data_path) / "outputs" / "dreambooth"

    def evaluator_folders(self) -> list[Path]:
        return [Path(paths.models_path) / EVALUATORS]

    def device(self) -> str:
        return str(devices.device)

    @contextmanager
    def gpu_borrowed(self) -> Iterator[None]:
        """The WebUI's loaded model off the GPU while the engine works, and back afterwards (also after an error)."""
        model = None
        if FORGE_MEMORY is not None:
            FORGE_MEMORY.unload_all_models()
            log.info("[DreamBooth] The WebUI's models are off the GPU while DreamBooth works; Forge loads them back "
                     "for its next image.")
        elif sd_models.model_data.sd_model is not None:  # not shared.sd_model: reading it loads a model when none is
            model = sd_models.model_data.sd_model
            sd_models.send_model_to_cpu(model)
            log.info("[DreamBooth] The WebUI's model %s is off the GPU while DreamBooth works.", _title(model))
        devices.torch_gc()
        try:
            yield
        finally:
            gc.collect()
            devices.torch_gc()
            if model is not None:
                sd_models.send_model_to_device(model)
                log.info("[DreamBooth] The WebUI's model %s is back on %s.", _title(model), devices.device)


def _title(model) -> str:
    info = getattr(model, "sd_checkpoint_info", None)
    return info.title if info is not None else type(model).__name__
