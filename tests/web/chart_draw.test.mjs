// The panel drawing, checked on a recording 2D context: node --test tests/web/
import assert from "node:assert/strict";
import { test } from "node:test";

import { applyProgress, createRun, progressText } from "../../web/dreambooth_chart_core.js";
import { COLORS, PANEL_MIN_HEIGHT, drawPanel, fitText } from "../../web/dreambooth_chart_draw.js";
import { fakeContext } from "./fake_canvas.mjs";

const W = 360;
const H = PANEL_MIN_HEIGHT;

function runOf(n, { total = 400, spikeAt = 0 } = {}) {
  const run = createRun();
  for (let s = 1; s <= n; s++) {
    const loss = 0.05 + 0.2 / Math.sqrt(s) + (s % 5) * 0.01 + (s === spikeAt ? 3 : 0); // one big spike
    applyProgress(run, { node: "7", step: s, total, loss, lr: 2e-6, eta_s: total - s });
  }
  return run;
}

/** The polylines drawn: [{color, width, points: [[x, y], ...]}]. */
function polylines(ctx) {
  const lines = [];
  let current = null;
  for (const c of ctx.calls) {
    if (c.name === "moveTo") lines.push((current = { points: [c.args] }));
    else if (c.name === "lineTo" && current) current.points.push(c.args);
    else if (c.name === "stroke" && current) Object.assign(current, { color: c.strokeStyle, width: c.lineWidth });
    else if (c.name === "beginPath") current = null;
  }
  return lines;
}

test("before any run: the waiting line and a hint, no curve", () => {
  const ctx = fakeContext();
  drawPanel(ctx, null, 0, 0, W, H);
  const texts = ctx.texts();
  assert.equal(texts[0], "waiting for a run");
  assert.ok(texts.some((t) => t.startsWith("the loss curve appears")));
  assert.ok(!polylines(ctx).some((l) => l.color === COLORS.smooth));
});

test("a run: status line, axis labels, and both curves inside the box", () => {
  const run = runOf(240);
  const ctx = fakeContext();
  drawPanel(ctx, run, 0, 0, W, H);
  const texts = ctx.texts();
  assert.equal(texts[0], progressText(run.progress));
  assert.ok(texts.includes("0") && texts.includes("400 steps"), texts.join(" | "));
  assert.ok(texts.includes("loss") && texts.includes("smoothed"));

  const raw = polylines(ctx).find((l) => l.color === COLORS.raw && l.points.length > 2);
  const smooth = polylines(ctx).find((l) => l.color === COLORS.smooth && l.points.length > 2);
  assert.equal(raw.points.length, 240);
  assert.equal(smooth.points.length, 240);
  assert.ok(smooth.width > raw.width, "the smoothed line is the bold one");
  // x runs from 0 to total: step 240 of 400 ends about 60% across the plot
  const xs = smooth.points.map(([x]) => x);
  assert.ok(xs.every((x, i) => i === 0 || x > xs[i - 1]));
  assert.ok(xs.at(-1) > 0.5 * W && xs.at(-1) < 0.7 * W, `last x ${xs.at(-1)}`);
  // the smoothed curve (after its 10-step warm-up) lies inside the panel, and so does most of the raw one
  const inside = ([x, y]) => x >= 0 && x <= W && y >= 0 && y <= H;
  assert.ok(smooth.points.slice(10).every(inside));
  assert.ok(raw.points.filter(inside).length >= 0.95 * raw.points.length);
  // high loss is drawn near the top: the curve goes down as the loss goes down
  assert.ok(smooth.points.at(-1)[1] > smooth.points[10][1] + 0.3 * H);
});

test("a loss spike is cut at the top of the plot instead of squashing the curve", () => {
  const ctx = fakeContext();
  drawPanel(ctx, runOf(240, { spikeAt: 50 }), 0, 0, W, H);
  const raw = polylines(ctx).find((l) => l.color === COLORS.raw && l.points.length > 2);
  const ys = raw.points.map(([, y]) => y);
  assert.ok(ys[49] < 0, "the spike is beyond the range");
  const rest = ys.filter((_, i) => i !== 49);
  assert.ok(Math.max(...rest) - Math.min(...rest) > 0.3 * H, "the other steps still fill much of the plot");
  const clip = ctx.calls.findIndex((c) => c.name === "clip");
  const firstCurve = ctx.calls.findIndex((c) => c.name === "lineTo" && c.strokeStyle === COLORS.raw);
  assert.ok(clip >= 0 && clip < firstCurve, "curves are drawn clipped to the plot");
});

test("a too small box draws nothing; a long status line is shortened", () => {
  const ctx = fakeContext();
  drawPanel(ctx, runOf(10), 0, 0, 30, 20);
  assert.equal(ctx.calls.length, 0);

  const narrow = fakeContext();
  drawPanel(narrow, runOf(10), 0, 0, 120, H);
  const line = narrow.texts()[0];
  assert.ok(line.endsWith("…") && 6 * line.length <= 120 - 16, line);
});

test("fitText keeps short text and cuts long text to the width", () => {
  const ctx = fakeContext();
  assert.equal(fitText(ctx, "short", 100), "short");
  const cut = fitText(ctx, "x".repeat(40), 60);
  assert.equal(cut, "x".repeat(9) + "…");
});
