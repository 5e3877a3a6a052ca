"""Headless Chromium driven by Playwright, for the tests that open a host's page (the WebUI's tab, ComfyUI's editor):
`pip install playwright` in the Python that runs the tests; the browser is Debian's chromium (apt-get install
chromium), or CHROMIUM=/path. Nothing is downloaded: Playwright drives the installed browser."""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest


@contextmanager
def browser_page(profile: Path) -> Iterator[tuple]:
    """A page of headless Chromium (Debian's, or CHROMIUM) driven by Playwright, and the list that collects the page's
    errors and the console errors of this pack's scripts. Skips without Playwright or Chromium."""
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("no Chromium: apt-get install chromium, or set CHROMIUM")
    problems = []
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=chromium, headless=True, args=args, viewport={"width": 1280, "height": 1000})
        page = context.new_page()
        page.on("pageerror", lambda error: problems.append(f"page error: {error} {error.stack}"))
        page.on("console", lambda message: problems.append(f"console: {message.text} {message.location}")
                if message.type == "error" and "dreambooth" in json.dumps(message.location).lower() else None)
        try:
            yield page, problems
        finally:
            context.close()
