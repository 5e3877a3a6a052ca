// Unit tests of the chart's pure logic: node --test tests/web/
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import {
  MAX_POINTS, addPoint, applyDone, applyEnd, applyProgress, applyRunEvent, applyStatus, createRun, decimate, ema, emaStep, emaValue,
  formatAxis, formatDuration, formatLoss, formatLr, halve, headerLines, isNewRun, lossRange, matchRunKey,
  progressText, quantile, replayRun, scale,
} from "../../web/dreambooth_chart_core.js";

const close = (a, b, eps = 1e-12) => assert.ok(Math.abs(a - b) <= eps, `${a} != ${b}`);
const closeAll = (as, bs, eps) => {
  assert.equal(as.length, bs.length);
  as.forEach((a, i) => close(a, bs[i], eps));
};
const progress = (step, loss, extra = {}) => ({ node: "7", step, total: 400, loss, lr: 2e-6, eta_s: 10, ...extra });
const feed = (run, losses, total = 400) => losses.forEach((loss, i) => applyProgress(run, progress(i + 1, loss, { total })));

describe("ema (debiased, as trainer/plots.py)", () => {
  test("hand-computed values, weight 0.9", () => {
    // a1 = 0.1*1/(1-0.9) = 1; a2 = (0.9*0.1 + 0.1*3)/(1-0.81) = 0.39/0.19; a3 = 0.9*0.39/(1-0.729) = 0.351/0.271
    closeAll(ema([1, 3, 0]), [1, 0.39 / 0.19, 0.351 / 0.271]);
  });
  test("hand-computed values, weight 0.5", () => {
    // avg 0.5, 0.25, 0.125 over 1-0.5^n = 0.5, 0.75, 0.875
    closeAll(ema([1, 0, 0], 0.5), [1, 1 / 3, 0.125 / 0.875]);
  });
  test("a constant stays constant from the first point (no bias towards 0)", () => {
    closeAll(ema(Array(50).fill(5)), Array(50).fill(5), 1e-9);
  });
  test("incremental steps give the same numbers", () => {
    let s = { avg: 0, n: 0 };
    assert.ok(Number.isNaN(emaValue(s)));
    s = emaStep(s, 1);
    s = emaStep(s, 3);
    close(emaValue(s), 0.39 / 0.19);
  });
});

describe("decimation", () => {
  test("halve keeps every other point plus the first and the last", () => {
    assert.deepEqual(halve([0, 1, 2, 3, 4]), [0, 2, 4]);
    assert.deepEqual(halve([0, 1, 2, 3]), [0, 2, 3]);
    assert.deepEqual(halve([0]), [0]);
  });
  test("decimate caps the length and keeps first and last", () => {
    const xs = Array.from({ length: 10001 }, (_, i) => i);
    const out = decimate(xs, 5000);
    assert.ok(out.length <= 5000 && out.length > 2500, `length ${out.length}`);
    assert.equal(out[0], 0);
    assert.equal(out[out.length - 1], 10000);
    assert.equal(decimate(xs.slice(0, 10), 5000).length, 10); // short enough: unchanged
  });
  test("a run never holds more than its cap, stays evenly spaced and ends on the newest step", () => {
    const run = createRun({ cap: 100 });
    const losses = Array.from({ length: 1000 }, (_, i) => 1 / (1 + i) + (i % 7) * 0.01);
    losses.forEach((loss, i) => {
      applyProgress(run, progress(i + 1, loss, { total: 1000 }));
      assert.ok(run.points.length <= 100);
    });
    const steps = run.points.map((p) => p.step);
    assert.equal(steps[0], 1);
    assert.equal(steps[steps.length - 1], 1000);
    assert.ok(run.points.length > 50);
    const gaps = new Set(steps.slice(1, -1).map((s, i) => s - steps[i]));
    assert.deepEqual([...gaps], [run.stride]); // kept points are every stride-th step
    // the smoothing saw every step, not just the kept ones
    close(run.points[run.points.length - 1].ema, ema(losses).at(-1), 1e-9);
  });
  test("the default cap is 5000 points", () => {
    const run = createRun();
    for (let s = 1; s <= 12000; s++) addPoint(run, s, 1 / s);
    assert.equal(MAX_POINTS, 5000);
    assert.ok(run.points.length <= 5000 && run.points.length >= 2500, `length ${run.points.length}`);
    assert.equal(run.points.at(-1).step, 12000);
  });
});

