"""The WebUI's one training run (shared by the tab and the API) and the work around the engine's calls: the WebUI's
own model leaves the GPU while the engine works and comes back after; the new checkpoint joins the WebUI's list."""
from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

from ..trainer.background import BackgroundRun, Busy
from ..trainer.checkpoint import read_trigger_phrase
from ..trainer.config import TrainConfig
from . import form

RUN = BackgroundRun(form.words)


class Host(form.Host, Protocol):
    def gpu_borrowed(self) -> AbstractContextManager: ...
    def refresh_checkpoints(self) -> None: ...
    def checkpoint_title(self, path: str) -> str: ...
    def evaluator_folders(self) -> list[Path]: ...


def start_training(values: dict, host: Host, photos: list | None = None, run: BackgroundRun = RUN) -> TrainConfig:
    """Check the settings (a FormError or ConfigError says what is wrong before anything starts), then train in the
    background. Pressing Train again with the same settings resumes a stopped run."""
    run.check_idle()  # before the form replaces the photos folder a running run may be reading
    cfg = form.train_config(values, host, photos)
    evaluation = _evaluation(cfg, host) if cfg.evaluate_every else None  # no model: said now, not in the run

    def job(callbacks):
        from ..trainer.loop import train  # torch and diffusers: only once a run starts

        with host.gpu_borrowed():
            result = train(cfg, callbacks=callbacks, evaluation=evaluation)
        host.refresh_checkpoints()
        run.emit("saved", checkpoint=host.checkpoint_title(result.output),
                 trigger_phrase=read_trigger_phrase(result.output))
        return result

    run.start(job, f"Training '{cfg.trigger_phrase}' into {Path(cfg.output).name}")
    return cfg


def pick_identifiers(ckpt_name: str, class_noun: str, host: Host, count: int = 10, run: BackgroundRun = RUN) -> list:
    """The ranked identifiers (trainer.tokens.RankedToken), best first, measured on the checkpoint."""
    from ..trainer.api import pick_identifiers as pick
    from ..trainer.hosts import require_class_noun

    if run.busy:
        raise Busy("Training is using the GPU: pick the identifier before you train, or after.")
    class_noun = require_class_noun(class_noun, form.LABELS["class_noun"])
    with host.gpu_borrowed():
        return pick(host.checkpoint_path(ckpt_name), class_noun, count=count, device=host.device())


def _evaluation(cfg: TrainConfig, host: Host):
    from ..trainer.api import evaluation_with_models
    from ..trainer.dataset import load_image_folder

    folders = host.evaluator_folders()  # folders of models, read as the command line's --evaluation-models
    sources = [str(folder) for folder in folders if folder.is_dir()]
    photos = [item.image for item in load_image_folder(cfg.instance_dir)]
    return evaluation_with_models(cfg, photos, sources, home=str(folders[0]))
