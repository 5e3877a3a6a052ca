// Live progress on the DreamBooth Train node: a status line and the loss curve, fed by the
// "dreambooth.progress" / "status" / "done" / "stopped" / "error" messages of nodes/comfy_hooks.py and nodes/train.py,
// and on load by the last runs the server remembers (a reloaded page shows them again).

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import {
  applyDone, applyEnd, applyProgress, applyStatus, createRun, headerLines, matchRunKey, replayRun,
} from "./dreambooth_chart_core.js";
import { PANEL_MIN_HEIGHT, drawPanel } from "./dreambooth_chart_draw.js";

const NODE_CLASS = "DBStudioTrain";
const MIN_WIDTH = 360; // px: room for the status line
const PAINT = Symbol("dreambooth.paint"); // per-node repaint function

const runs = new Map(); // server node id -> run (see createRun), least recently updated first
const panels = new Set(); // train nodes that show a panel

const isTrainNode = (node) => node?.comfyClass === NODE_CLASS || node?.type === NODE_CLASS;

/** The run shown by a node: its own id, else its id inside a subgraph path, else the only run around. */
function runForNode(node) {
  const key = matchRunKey(node.id, [...runs.keys()], panels.size === 1);
  return key == null ? null : runs.get(key);
}

// ---------- server messages ----------

/** A listener that applies one kind of message to the run of the node that sent it. */
function listener(apply) {
  return (event) => {
    const msg = event?.detail; // ComfyUI wraps the server's data in a CustomEvent
    if (!msg || msg.node == null) return;
    const key = String(msg.node);
    const run = runs.get(key) ?? createRun();
    runs.delete(key); // re-insert: the newest run goes last
    runs.set(key, run);
    apply(run, msg);
    requestRedraw();
  };
}

/** The last runs the server remembers (GET /dreambooth/runs): a page opened or reloaded later shows them. */
async function restoreRuns() {
  try {
    const response = await api.fetchApi("/dreambooth/runs");
    if (!response.ok) return;
    for (const [key, events] of Object.entries(await response.json())) {
      if (!runs.has(key)) runs.set(key, replayRun(events)); // a live message got here first: it is newer
    }
    requestRedraw();
  } catch (error) {
    console.warn("DreamBooth: the last runs could not be read", error);
  }
}

// ---------- redraw, at most once per animation frame ----------

let frame = 0;

function requestRedraw() {
  if (frame) return;
  frame = requestAnimationFrame(() => {
    frame = 0;
    for (const node of panels) node[PAINT]?.();
    app.graph?.setDirtyCanvas?.(true, false); // the LiteGraph canvas (fallback drawing) repaints too
  });
}

// ---------- panel as a <canvas> DOM widget ----------

/** Device pixels per CSS pixel: sharp on HiDPI screens and when the graph is zoomed in. */
function pixelRatio() {
  const zoom = Math.min(2, Math.max(1, app.canvas?.ds?.scale || 1));
  return (globalThis.devicePixelRatio || 1) * zoom;
}

/** Paint the panel into the canvas at its current CSS size. */
function paintCanvas(canvas, node) {
  const w = canvas.clientWidth;
  const h = canvas.clientHeight;
  if (!w || !h) return; // hidden (collapsed, off screen, zoomed out)
  const ratio = pixelRatio();
  const bw = Math.round(w * ratio);
  const bh = Math.round(h * ratio);
  if (canvas.width !== bw || canvas.height !== bh) Object.assign(canvas, { width: bw, height: bh });
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const run = runForNode(node);
  drawPanel(ctx, run, 0, 0, w, h);
  canvas.dataset.ratio = String(ratio);
  canvas.setAttribute("aria-label", headerLines(run).filter(Boolean).join(" — ")); // the status, for screen readers
}

function attachCanvasWidget(node) {
  const canvas = document.createElement("canvas");
  canvas.className = "dreambooth-panel";
  canvas.setAttribute("role", "img");
  Object.assign(canvas.style, { width: "100%", height: "100%", display: "block" });
  const widget = node.addDOMWidget("dreambooth_progress", "dreambooth_progress", canvas, {
    serialize: false, // not an input: stays out of the prompt
    getValue: () => "",
    setValue: () => {},
    getMinHeight: () => PANEL_MIN_HEIGHT,
  });
  if (widget) widget.serialize = false; // and out of the saved workflow's widgets_values
  node[PAINT] = () => paintCanvas(canvas, node);

  const observer = typeof ResizeObserver === "function" ? new ResizeObserver(() => node[PAINT]()) : null;
  observer?.observe(canvas);

  // the graph's zoom changes the sharpness we need: repaint when it does
  const onDrawForeground = node.onDrawForeground;
  node.onDrawForeground = function (...args) {
    const result = onDrawForeground?.apply(this, args);
    if (canvas.dataset.ratio !== String(pixelRatio())) this[PAINT]();
    return result;
  };
  return () => observer?.disconnect();
}

// ---------- fallback: draw on the LiteGraph canvas ----------

/** y below the node's widgets and slots, in node coordinates. */
function contentBottom(node) {
  const LG = globalThis.LiteGraph ?? {};
  const widgetH = LG.NODE_WIDGET_HEIGHT ?? 20;
  const slots = Math.max(node.inputs?.length ?? 0, node.outputs?.length ?? 0);
  let y = slots * (LG.NODE_SLOT_HEIGHT ?? 20);
  for (const w of node.widgets ?? []) {
    const top = w.last_y ?? w.y;
    if (top != null) y = Math.max(y, top + (w.computeSize?.(node.size[0])?.[1] ?? widgetH));
  }
  return y + 6;
}

function attachDrawnPanel(node) {
  node[PAINT] = null; // redrawn with the graph canvas
  const onDrawForeground = node.onDrawForeground;
  node.onDrawForeground = function (ctx, ...rest) {
    const result = onDrawForeground?.call(this, ctx, ...rest);
    if (!this.flags?.collapsed) {
      const top = contentBottom(this);
      drawPanel(ctx, runForNode(this), 8, top, this.size[0] - 16, this.size[1] - top - 8);
    }
    return result;
  };
  const computeSize = node.computeSize;
  node.computeSize = function (...args) {
    const size = computeSize.apply(this, args);
    size[1] += PANEL_MIN_HEIGHT + 8; // room for the panel under the widgets
    return size;
  };
  return () => {};
}

// ---------- per node ----------

function attachPanel(node) {
  const detach = typeof node.addDOMWidget === "function" ? attachCanvasWidget(node) : attachDrawnPanel(node);
  panels.add(node);
  const size = node.computeSize?.() ?? node.size;
  node.setSize?.([Math.max(size[0], node.size?.[0] ?? 0, MIN_WIDTH), Math.max(size[1], node.size?.[1] ?? 0)]);

  const onRemoved = node.onRemoved;
  node.onRemoved = function (...args) {
    panels.delete(this);
    detach();
    return onRemoved?.apply(this, args);
  };
  requestRedraw();
}

app.registerExtension({
  name: "dreambooth.studio.progress",

  setup() {
    api.addEventListener("dreambooth.progress", listener(applyProgress));
    api.addEventListener("dreambooth.status", listener(applyStatus));
    api.addEventListener("dreambooth.done", listener(applyDone));
    api.addEventListener("dreambooth.stopped", listener((run, msg) => applyEnd(run, msg, "stopped")));
    api.addEventListener("dreambooth.error", listener((run, msg) => applyEnd(run, msg, "error")));
    restoreRuns(); // not awaited: the page does not wait for it
  },

  nodeCreated(node) {
    if (isTrainNode(node)) attachPanel(node);
  },
});
