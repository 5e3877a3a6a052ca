"""The WebUI tab's settings, run and API without the WebUI: a stand-in host on temporary folders and FastAPI's test
client on the routes as the WebUI registers them. tests/test_a1111_webui.py runs the same in a real WebUI."""
import base64
import io
import json
import time
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import pytest
from PIL import Image

from tests.pack import pack_module
from trainer.config import TrainConfig

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

form = pack_module("a1111.form")
session = pack_module("a1111.session")
routes = pack_module("a1111.routes")
background = pack_module("trainer.background")
checkpoint = pack_module("trainer.checkpoint")

pytestmark = pytest.mark.usefixtures("one_thread")


class StandIn:
    """The WebUI's side as a1111/webui.py gives it, on temporary folders; counts the model's trips off the GPU."""

    def __init__(self, root: Path, checkpoints: dict[str, Path]):
        self.root, self.checkpoints = root, checkpoints
        self.borrowed = self.returned = self.refreshed = 0

    def checkpoint_names(self):
        return sorted(self.checkpoints)

    def checkpoint_path(self, name):
        if name not in self.checkpoints:
            raise ValueError(f"Base checkpoint '{name}' is not in the WebUI's checkpoint list")
        return str(self.checkpoints[name])

    def checkpoint_title(self, path):
        return f"dreambooth/{Path(path).name} [0123456789]"

    def output_folder(self):
        return self.root / "models" / "Stable-diffusion" / "dreambooth"

    def work_folder(self):
        return self.root / "outputs" / "dreambooth"

    def evaluator_folders(self):
        return [self.root / "models" / "dreambooth_evaluators"]

    def device(self):
        return "cpu"

    def refresh_checkpoints(self):
        self.refreshed += 1

    @contextmanager
    def gpu_borrowed(self):
        self.borrowed += 1
        try:
            yield
        finally:
            self.returned += 1


@pytest.fixture
def host(tmp_path, tiny_checkpoint):
    return StandIn(tmp_path, {"tiny-sd1.safetensors [abc]": tiny_checkpoint})


@pytest.fixture
def photos(subject_photos):
    return sorted((subject_photos(dog=3) / "dog").glob("*.jpg"))


def settings(**overrides):
    return {"ckpt_name": "tiny-sd1.safetensors [abc]", "identifier": "zwx", "class_noun": "dog", "steps": 2,
            "resolution": 64, "prior_loss_weight": 0.0, "optimizer": "adamw", "memory_preset": "custom",
            "output_name": "zwx-dog", **overrides}


def test_the_tabs_defaults_and_help_are_the_engines_and_the_nodes():
    engine = {f.name: f for f in fields(TrainConfig)}
    by_name = {f.name: f for f in form.FIELDS}
    assert by_name["steps"].default == engine["max_train_steps"].default == 400
    assert by_name["learning_rate"].default == 2e-6 and by_name["num_class_images"].default == 200
    assert by_name["steps"].help == engine["max_train_steps"].metadata["help"]
    # The nodes' defaults where they differ from the command line's:
    assert by_name["memory_preset"].default == "auto" and by_name["gradient_checkpointing"].default is True
    assert all(f.help for f in form.FIELDS) and len({f.label for f in form.FIELDS}) == len(form.FIELDS)
    assert "python -m" not in form.words(by_name["identifier"].help)
    assert form.words(by_name["seed"].help) == by_name["seed"].help  # plain words stay plain


def test_engine_messages_name_the_tabs_fields_and_buttons():
    with pytest.raises(ValueError) as raised:
        TrainConfig(base_model="m.safetensors", class_noun="dog", output="o.safetensors", instance_dir="x").validate()
    assert form.words(str(raised.value)) == "identifier is not set: pick one with the Pick rare token button"
    assert form.words("max_train_steps must be at least 1") == "Steps must be at least 1"
    assert form.words("set --mixed-precision bf16") == "set Precision bf16"


def test_the_form_becomes_the_run_it_asks_for(host, photos):
    cfg = form.train_config(settings(steps=300, learning_rate=1e-6, sample_prompt=""), host, photos)
    assert cfg.base_model == host.checkpoints["tiny-sd1.safetensors [abc]"].as_posix()
    assert cfg.output == str(host.output_folder() / "zwx-dog.safetensors")
    assert cfg.max_train_steps == 300 and cfg.learning_rate == 1e-6 and not cfg.with_prior_preservation
    assert cfg.sample_prompts == ["a zwx dog on the beach"]
    kept = sorted(Path(cfg.instance_dir).iterdir())
    assert [p.read_bytes() for p in kept] == [p.read_bytes() for p in photos]
    # Uploading again replaces the photos: none of an earlier upload joins the run, and the folder is the same one,
    # so that Train again with the same photos resumes.
    again = form.train_config(settings(steps=300, learning_rate=1e-6), host, photos[:1])
    assert again.instance_dir == cfg.instance_dir and len(list(Path(again.instance_dir).iterdir())) == 1


@pytest.mark.parametrize("change, message", [
    (dict(class_noun="  "), "Class noun is empty"),
    (dict(output_name="../x"), "Output name"),
    (dict(ckpt_name="other.safetensors"), "not in the WebUI's checkpoint list"),
    (dict(steps=0), "Steps"),
    (dict(stepz=3), "Unknown setting(s) stepz"),
])
def test_bad_settings_are_refused_by_their_label(host, photos, change, message):
    with pytest.raises(ValueError) as raised:
        form.train_config(settings(**change), host, photos)
    assert message in form.words(str(raised.value))


