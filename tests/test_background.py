"""A run in a worker thread, watched by polling and stopped from another thread (what the WebUI tab and API do)."""
import json
import time

import pytest
import torch

from tests.test_train import config
from tests.tiny import tiny_bundle
from trainer.background import DONE, FAILED, STOPPED, BackgroundRun, Busy
from trainer.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(subject_photos):
    return subject_photos(dog=3, cat=2)


def poll_until(run: BackgroundRun, accept, after: int = 0, timeout: float = 300.0) -> list[dict]:
    """The events after `after` seen until `accept(event)` holds for one, as a page polling every 50 ms sees them."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = run.events(after)
        seen += batch["events"]
        after = batch["seq"]
        if any(accept(event) for event in batch["events"]):
            return seen
        time.sleep(0.05)
    raise AssertionError(f"no accepted event in {timeout} s; saw {seen[-3:]}")


def test_a_run_reports_every_step_and_its_end_as_json(images, tmp_path):
    run = BackgroundRun()
    cfg = config(images, tmp_path, max_train_steps=3, sample_prompts=["a zwx dog"], sample_steps=2)
    run.start(lambda callbacks: train(cfg, bundle=tiny_bundle("sd1"), callbacks=callbacks), "zwx dog")
    assert run.busy
    seen = poll_until(run, lambda e: e["type"] in ("done", "error"))
    assert run.state == DONE and not run.busy
    json.dumps(seen)  # what the API sends as it is
    steps = [e for e in seen if e["type"] == "progress"]
    assert [e["step"] for e in steps] == [1, 2, 3] and all(e["total"] == 3 for e in steps)
    assert [e["loss"] for e in steps] == pytest.approx(run.result.losses)
    assert seen[0]["type"] == "start" and seen[-1] == {**seen[-1], "type": "done", "output": cfg.output, "steps": 3}
    assert [e["seq"] for e in seen] == sorted({e["seq"] for e in seen})  # each once, in order
    assert len(run.previews) == 1 and run.previews[0].size == (32, 32)
    assert run.events(seen[-1]["seq"])["events"] == []


def test_stop_from_another_thread_keeps_a_state_that_the_next_start_continues(images, tmp_path):
    run = BackgroundRun()
    cfg = config(images, tmp_path, max_train_steps=60)
    job = lambda callbacks: train(cfg, bundle=tiny_bundle("sd1"), callbacks=callbacks)  # noqa: E731
    run.start(job)
    poll_until(run, lambda e: e["type"] == "progress" and e["step"] >= 2)
    assert run.stop() and not run.stop()  # a second click changes nothing
    seen = poll_until(run, lambda e: e["type"] in ("stopped", "done", "error"))
    assert run.state == STOPPED, seen[-1]
    stopped_at = seen[-1]["step"]
    assert 2 <= stopped_at < 60 and seen[-1]["text"].startswith("Train again")

    run.start(job)
    seen = poll_until(run, lambda e: e["type"] in ("stopped", "done", "error"), after=seen[-1]["seq"])
    assert run.state == DONE, seen[-1]
    assert run.result.resumed_from == stopped_at
    replay = [e["type"] for e in run.events()["events"]]  # what a page opened now sees: this run, not the stopped one
    assert replay.count("start") == 1 and "stopped" not in replay
    assert [e["step"] for e in seen if e["type"] == "progress"][0] == stopped_at + 1


def test_a_second_start_while_running_is_refused(images, tmp_path):
    run = BackgroundRun()
    release = []

    def waiting(callbacks):
        while not callbacks.should_stop():
            time.sleep(0.01)
        release.append(True)
        return train(config(images, tmp_path, max_train_steps=1), bundle=tiny_bundle("sd1"))

    run.start(waiting)
    with pytest.raises(Busy, match="already going"):
        run.start(waiting)
    run.stop()
    assert run.wait(300) and release


def test_errors_arrive_in_the_hosts_words_without_a_traceback(images, tmp_path):
    run = BackgroundRun(words=lambda text: text.replace("max_train_steps", "Steps"))
    bad = config(images, tmp_path, max_train_steps=0)
    run.start(lambda callbacks: train(bad.validate(), callbacks=callbacks))
    run.wait(60)
    event = run.events()["events"][-1]
    assert run.state == FAILED and event["type"] == "error"
    assert event["text"].startswith("Steps") and "max_train_steps" not in event["text"]
    assert "Traceback" not in event["text"] and "ConfigError" not in event["text"]

    def broken(callbacks):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    run.start(broken)  # a failed run does not block the next
    run.wait(60)
    assert run.events()["events"][-1]["text"] == ("OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB "
                                                  "(the log has the details)")
