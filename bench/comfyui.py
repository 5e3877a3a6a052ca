"""A real ComfyUI with this pack, driven over its HTTP API: started on loopback on a throw-away base directory,
workflows queued as the editor queues them. Used by bench/comfyui_bench.py and by the tests that run the pack in
ComfyUI (tests/test_comfyui.py)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def pack_home(base: Path, *extra_nodes: Path) -> Path:
    """A ComfyUI base directory with this pack (and `extra_nodes`, other custom-node folders) linked into
    custom_nodes/; returns its models/checkpoints folder."""
    nodes = base / "custom_nodes"
    nodes.mkdir(parents=True)
    (nodes / "dreambooth_studio").symlink_to(REPO, target_is_directory=True)
    for folder in extra_nodes:
        (nodes / folder.name).symlink_to(folder.resolve(), target_is_directory=True)
    checkpoints = base / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    return checkpoints


class ComfyUI:
    """ComfyUI's main.py from `comfyui_dir`, run by `python` (default: the checkout's .venv) on `base`; its output
    goes to base/server.log."""

    def __init__(self, comfyui_dir: Path, base: Path, *options: str, python: str | None = None,
                 env: dict | None = None, start_timeout: float = 180):
        self.base = base
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        python = python or str(Path(comfyui_dir, ".venv", "bin", "python"))
        self.log_path = base / "server.log"
        self.process = subprocess.Popen(
            [python, "main.py", "--listen", "127.0.0.1", "--port", str(self.port), "--base-directory", str(base),
             "--database-url", "sqlite:///:memory:", "--disable-auto-launch", *options],
            cwd=comfyui_dir, stdout=self.log_path.open("w"), stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", **(env or {})})
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            try:
                self.object_info = self.get("/object_info")
                return
            except (urllib.error.URLError, ConnectionError):
                self._check_running()
                time.sleep(1)
        raise TimeoutError(f"ComfyUI did not answer in {start_timeout:.0f} s\n{self.log()[-4000:]}")

    def _check_running(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"ComfyUI exited with {self.process.returncode}\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict | None = None):
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=json.dumps(body or {}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read()
            return json.loads(text) if text else None

    def queue(self, prompt: dict) -> str:
        return self.post("/prompt", {"prompt": prompt})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 900) -> dict:
        """The prompt's history entry once it has finished (successfully or not)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry["status"].get("completed") is not None and entry["status"]["status_str"]:
                return entry
            self._check_running()
            time.sleep(1)
        raise TimeoutError(f"prompt {prompt_id} did not finish\n{self.log()[-4000:]}")

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=30)


def api_prompt(workflow: dict, object_info: dict) -> dict:
    """The editor's saved workflow -> the API prompt the editor would queue (widget values in input order)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        info = object_info[node["type"]]
        linked = {i["name"]: links[i["link"]] for i in node["inputs"] if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for section in ("required", "optional"):
            for name in info["input_order"].get(section, []):
                kind, options = (info["input"][section][name] + [{}])[:2]
                if (isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")) and values:
                    inputs[name] = values.pop(0)
                    if options.get("control_after_generate"):
                        values.pop(0)
                if name in linked:
                    inputs[name] = [str(linked[name][1]), linked[name][2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def execution_errors(entry: dict) -> list[dict]:
    """A finished prompt's execution errors (its history entry's)."""
    return [data for kind, data in entry["status"]["messages"] if kind == "execution_error"]