def test_no_photos_is_refused_with_both_ways_to_give_them(host):
    with pytest.raises(ValueError, match="upload 3-5 photos, or give the folder"):
        form.train_config(settings(), host)


def wait_for_end(client, timeout=300.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = client.get("/dreambooth/v1/run").json()
        if state["state"] not in ("running", "stopping"):
            return state
        time.sleep(0.1)
    raise AssertionError("the run did not end")


@pytest.fixture
def api(host):
    app = fastapi.FastAPI()
    run = background.BackgroundRun(form.words)
    routes.register(app, host, run)
    return TestClient(app), run


def encoded(path: Path) -> str:
    buffer = io.BytesIO()
    Image.open(path).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_the_api_trains_with_photos_in_base64_and_lends_the_gpu_back(api, host, photos):
    client, run = api
    assert client.get("/dreambooth/v1/checkpoints").json() == {"checkpoints": ["tiny-sd1.safetensors [abc]"]}
    answer = client.post("/dreambooth/v1/train", json={**settings(), "instance_images": [encoded(p) for p in photos]})
    assert answer.status_code == 200, answer.text
    assert answer.json()["trigger_phrase"] == "zwx dog"
    state = wait_for_end(client)
    assert state["state"] == "done", state["events"][-1]
    kinds = [e["type"] for e in state["events"]]
    assert kinds[0] == "start" and kinds.count("progress") == 2 and kinds[-2:] == ["saved", "done"]
    saved = state["events"][-2]
    assert saved == {**saved, "checkpoint": "dreambooth/zwx-dog.safetensors [0123456789]",
                     "trigger_phrase": "a zwx dog"}
    output = host.output_folder() / "zwx-dog.safetensors"
    assert checkpoint.read_trigger_phrase(output) == "a zwx dog"
    assert (host.borrowed, host.returned, host.refreshed) == (1, 1, 1)
    preview = client.get("/dreambooth/v1/preview/0")
    assert preview.headers["content-type"] == "image/png" and Image.open(io.BytesIO(preview.content)).size == (64, 64)
    assert client.get("/dreambooth/v1/preview/5").status_code == 404


def test_the_api_says_what_is_wrong_and_refuses_a_second_run(api, host, photos):
    client, run = api
    bad = client.post("/dreambooth/v1/train", json={**settings(steps=0), "instance_folder": str(photos[0].parent)})
    assert bad.status_code == 400 and bad.json()["detail"].startswith("Steps")
    broken = client.post("/dreambooth/v1/train", json={**settings(), "instance_images": ["not base64!"]})
    assert broken.status_code == 400 and "Photo 1 of instance_images" in broken.json()["detail"]

    answer = client.post("/dreambooth/v1/train", json=settings(steps=200, instance_folder=str(photos[0].parent)))
    assert answer.status_code == 200
    busy = client.post("/dreambooth/v1/train", json=settings(instance_folder=str(photos[0].parent)))
    assert busy.status_code == 409 and "already going" in busy.json()["detail"]
    assert client.post("/dreambooth/v1/pick-token", json={"ckpt_name": "tiny-sd1.safetensors [abc]",
                                                          "class_noun": "dog"}).status_code == 409
    assert client.post("/dreambooth/v1/stop").json() == {"stopping": True}
    state = wait_for_end(client)
    assert state["state"] == "stopped" and host.returned == host.borrowed == 1  # the model came back after a stop


def test_the_api_picks_identifiers_on_the_checkpoint(api):
    client, _ = api
    answer = client.post("/dreambooth/v1/pick-token", json={"ckpt_name": "tiny-sd1.safetensors [abc]",
                                                            "class_noun": "dog", "count": 3})
    assert answer.status_code == 200, answer.text
    ranked = answer.json()["identifiers"]
    assert len(ranked) == 3 and [r["strength"] for r in ranked] == sorted(r["strength"] for r in ranked)
    empty = client.post("/dreambooth/v1/pick-token", json={"ckpt_name": "tiny-sd1.safetensors [abc]",
                                                           "class_noun": " "})
    assert empty.status_code == 400 and empty.json()["detail"].startswith("Class noun is empty")


@pytest.mark.slow
def test_evaluate_every_scores_with_the_models_in_the_evaluators_folder(api, host, photos):
    from transformers import ViTConfig, ViTModel

    from tests.test_embedders import DINO_V1, DINO_V1_PREPROCESSOR

    client, _ = api
    body = {**settings(evaluate_every=2, steps=2), "instance_folder": str(photos[0].parent)}
    none = client.post("/dreambooth/v1/train", json=body)
    assert none.status_code == 400 and "dreambooth_evaluators" in none.json()["detail"]  # says where models go

    folder = host.evaluator_folders()[0] / "dino-vits16"
    ViTModel(ViTConfig(**DINO_V1), add_pooling_layer=False).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(DINO_V1_PREPROCESSOR))
    assert client.post("/dreambooth/v1/train", json=body).status_code == 200
    state = wait_for_end(client)
    assert state["state"] == "done", state["events"][-1]
    scored = [e for e in state["events"] if e["type"] == "evaluation"]
    assert [e["step"] for e in scored] == [0, 2] and all(e["pres"] is not None for e in scored)
    assert state["events"][-1]["saved_step"] in (0, 2)
