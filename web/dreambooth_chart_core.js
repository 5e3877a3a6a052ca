// Pure logic behind the DreamBooth Train node's live loss chart: run history, smoothing, decimation,
// axis range and the status text. No DOM, no ComfyUI: unit-tested with `node --test tests/web/`.

export const MAX_POINTS = 5000; // points kept per run; older ones are thinned out evenly beyond this
export const EMA_WEIGHT = 0.9; // same smoothing as the PNG curve drawn by trainer/plots.py

/** A number from a message field; anything else (null for a NaN loss, a missing field) is NaN. */
const num = (v) => (typeof v === "number" ? v : NaN);

// ---------- smoothing ----------

/** Exponential moving average, debiased at the start (as TensorBoard and trainer/plots.py draw it). */
export function ema(values, weight = EMA_WEIGHT) {
  const out = [];
  let state = { avg: 0, n: 0 };
  for (const v of values) {
    state = emaStep(state, v, weight);
    out.push(emaValue(state, weight));
  }
  return out;
}

/** One step of the running average: {avg, n} -> {avg, n} after seeing value. */
export function emaStep(state, value, weight = EMA_WEIGHT) {
  return { avg: weight * state.avg + (1 - weight) * value, n: state.n + 1 };
}

/** The debiased value of a running average. */
export function emaValue(state, weight = EMA_WEIGHT) {
  return state.n ? state.avg / (1 - weight ** state.n) : NaN;
}

// ---------- decimation ----------

/** Every other point, always keeping the first and the last. */
export function halve(points) {
  const last = points.length - 1;
  return points.filter((_, i) => i % 2 === 0 || i === last);
}

/** Halve until at most `cap` points remain (cap >= 2); first and last always survive. */
export function decimate(points, cap = MAX_POINTS) {
  let out = points;
  while (out.length > Math.max(2, cap)) out = halve(out);
  return out;
}

// ---------- one run's history ----------

/**
 * A run as the page knows it. points: {i (arrival number), step, loss, ema}.
 * Every `stride`-th arrival is kept; the newest arrival is always kept as a provisional tail.
 */
export function createRun({ cap = MAX_POINTS, weight = EMA_WEIGHT } = {}) {
  return {
    cap, weight, total: 0, points: [], stride: 1, tailIsProvisional: false, arrivals: 0,
    smooth: { avg: 0, n: 0 },
    progress: null, // the last progress message
    statusText: "", statusSeq: 0, startSeq: 0, seq: 0, // message order, to tell stale status lines
    done: null, // the done message, once the run finished
    ended: null, // {kind: "stopped" | "error", step, text, seq}: the run ended without a model
  };
}

/** Forget the history (a new run started). */
export function resetRun(run, total) {
  Object.assign(run, {
    total, points: [], stride: 1, tailIsProvisional: false, arrivals: 0, smooth: { avg: 0, n: 0 },
    progress: null, done: null, ended: null, startSeq: run.seq,
  });
}

/** Is this progress message the start of a new run (step 1, or a different total)? */
export function isNewRun(run, msg) {
  return msg.step <= 1 || msg.total !== run.total;
}

/** Drop points at or after `step` (a run resumed from an earlier saved state). */
export function truncateRun(run, step) {
  const kept = run.points.filter((p) => p.step < step);
  if (kept.length === run.points.length) return;
  run.points = kept;
  run.tailIsProvisional = false;
  const last = kept[kept.length - 1];
  run.arrivals = last ? last.i + 1 : 0;
  // restore the running average so that its debiased value is the last kept point's
  run.smooth = last ? { avg: last.ema * (1 - run.weight ** run.arrivals), n: run.arrivals } : { avg: 0, n: 0 };
}

/** Add one step's loss to the history (non-finite losses are skipped). */
export function addPoint(run, step, loss) {
  if (!Number.isFinite(loss)) return;
  run.smooth = emaStep(run.smooth, loss, run.weight);
  const point = { i: run.arrivals, step, loss, ema: emaValue(run.smooth, run.weight) };
  run.arrivals += 1;
  if (run.tailIsProvisional) run.points.pop();
  run.points.push(point);
  run.tailIsProvisional = point.i % run.stride !== 0;
  if (run.points.length > run.cap) {
    run.points = halve(run.points);
    run.stride *= 2;
    // the tail stays only if it is on the new stride
    run.tailIsProvisional = run.points[run.points.length - 1].i % run.stride !== 0;
  }
}

