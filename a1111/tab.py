"""The DreamBooth tab (Gradio, as the WebUI's other tabs). The settings and buttons are Gradio's; the live panel
(progress, loss chart, previews, the trigger phrase, errors) is javascript/dreambooth_studio.js polling the API."""
from __future__ import annotations

import html

import gradio as gr

from . import form, session

LIVE_PANEL = ('<div id="dreambooth-live"><div class="dreambooth-status">No training run yet.</div>'
              '<canvas class="dreambooth-chart" height="220"></canvas><div class="dreambooth-trigger"></div>'
              '<div class="dreambooth-previews"></div></div>')


def build(host: session.Host) -> gr.Blocks:
    with gr.Blocks(analytics_enabled=False) as tab:
        widgets = {}
        with gr.Row():
            with gr.Column(scale=1):
                with gr.Row():
                    widgets["ckpt_name"] = _widget(fields("ckpt_name")[0], choices=host.checkpoint_names())
                    refresh = gr.Button("🔄", elem_id="dreambooth_refresh", scale=0, min_width=40)
                photos = gr.File(label="Photos of your subject (3-5)", file_count="multiple", file_types=["image"],
                                 elem_id="dreambooth_photos")
                for spec in fields("instance_folder", "identifier", "class_noun"):
                    widgets[spec.name] = _widget(spec)
                pick = gr.Button("Pick rare token", elem_id="dreambooth_pick")
                ranked = gr.HTML(elem_id="dreambooth_ranked")
                for spec in fields("output_name", "steps"):
                    widgets[spec.name] = _widget(spec)
                with gr.Accordion("Training settings", open=False):
                    for spec in form.FIELDS:
                        if spec.name not in widgets:
                            widgets[spec.name] = _widget(spec)
                with gr.Row():
                    train = gr.Button("Train", variant="primary", elem_id="dreambooth_train")
                    stop = gr.Button("Stop", elem_id="dreambooth_stop")
                message = gr.HTML(elem_id="dreambooth_message")
            with gr.Column(scale=1, elem_id="dreambooth_live_column"):
                gr.HTML(LIVE_PANEL)

        names = list(widgets)

        def on_train(uploaded, *values):
            paths = [getattr(item, "name", item) for item in uploaded or []]
            try:
                cfg = session.start_training(dict(zip(names, values)), host, paths)
            except (ValueError, RuntimeError, OSError) as error:
                return _message(form.words(str(error)), error=True)
            return _message(f"Training '{cfg.trigger_phrase}'; it goes on if you leave this tab.")

        def on_stop():
            stopping = session.RUN.stop()
            return _message("Stopping after this step; Train again continues the run." if stopping
                            else "No training run is going.")

        def on_pick(ckpt_name, class_noun):
            try:
                ranked = session.pick_identifiers(ckpt_name, class_noun, host)
            except (ValueError, RuntimeError, OSError) as error:
                return gr.update(), _message(form.words(str(error)), error=True)
            rows = "".join(f"<tr><td>{i}</td><td><code>{html.escape(r.identifier)}</code></td>"
                           f"<td>{r.strength:.3f}</td></tr>" for i, r in enumerate(ranked, 1))
            table = ("<table><tr><th>#</th><th>identifier</th><th>prior strength (lower is rarer)</th></tr>"
                     f"{rows}</table>")
            return gr.update(value=ranked[0].identifier), table

        train.click(on_train, inputs=[photos, *widgets.values()], outputs=[message])
        stop.click(on_stop, outputs=[message])
        pick.click(on_pick, inputs=[widgets["ckpt_name"], widgets["class_noun"]],
                   outputs=[widgets["identifier"], ranked])
        refresh.click(lambda: gr.update(choices=host.checkpoint_names()), outputs=[widgets["ckpt_name"]])
    return tab


def fields(*names: str) -> list[form.Field]:
    return [spec for spec in form.FIELDS if spec.name in names]


def _widget(spec: form.Field, choices: list | None = None):
    options = dict(label=spec.label, info=form.words(spec.help), elem_id=f"dreambooth_{spec.name}")
    if choices is not None or spec.choices:
        choices = list(choices if choices is not None else spec.choices)
        default = spec.default if spec.default in choices else (choices[0] if choices else None)
        return gr.Dropdown(choices=choices, value=default, **options)
    if isinstance(spec.default, bool):
        return gr.Checkbox(value=spec.default, **options)
    if isinstance(spec.default, int):
        return gr.Number(value=spec.default, precision=0, **options)
    if isinstance(spec.default, float):
        return gr.Number(value=spec.default, **options)
    return gr.Textbox(value=str(spec.default), **options)


def _message(text: str, error: bool = False) -> str:
    return f'<p class="dreambooth-{"error" if error else "note"}">{html.escape(text)}</p>'
