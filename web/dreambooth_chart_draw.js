// Draws the DreamBooth Train panel (status lines + loss chart) into any CanvasRenderingContext2D:
// the node's own <canvas> DOM widget, or the LiteGraph canvas in onDrawForeground. No ComfyUI imports.

import { formatAxis, headerLines, lossRange, scale } from "./dreambooth_chart_core.js";

export const PANEL_MIN_HEIGHT = 170; // px: header + a readable chart

// Dark-theme colours; RAW and SMOOTH match the PNG curve of trainer/plots.py.
export const COLORS = {
  panel: "#18181b",
  border: "rgba(255,255,255,0.08)",
  grid: "rgba(255,255,255,0.08)",
  text: "#e4e4e7",
  error: "#f87171",
  dim: "#9a9aa3",
  raw: "rgba(110,140,190,0.55)",
  smooth: "rgb(255,170,60)",
};

const FONT = "Inter, Arial, sans-serif";
const PAD = 8;
const HEADER_H = 38; // two text lines
const AXIS_H = 16; // x labels + legend under the plot

/** Draw the whole panel for `run` (may be null) in the box x, y, w, h. */
export function drawPanel(ctx, run, x, y, w, h) {
  if (w < 40 || h < 30) return;
  ctx.save();
  ctx.translate(x, y);
  roundRect(ctx, 0, 0, w, h, 6);
  ctx.fillStyle = COLORS.panel;
  ctx.fill();
  ctx.strokeStyle = COLORS.border;
  ctx.lineWidth = 1;
  ctx.stroke();
  drawHeader(ctx, headerLines(run), w, run?.ended?.kind === "error" ? COLORS.error : COLORS.text);
  const plot = { x: PAD, y: HEADER_H + 4, w: w - 2 * PAD, h: h - HEADER_H - 4 - AXIS_H - PAD / 2 };
  if (plot.h >= 24) drawChart(ctx, run, plot);
  ctx.restore();
}

/** The status line (bright) and the secondary line (dim), cut to fit. */
function drawHeader(ctx, [main, second], w, color) {
  ctx.textBaseline = "alphabetic";
  ctx.textAlign = "left";
  ctx.font = `12px ${FONT}`;
  ctx.fillStyle = color;
  ctx.fillText(fitText(ctx, main, w - 2 * PAD), PAD, 16);
  if (second) {
    ctx.font = `11px ${FONT}`;
    ctx.fillStyle = COLORS.dim;
    ctx.fillText(fitText(ctx, second, w - 2 * PAD), PAD, 31);
  }
}

/** Grid, y labels, raw and smoothed loss, x labels and legend inside the plot box. */
function drawChart(ctx, run, plot) {
  const points = run?.points ?? [];
  if (!points.length) return drawEmpty(ctx, plot);
  const total = Math.max(1, run.total || points[points.length - 1].step);
  const { lo, hi } = lossRange(points);

  // y labels (axis top and bottom) in a left gutter sized to the wider one
  ctx.font = `10px ${FONT}`;
  const labels = [formatAxis(hi), formatAxis(lo)];
  const gutter = Math.ceil(Math.max(...labels.map((t) => ctx.measureText(t).width))) + 6;
  const area = { x: plot.x + gutter, y: plot.y, w: plot.w - gutter, h: plot.h };
  drawGrid(ctx, area, [0, 0.5, 1]);
  ctx.fillStyle = COLORS.dim;
  ctx.textAlign = "right";
  ctx.textBaseline = "top";
  ctx.fillText(labels[0], area.x - 5, area.y);
  ctx.textBaseline = "bottom";
  ctx.fillText(labels[1], area.x - 5, area.y + area.h);

  const px = (step) => scale(step, 0, total, area.x, area.x + area.w);
  const py = (v) => scale(v, lo, hi, area.y + area.h, area.y);
  ctx.save();
  ctx.beginPath();
  ctx.rect(area.x, area.y, area.w, area.h);
  ctx.clip(); // values outside the range are cut at the edges
  drawLine(ctx, points, px, (p) => py(p.loss), COLORS.raw, 1);
  drawLine(ctx, points, px, (p) => py(p.ema), COLORS.smooth, 2);
  const last = points[points.length - 1];
  ctx.fillStyle = COLORS.smooth;
  ctx.beginPath();
  ctx.arc(px(last.step), py(last.ema), 2.5, 0, 2 * Math.PI);
  ctx.fill();
  ctx.restore();
  drawXAxis(ctx, area, total);
}