/** Apply a "dreambooth.progress" message. Returns true when it started a new run. */
export function applyProgress(run, msg) {
  run.seq += 1;
  const fresh = isNewRun(run, msg);
  if (fresh) resetRun(run, msg.total);
  else truncateRun(run, msg.step);
  run.done = null;
  run.ended = null; // (a stopped run queued again moves on from its state)
  addPoint(run, msg.step, num(msg.loss));
  run.progress = msg;
  return fresh;
}

/** Apply a "dreambooth.status" message. */
export function applyStatus(run, msg) {
  run.seq += 1;
  run.statusText = String(msg.text ?? "");
  run.statusSeq = run.seq;
}

/** Apply a "dreambooth.done" message. */
export function applyDone(run, msg) {
  run.seq += 1;
  run.ended = null;
  run.done = { ...msg, seq: run.seq };
}

/** Apply a "dreambooth.stopped" or "dreambooth.error" message ({step, text}): the run ended without a model. */
export function applyEnd(run, msg, kind) {
  run.seq += 1;
  run.ended = { kind, step: msg.step, text: String(msg.text ?? ""), seq: run.seq };
}

// ---------- finding a node's run ----------

/**
 * Which run (server node id) belongs to a node on the canvas.
 * keys: the server ids seen, oldest update first. Matches the exact id, else the last part of a
 * subgraph path ("7:3" for node 3), else, if the node is the only train node shown, the newest run.
 */
export function matchRunKey(nodeId, keys, onlyNode = false) {
  const id = String(nodeId);
  if (keys.includes(id)) return id;
  const bySuffix = keys.filter((k) => String(k).split(":").pop() === id);
  if (bySuffix.length) return bySuffix[bySuffix.length - 1];
  if (onlyNode && keys.length) return keys[keys.length - 1];
  return null;
}

// ---------- axes ----------

/** Value at quantile q (0..1) of numbers, by linear interpolation. */
export function quantile(values, q) {
  const s = values.filter(Number.isFinite).sort((a, b) => a - b);
  if (!s.length) return NaN;
  const pos = (s.length - 1) * Math.min(1, Math.max(0, q));
  const lo = Math.floor(pos);
  const hi = Math.min(s.length - 1, lo + 1);
  return s[lo] + (s[hi] - s[lo]) * (pos - lo);
}

/**
 * The y range of the chart, padded by `pad`: the raw losses between their (1-q)- and q-quantiles, and the
 * whole smoothed curve after its warm-up (the first 1/(1-weight) steps, where the debiased average is still
 * about the raw loss). Rare spikes are cut at the edge of the plot rather than flattening the rest.
 */
export function lossRange(points, { q = 0.98, pad = 0.05, weight = EMA_WEIGHT } = {}) {
  if (!points.length) return { lo: 0, hi: 1 };
  const raw = points.map((p) => p.loss);
  const warm = points.filter((p) => p.i >= Math.round(1 / (1 - weight)));
  const smooth = (warm.length ? warm : points).map((p) => p.ema);
  const lo = Math.min(quantile(raw, 1 - q), ...smooth);
  const hi = Math.max(quantile(raw, q), ...smooth);
  if (!(hi > lo)) {
    const d = Math.abs(lo) * 0.1 || 0.01; // a flat history: open a small band around it
    return { lo: lo - d, hi: hi + d };
  }
  const d = (hi - lo) * pad;
  return { lo: lo >= 0 ? Math.max(0, lo - d) : lo - d, hi: hi + d }; // never pad a positive loss below 0
}

/** Map v from [d0, d1] onto [r0, r1]. */
export function scale(v, d0, d1, r0, r1) {
  return d1 === d0 ? (r0 + r1) / 2 : r0 + ((v - d0) / (d1 - d0)) * (r1 - r0);
}

// ---------- text ----------