describe("runs", () => {
  test("points carry the loss and its running average", () => {
    const run = createRun();
    feed(run, [1, 3, 0]);
    assert.deepEqual(run.points.map((p) => p.step), [1, 2, 3]);
    assert.deepEqual(run.points.map((p) => p.loss), [1, 3, 0]);
    closeAll(run.points.map((p) => p.ema), [1, 0.39 / 0.19, 0.351 / 0.271]);
    assert.equal(run.total, 400);
  });
  test("step 1 starts a new run and clears the history", () => {
    const run = createRun();
    feed(run, [0.5, 0.4, 0.3, 0.2]);
    assert.equal(applyProgress(run, progress(1, 0.9)), true);
    assert.deepEqual(run.points.map((p) => [p.step, p.loss, p.ema]), [[1, 0.9, 0.9]]);
  });
  test("a new total starts a new run", () => {
    const run = createRun();
    feed(run, [0.5, 0.4, 0.3]);
    assert.equal(isNewRun(run, progress(4, 0.1, { total: 800 })), true);
    assert.equal(applyProgress(run, progress(4, 0.1, { total: 800 })), true);
    assert.equal(run.total, 800);
    assert.deepEqual(run.points.map((p) => p.step), [4]);
    close(run.points[0].ema, 0.1); // smoothing restarted too
  });
  test("the next step of the same run does not reset", () => {
    const run = createRun();
    feed(run, [0.5, 0.4]);
    assert.equal(applyProgress(run, progress(3, 0.3)), false);
    assert.equal(run.points.length, 3);
  });
  test("a resume from an earlier step drops the later points and smooths on from the kept ones", () => {
    const run = createRun();
    const losses = [0.9, 0.7, 0.8, 0.4, 0.6, 0.3, 0.5, 0.2];
    feed(run, losses);
    applyProgress(run, progress(6, 0.1)); // resumed from the state saved after step 5
    assert.deepEqual(run.points.map((p) => p.step), [1, 2, 3, 4, 5, 6]);
    close(run.points.at(-1).ema, ema([...losses.slice(0, 5), 0.1]).at(-1), 1e-12);
  });
  test("a non-finite or missing loss updates the status but adds no point", () => {
    const run = createRun();
    feed(run, [0.5, 0.4]);
    applyProgress(run, progress(3, null));
    applyProgress(run, progress(4, NaN));
    assert.equal(run.points.length, 2);
    assert.equal(run.progress.step, 4);
    assert.match(progressText(run.progress), /loss nan/);
  });
});

describe("finding a node's run", () => {
  test("exact id, then the last part of a subgraph path", () => {
    assert.equal(matchRunKey(7, ["3", "7"]), "7");
    assert.equal(matchRunKey("3", ["12:3"]), "12:3");
    assert.equal(matchRunKey(3, ["3", "12:3"]), "3"); // exact wins
    assert.equal(matchRunKey(3, ["5:3", "12:3"]), "12:3"); // the newest of several
  });
  test("no false matches on digits", () => {
    assert.equal(matchRunKey(7, ["17", "1:17", "7:1"]), null);
  });
  test("the only train node on the page shows the newest run", () => {
    assert.equal(matchRunKey(4, ["9", "12"], true), "12");
    assert.equal(matchRunKey(4, [], true), null);
  });
});

describe("axis", () => {
  test("quantile interpolates", () => {
    assert.equal(quantile([4, 1, 3, 2], 0.5), 2.5);
    assert.equal(quantile([4, 1, 3, 2], 1), 4);
    assert.equal(quantile([4, 1, 3, 2], 0), 1);
  });
  test("range covers the data with a little padding", () => {
    const points = [0.2, 0.3, 0.4].map((loss, i) => ({ i, step: i + 1, loss, ema: loss }));
    const { lo, hi } = lossRange(points, { q: 1, pad: 0.1 });
    close(lo, 0.18, 1e-12);
    close(hi, 0.42, 1e-12);
  });
  test("the smoothed curve after its warm-up is always in range; its first steps may be cut", () => {
    const run = createRun();
    feed(run, Array.from({ length: 100 }, (_, k) => (k === 0 ? 5 : 0.1 + 0.3 / (k + 1))));
    const { lo, hi } = lossRange(run.points, { pad: 0 });
    const warm = run.points.filter((p) => p.i >= 10);
    assert.ok(warm.every((p) => p.ema >= lo && p.ema <= hi));
    assert.ok(run.points[0].ema > hi, "the 5.0 first step does not set the scale");
    assert.ok(hi < 1, `hi ${hi}`);
  });
  test("a rare spike (or dip) in the raw loss is clipped; its mark on the smoothed curve is not", () => {
    const run = createRun();
    feed(run, Array.from({ length: 100 }, (_, k) => ({ 50: 10, 20: 1e-4 })[k] ?? 0.1 + (k % 3) * 0.01));
    const { lo, hi } = lossRange(run.points);
    const topEma = Math.max(...run.points.map((p) => p.ema)); // about 0.1 + 0.1 * 10
    const lowEma = Math.min(...run.points.map((p) => p.ema)); // about 0.1 - 0.1 * 0.1
    assert.ok(hi >= topEma && hi < 2, `hi ${hi}`);
    assert.ok(lo <= lowEma && lo > 0.02, `lo ${lo}`);
  });
  test("positive losses are never padded below 0; a flat history gets a band", () => {
    const points = [0.01, 1].map((loss, i) => ({ i, step: i, loss, ema: loss }));
    assert.equal(lossRange(points, { q: 1, pad: 0.5 }).lo, 0);
    const flat = lossRange([{ i: 0, step: 1, loss: 0.2, ema: 0.2 }]);
    assert.ok(flat.lo < 0.2 && flat.hi > 0.2);
    assert.deepEqual(lossRange([]), { lo: 0, hi: 1 });
  });
  test("scale maps linearly and survives an empty domain", () => {
    assert.equal(scale(5, 0, 10, 100, 200), 150);
    close(scale(0.3, 0.1, 0.5, 80, 0), 40, 1e-9); // y grows downwards
    assert.equal(scale(3, 3, 3, 0, 10), 5);
  });
  test("axis labels use 2 significant digits", () => {
    assert.equal(formatAxis(0.328), "0.33");
    assert.equal(formatAxis(0.00976), "0.0098");
    assert.equal(formatAxis(1.5), "1.5");
    assert.equal(formatAxis(NaN), "");
  });
});