/** Before the first step: a frame and a hint. */
function drawEmpty(ctx, plot) {
  drawGrid(ctx, plot, [0, 1]);
  ctx.font = `10px ${FONT}`;
  ctx.fillStyle = COLORS.dim;
  ctx.textAlign = "center";
  ctx.textBaseline = "middle";
  ctx.fillText(fitText(ctx, "the loss curve appears here once training starts", plot.w), plot.x + plot.w / 2,
    plot.y + plot.h / 2);
}

/** Faint horizontal lines at the given fractions of the height. */
function drawGrid(ctx, a, fractions) {
  ctx.strokeStyle = COLORS.grid;
  ctx.lineWidth = 1;
  ctx.beginPath();
  for (const f of fractions) {
    const y = Math.round(a.y + f * a.h) + 0.5;
    ctx.moveTo(a.x, y);
    ctx.lineTo(a.x + a.w, y);
  }
  ctx.stroke();
}

/** One polyline through the points. */
function drawLine(ctx, points, px, py, color, width) {
  ctx.strokeStyle = color;
  ctx.lineWidth = width;
  ctx.lineJoin = "round";
  ctx.beginPath();
  points.forEach((p, i) => (i ? ctx.lineTo(px(p.step), py(p)) : ctx.moveTo(px(p.step), py(p))));
  ctx.stroke();
}

/** "0" and the total step count under the plot ends, the legend between them. */
function drawXAxis(ctx, a, total) {
  const y = a.y + a.h + 3;
  ctx.font = `10px ${FONT}`;
  ctx.fillStyle = COLORS.dim;
  ctx.textBaseline = "top";
  ctx.textAlign = "left";
  ctx.fillText("0", a.x, y);
  ctx.textAlign = "right";
  ctx.fillText(`${total} steps`, a.x + a.w, y);
  const items = [["loss", COLORS.raw, 1], ["smoothed", COLORS.smooth, 2]];
  const widths = items.map(([t]) => 16 + ctx.measureText(t).width);
  let x = a.x + a.w / 2 - (widths[0] + widths[1] + 12) / 2;
  ctx.textAlign = "left";
  items.forEach(([label, color, width], i) => {
    ctx.strokeStyle = color;
    ctx.lineWidth = width;
    ctx.beginPath();
    ctx.moveTo(x, y + 6);
    ctx.lineTo(x + 12, y + 6);
    ctx.stroke();
    ctx.fillStyle = COLORS.dim;
    ctx.fillText(label, x + 16, y);
    x += widths[i] + 12;
  });
}

/** text, shortened with "…" to fit maxWidth. */
export function fitText(ctx, text, maxWidth) {
  if (ctx.measureText(text).width <= maxWidth) return text;
  let lo = 0;
  let hi = text.length;
  while (lo < hi) {
    const mid = Math.ceil((lo + hi) / 2);
    if (ctx.measureText(text.slice(0, mid) + "…").width <= maxWidth) lo = mid;
    else hi = mid - 1;
  }
  return text.slice(0, lo) + "…";
}

/** A rounded-rectangle path (without relying on ctx.roundRect, missing in older browsers). */
function roundRect(ctx, x, y, w, h, r) {
  ctx.beginPath();
  ctx.moveTo(x + r, y);
  ctx.arcTo(x + w, y, x + w, y + h, r);
  ctx.arcTo(x + w, y + h, x, y + h, r);
  ctx.arcTo(x, y + h, x, y, r);
  ctx.arcTo(x, y, x + w, y, r);
  ctx.closePath();
}
