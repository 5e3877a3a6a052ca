"""One training run at a time in a worker thread, for hosts that watch by polling (the WebUI tab and its API).

The run's story is a list of events, each a dict with a `seq` number and a `type`, in the shapes ComfyUI's page gets
(web/dreambooth_chart_core.js reads both): "progress" (a step: step, total, loss, instance_loss, prior_loss, lr,
elapsed_s, eta_s), "status" (text), "phase" (work before the steps: what, done, total), "samples" (step, count),
"evaluation" (step, subject_fidelity, pres, best_step) and, last, one of "done" (output, steps, saved_step),
"stopped" (step: a resumable state is kept, starting the same run again continues it) or "error" (text, in the host's
words). A poller asks for the events after the last `seq` it saw; a new run's "start" drops the previous run's.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

from .callbacks import Callbacks, StepInfo, TrainingCancelled
from .hosts import StepLog

IDLE, RUNNING, STOPPING, DONE, STOPPED, FAILED = "idle", "running", "stopping", "done", "stopped", "failed"
log = logging.getLogger("dreambooth")
_ENGINE = __name__.rsplit(".", 1)[0]  # "trainer", or "<pack>.trainer" inside a host



class Busy(RuntimeError):
    """A run is going, and the GPU is its own until it ends."""


Job = Callable[[Callbacks], object]  # runs train() with these callbacks and returns its TrainResult


class BackgroundRun:
    """Start a job, watch its events, stop it. `words` puts the engine's messages in the host's words."""

    def __init__(self, words: Callable[[str], str] = str, max_events: int = 20000):
        self.words = words
        self.max_events = max_events
        self._lock = threading.Lock()
        self._events: list[dict] = []
        self._seq = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.state = IDLE
        self.previews: list = []  # the newest preview images (PIL)
        self.result = None  # the finished job's TrainResult

    @property
    def busy(self) -> bool:
        return self.state in (RUNNING, STOPPING)

    def check_idle(self) -> None:
        """Raises Busy while a run is going (before work that must not touch its files, e.g. its photos)."""
        if self.busy:
            raise Busy("A training run is already going: stop it, or wait until it ends.")

    def start(self, job: Job, description: str = "") -> None:
        """Run `job` in a new thread. Raises Busy while another run is going."""
        with self._lock:
            self.check_idle()
            self.state, self.previews, self.result = RUNNING, [], None
            self._events = []  # a page opened now sees this run only (seq goes on, so pollers just read on)
            self._stop.clear()
            self._append({"type": "start", "text": description})
            self._thread = threading.Thread(target=self._work, args=(job,), name="dreambooth-run", daemon=True)
            self._thread.start()

    def stop(self) -> bool:
        """Ask the run to stop after its current step (it keeps a resumable state). False when nothing runs."""
        with self._lock:
            if self.state != RUNNING:
                return False
            self.state = STOPPING
        self._stop.set()
        self.emit("status", text="Stopping after this step; the run's state is kept, Train again continues it.")
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the run's thread to end (tests, shutdown); True when it has."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return not self.busy

    def events(self, after: int = 0) -> dict:
        """The run's state and its events with seq > `after`."""
        with self._lock:
            return {"state": self.state, "seq": self._seq, "previews": len(self.previews),
                    "events": [event for event in self._events if event["seq"] > after]}

    def emit(self, kind: str, **data) -> None:
        with self._lock:
            self._append({"type": kind, **data})

    def _append(self, event: dict) -> None:
        self._seq += 1
        self._events.append({"seq": self._seq, **event})
        if len(self._events) > self.max_events:  # a long run's step events thin out; the ends stay
            del self._events[1:len(self._events) // 2]

    def _work(self, job: Job) -> None:
        callbacks = _Watcher(self)
        try:
            result = job(callbacks)
        except TrainingCancelled as cancelled:
            self._end(STOPPED, "stopped", step=cancelled.step,
                      text="Train again with the same settings to continue from here.")
        except Exception as error:  # shown to the user in the host's words; the traceback goes to the log
            log.exception("[DreamBooth] the training run failed")
            self._end(FAILED, "error", text=self._error_text(error))
        else:
            self.result = result
            self._end(DONE, "done", output=result.output, steps=result.steps, saved_step=result.saved_step)

    def _error_text(self, error: Exception) -> str:
        """The engine's own errors and builtins (ValueError, MemoryError...) carry a message written for the user;
        anything else is unexpected, so its type is named and the log has the traceback."""
        text = self.words(str(error))
        module = type(error).__module__
        if module == "builtins" or module.startswith(_ENGINE + "."):
            return text or type(error).__name__
        return f"{type(error).__name__}: {text} (the log has the details)"

    def _end(self, state: str, kind: str, **data) -> None:
        with self._lock:
            self.state = state
            self._append({"type": kind, **data})


class _Watcher(Callbacks):
    """The engine's callbacks as events; the stop flag as should_stop; a log line now and then for the console."""

    def __init__(self, run: BackgroundRun):
        self.run = run
        self.step_log = StepLog()

    def on_step(self, info: StepInfo) -> None:
        self.run.emit("progress", step=info.step, total=info.total, loss=_finite(info.loss),
                      instance_loss=_finite(info.instance_loss), prior_loss=_finite(info.prior_loss), lr=info.lr,
                      elapsed_s=info.elapsed_s, eta_s=info.eta_s)
        line = self.step_log.line(info)
        if line:
            log.info("[DreamBooth] %s", line)

    def should_stop(self) -> bool:
        return self.run._stop.is_set()

    def on_samples(self, step: int, images: list) -> None:
        self.run.previews = list(images)
        self.run.emit("samples", step=step, count=len(images))

    def on_evaluation(self, scores, best) -> None:
        self.run.emit("evaluation", step=scores.step, subject_fidelity=scores.subject_fidelity, pres=scores.pres,
                      best_step=best.best.step if best.best else None)

    def on_progress(self, what: str, done: int, total: int) -> None:
        self.run.emit("phase", what=what, done=done, total=total)

    def log(self, message: str) -> None:
        message = self.run.words(message)
        log.info("[DreamBooth] %s", message)
        self.run.emit("status", text=message)


def _finite(value: float) -> float | None:
    """JSON has no NaN: a non-finite loss travels as null (the page skips it, as ComfyUI's does)."""
    return value if value == value and abs(value) != float("inf") else None