describe("status text", () => {
  test("durations", () => {
    assert.equal(formatDuration(192), "3m12s");
    assert.equal(formatDuration(0), "0s");
    assert.equal(formatDuration(45.4), "45s");
    assert.equal(formatDuration(59.6), "1m00s");
    assert.equal(formatDuration(65), "1m05s");
    assert.equal(formatDuration(3725), "1h02m");
    assert.equal(formatDuration(-1), "");
    assert.equal(formatDuration(NaN), "");
  });
  test("learning rates as Python's %.1e", () => {
    assert.equal(formatLr(2e-6), "2.0e-06");
    assert.equal(formatLr(1e-4), "1.0e-04");
    assert.equal(formatLr(3.14e-5), "3.1e-05");
    assert.equal(formatLr(1234), "1.2e+03");
    assert.equal(formatLr(0), "0.0e+00");
    assert.equal(formatLr(NaN), "?");
  });
  test("losses", () => {
    assert.equal(formatLoss(0.12344), "0.1234");
    assert.equal(formatLoss(0.1), "0.1000");
    assert.equal(formatLoss(123.456), "123.5");
    assert.equal(formatLoss(Infinity), "nan");
  });
  test("the progress line", () => {
    const p = { node: "7", step: 120, total: 400, loss: 0.12344, lr: 2e-6, eta_s: 192 };
    assert.equal(progressText(p), "step 120/400 · loss 0.1234 · lr 2.0e-06 · 3m12s left");
    assert.equal(progressText({ ...p, step: 400, eta_s: 0 }), "step 400/400 · loss 0.1234 · lr 2.0e-06");
    assert.equal(progressText({ ...p, eta_s: undefined }), "step 120/400 · loss 0.1234 · lr 2.0e-06");
  });
  test("header lines follow the run", () => {
    assert.deepEqual(headerLines(null), ["waiting for a run", ""]);
    const run = createRun();
    applyStatus(run, { node: "7", text: "Loading model" });
    assert.deepEqual(headerLines(run), ["Loading model", ""]);
    applyProgress(run, { node: "7", step: 1, total: 400, loss: 0.2, lr: 2e-6, eta_s: 192 });
    // the status from before the run is stale once it starts
    assert.deepEqual(headerLines(run), ["step 1/400 · loss 0.2000 · lr 2.0e-06 · 3m12s left", ""]);
    applyStatus(run, { node: "7", text: "Saved samples at step 1" });
    assert.equal(headerLines(run)[1], "Saved samples at step 1");
    applyDone(run, { node: "7", output: "dreambooth/zwx-dog.safetensors", steps: 400 });
    assert.deepEqual(headerLines(run), [
      "done · 400 steps · dreambooth/zwx-dog.safetensors", "step 1/400 · loss 0.2000 · lr 2.0e-06 · 3m12s left",
    ]);
    applyStatus(run, { node: "7", text: "Loading model" }); // the next queue run is on its way
    assert.deepEqual(headerLines(run), ["done · 400 steps · dreambooth/zwx-dog.safetensors", "Loading model"]);
    applyProgress(run, { node: "7", step: 1, total: 400, loss: 0.3, lr: 2e-6, eta_s: 10 });
    assert.equal(run.done, null);
    assert.equal(run.points.length, 1);
  });
});

