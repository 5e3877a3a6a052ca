"""The API for people who drive the WebUI from scripts (registered the WebUI's way, on its FastAPI app):

    GET  /dreambooth/v1/checkpoints            the WebUI's checkpoints
    POST /dreambooth/v1/pick-token             {"ckpt_name", "class_noun", "count"} -> ranked identifiers
    POST /dreambooth/v1/train                  the tab's settings by the Train node's input names (a1111/form.py),
                                               photos as "instance_folder" or "instance_images" (base64)
    GET  /dreambooth/v1/run?after=SEQ          the run's state and its events after SEQ (trainer/background.py)
    GET  /dreambooth/v1/preview/N              the Nth newest preview image, PNG
    POST /dreambooth/v1/stop                   stop after the current step, keeping a resumable state

Bad settings answer 400 with the same message the tab shows; a second run while one is going, 409.
"""
from __future__ import annotations

import io
from contextlib import contextmanager
from typing import Iterator

from fastapi import Body, HTTPException
from fastapi.responses import Response

from ..trainer.background import BackgroundRun, Busy
from . import form, session

PREFIX = "/dreambooth/v1"


def register(app, host: session.Host, run: BackgroundRun = session.RUN) -> None:
    def checkpoints() -> dict:
        return {"checkpoints": host.checkpoint_names()}

    def pick_token(body: dict = Body(...)) -> dict:
        with _as_http():
            ranked = session.pick_identifiers(str(body.get("ckpt_name", "")), str(body.get("class_noun", "")), host,
                                              count=int(body.get("count", 10)), run=run)
        return {"identifiers": [{"identifier": r.identifier, "strength": r.strength} for r in ranked]}

    def train(body: dict = Body(...)) -> dict:
        settings = dict(body)
        with _as_http():
            photos = [form.decode_photo(data, i) for i, data in enumerate(settings.pop("instance_images", None) or [])]
            cfg = session.start_training(settings, host, photos, run=run)
        return {"started": True, "output": cfg.output, "trigger_phrase": cfg.trigger_phrase}

    def state(after: int = 0) -> dict:
        return run.events(after)

    def preview(index: int) -> Response:
        if not 0 <= index < len(run.previews):
            raise HTTPException(404, f"No preview {index}: the run has {len(run.previews)}.")
        buffer = io.BytesIO()
        run.previews[index].save(buffer, format="PNG")
        return Response(buffer.getvalue(), media_type="image/png")

    def stop() -> dict:
        return {"stopping": run.stop()}

    app.add_api_route(f"{PREFIX}/checkpoints", checkpoints, methods=["GET"])
    app.add_api_route(f"{PREFIX}/pick-token", pick_token, methods=["POST"])
    app.add_api_route(f"{PREFIX}/train", train, methods=["POST"])
    app.add_api_route(f"{PREFIX}/run", state, methods=["GET"])
    app.add_api_route(f"{PREFIX}/preview/{{index}}", preview, methods=["GET"])
    app.add_api_route(f"{PREFIX}/stop", stop, methods=["POST"])


@contextmanager
def _as_http() -> Iterator[None]:
    """The engine's and the form's errors as HTTP answers in the tab's words: 409 while a run has the GPU, else 400."""
    try:
        yield
    except Busy as busy:
        raise HTTPException(409, str(busy)) from busy
    except (ValueError, OSError) as error:  # settings, photos, files: the message says what to fix
        raise HTTPException(400, form.words(str(error))) from error
