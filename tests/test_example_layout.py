"""The example workflows' layout: no node covers another once the Train node has grown to its full size in ComfyUI's
page (its live panel and the sample preview under the widgets). That size is the one in the JSON, and
tests/test_comfyui_browser.py checks that the page's node fits in it."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "example_workflows").glob("*.json"))
TITLE_H = 30  # LiteGraph draws a node's title bar above its pos
TRAIN_FULL_SIZE = [340, 1052]  # measured in ComfyUI 0.3.64 (frontend 1.27.10) after a run, preview shown


def box(node: dict) -> tuple[float, float, float, float]:
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE_H, x + w, y + h


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_no_node_covers_another_with_the_train_node_at_full_size(path):
    nodes = json.loads(path.read_text())["nodes"]
    assert [n["size"] for n in nodes if n["type"] == "DBStudioTrain"] == [TRAIN_FULL_SIZE]
    for a, b in itertools.combinations(nodes, 2):
        (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = box(a), box(b)
        assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, \
            f"{a['type']} {a.get('title', '')!r} and {b['type']} {b.get('title', '')!r} overlap"