describe("applyRunEvent (the WebUI tab's polled run, trainer/background.py's events)", () => {
  test("a run's events in order: start, class images, steps, stop, restart", () => {
    const run = createRun();
    applyRunEvent(run, { seq: 1, type: "start", text: "Training 'zwx dog'" });
    assert.deepEqual(headerLines(run), ["Training 'zwx dog'", ""]);
    applyRunEvent(run, { seq: 2, type: "phase", what: "Class images", done: 3, total: 200 });
    assert.deepEqual(headerLines(run), ["Class images: 3/200", ""]);
    [0.5, 0.25].forEach((loss, i) => applyRunEvent(run, { type: "progress", ...progress(i + 1, loss, { total: 4 }) }));
    assert.deepEqual(run.points.map((p) => p.loss), [0.5, 0.25]);
    applyRunEvent(run, { type: "samples", step: 2, count: 1 }); // the page's, not the chart's
    assert.equal(run.points.length, 2);
    applyRunEvent(run, { type: "stopped", step: 2, text: "Train again to continue." });
    assert.deepEqual(headerLines(run), ["stopped at step 2 · its state is kept", "Train again to continue."]);
    applyRunEvent(run, { type: "start", text: "again" }); // Train again: a new history
    assert.equal(run.points.length, 0);
    applyRunEvent(run, { type: "progress", ...progress(3, 0.2, { total: 4 }) });
    applyRunEvent(run, { type: "done", output: "zwx-dog.safetensors", steps: 4 });
    assert.equal(headerLines(run)[0], "done · 4 steps · zwx-dog.safetensors");
  });

  test("an error is the status line", () => {
    const run = createRun();
    applyRunEvent(run, { type: "start", text: "" });
    applyRunEvent(run, { type: "error", text: "Steps: 0 must be at least 1" });
    assert.deepEqual(headerLines(run), ["error: Steps: 0 must be at least 1", ""]);
  });
});

describe("a run that ends without a model looks ended (ComfyUI's stop button, an error)", () => {
  test("after the stop button the top line says stopped, not the last step's progress", () => {
    const run = createRun();
    feed(run, [0.5, 0.4, 0.3], 60);
    assert.match(headerLines(run)[0], /^step 3\/60/);
    applyEnd(run, { node: "7", step: 3, text: "Queue the same workflow again to continue from here." }, "stopped");
    assert.deepEqual(headerLines(run), ["stopped at step 3 · its state is kept",
      "Queue the same workflow again to continue from here."]);
    assert.equal(run.points.length, 3); // the chart stays
    applyProgress(run, progress(4, 0.2, { total: 60 })); // queued again: it moves on
    assert.match(headerLines(run)[0], /^step 4\/60/);
  });

  test("an error is said as one, with where it happened", () => {
    const run = createRun();
    feed(run, [0.5], 60);
    applyEnd(run, { node: "7", text: "The GPU ran out of memory in training" }, "error");
    assert.deepEqual(headerLines(run), ["error: The GPU ran out of memory in training",
      "at step 1/60 · loss 0.5000 · lr 2.0e-06 · 10s left"]);
    applyDone(run, { steps: 60, output: "x.safetensors" });
    assert.match(headerLines(run)[0], /^done/);
  });
});

describe("a run told again to a page opened later (replayRun, nodes/comfy_io.py's RunLog)", () => {
  test("the messages replayed give the panel the live page had: points, smoothing, stop and resume", () => {
    const messages = [
      { type: "status", text: "Training SD 1.x at 64 px" },
      ...[0.5, 0.4, 0.45].map((loss, i) => ({ type: "progress", ...progress(i + 1, loss, { total: 60 }) })),
      { type: "stopped", step: 3, text: "Queue the same workflow again to continue from here." },
      { type: "progress", ...progress(3, 0.3, { total: 60 }) }, // resumed from an earlier state: step 3 again
      { type: "progress", ...progress(4, 0.2, { total: 60 }) },
      { type: "done", output: "dreambooth/zwx-dog.safetensors", steps: 60 },
    ];
    const live = createRun(); // as web/dreambooth_progress.js's listeners apply them
    const listeners = { status: applyStatus, progress: applyProgress, done: applyDone,
      stopped: (run, msg) => applyEnd(run, msg, "stopped") };
    messages.forEach(({ type, ...msg }) => listeners[type](live, msg));
    const replayed = replayRun(messages);
    assert.deepEqual(replayed.points, live.points);
    assert.deepEqual(replayed.points.map((p) => p.step), [1, 2, 3, 4]);
    assert.deepEqual(headerLines(replayed), headerLines(live));
    assert.equal(headerLines(replayed)[0], "done · 60 steps · dreambooth/zwx-dog.safetensors");
    assert.deepEqual(headerLines(replayRun(messages.slice(0, 5))),
      ["stopped at step 3 · its state is kept", "Queue the same workflow again to continue from here."]);
    assert.deepEqual(headerLines(replayRun([])), ["waiting for a run", ""]);
  });
});
