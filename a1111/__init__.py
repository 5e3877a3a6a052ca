"""The Automatic1111 / Forge WebUI adapter: a DreamBooth tab and an API on the engine (trainer/). Only webui.py, tab.py
and register() import the WebUI or Gradio; form.py, session.py and routes.py are tested without it.
scripts/dreambooth_studio.py, which the WebUI runs, loads the repository as the package `dreambooth_studio` and
calls register()."""


import logging


def register() -> None:
    """Add the tab and the API routes through the WebUI's callbacks."""
    from modules import script_callbacks

    from . import routes, tab, webui

    _console_log()
    host = webui.WebUI()
    script_callbacks.on_ui_tabs(lambda: [(tab.build(host), "DreamBooth", "dreambooth_studio")])
    script_callbacks.on_app_started(lambda _blocks, app: routes.register(app, host))


def _console_log() -> None:
    """The run's log lines (steps now and then, phases, errors with their traceback) in the WebUI's console, which
    shows only what is printed or has a handler of its own."""
    log = logging.getLogger("dreambooth")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