/** Seconds as "45s", "3m12s", "1h02m"; "" when unknown. */
export function formatDuration(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return "";
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  const pad = (n) => String(n).padStart(2, "0");
  if (s < 3600) return `${Math.floor(s / 60)}m${pad(s % 60)}s`;
  return `${Math.floor(s / 3600)}h${pad(Math.floor((s % 3600) / 60))}m`;
}

/** A learning rate as Python's "%.1e" writes it: 2e-6 -> "2.0e-06". */
export function formatLr(lr) {
  if (!Number.isFinite(lr)) return "?";
  const [mantissa, exp] = lr.toExponential(1).split("e");
  const sign = exp.startsWith("-") ? "-" : "+";
  return `${mantissa}e${sign}${exp.replace(/^[+-]/, "").padStart(2, "0")}`;
}

/** A loss with 4 decimals (or 4 significant digits when large). */
export function formatLoss(loss) {
  if (!Number.isFinite(loss)) return "nan";
  return Math.abs(loss) < 10 ? loss.toFixed(4) : loss.toPrecision(4);
}

/** An axis label: 2 significant digits, no trailing zeros (0.328 -> "0.33", 0.00976 -> "0.0098"). */
export function formatAxis(v) {
  return Number.isFinite(v) ? String(Number(v.toPrecision(2))) : "";
}

/** "step 120/400 · loss 0.1234 · lr 2.0e-06 · 3m12s left" (no time left once the last step is done). */
export function progressText(p) {
  const parts = [`step ${p.step}/${p.total}`, `loss ${formatLoss(num(p.loss))}`, `lr ${formatLr(num(p.lr))}`];
  const left = formatDuration(num(p.eta_s));
  if (p.step < p.total && left) parts.push(`${left} left`);
  return parts.join(" · ");
}

/** "done · 400 steps · dreambooth/zwx-dog.safetensors" */
export function doneText(d) {
  return ["done", Number.isFinite(d.steps) ? `${d.steps} steps` : "", d.output || ""].filter(Boolean).join(" · ");
}

/**
 * The two header lines for a run: [main, secondary]. Main: done > progress > status > waiting.
 * Secondary: a status line logged during the run (after "done": one logged since), else the last progress.
 */
export function headerLines(run) {
  if (!run) return ["waiting for a run", ""];
  if (run.ended) {
    const { kind, step, text } = run.ended;
    if (kind === "stopped") return [`stopped at step ${step} · its state is kept`, text];
    return [`error: ${text}`, run.progress ? `at ${progressText(run.progress)}` : ""];
  }
  const status = run.statusText && run.statusSeq > run.startSeq ? run.statusText : "";
  if (run.done) {
    const since = run.statusSeq > run.done.seq ? run.statusText : "";
    return [doneText(run.done), since || (run.progress ? progressText(run.progress) : "")];
  }
  if (run.progress) return [progressText(run.progress), status];
  return [run.statusText || "waiting for a run", ""];
}

// ---------- a run told again ----------

/** A run rebuilt from the messages it got, in order (a page opened after them: nodes/comfy_io.py's RunLog). */
export function replayRun(events) {
  const run = createRun();
  for (const event of events) applyRunEvent(run, event);
  return run;
}

// ---------- the WebUI tab's run ----------

/**
 * Apply one event of a polled run (the WebUI API's /dreambooth/v1/run, trainer/background.py): "start" begins a new
 * history, "progress"/"status"/"done" are the ComfyUI messages' shapes, "phase" (class images) and the run's last
 * word ("stopped", "error") show as the status line. Other events ("samples", "saved", "evaluation") are the page's.
 */
export function applyRunEvent(run, event) {
  switch (event.type) {
    case "start":
      resetRun(run, 0);
      applyStatus(run, { text: event.text || "starting" });
      break;
    case "progress":
      applyProgress(run, event);
      break;
    case "phase":
      applyStatus(run, { text: `${event.what}: ${event.done}/${event.total}` });
      break;
    case "status":
      applyStatus(run, event);
      break;
    case "stopped":
    case "error":
      applyEnd(run, event, event.type);
      break;
    case "done":
      applyDone(run, event);
      break;
  }
}
