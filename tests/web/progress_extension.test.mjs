// The ComfyUI extension (web/dreambooth_progress.js) against stand-ins for app, api and the page:
// node --test tests/web/
import assert from "node:assert/strict";
import { cpSync, mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath, pathToFileURL } from "node:url";

import { fakeContext } from "./fake_canvas.mjs";

const WEB = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "web");
const root = mkdtempSync(join(tmpdir(), "dreambooth-web-"));

// ---------- stand-ins ----------

const frames = []; // pending requestAnimationFrame callbacks
const flushFrames = () => frames.splice(0).forEach((cb) => cb(0));
const contexts = []; // one fake 2D context per <canvas> made by the extension

let answerRuns; // resolves the extension's GET /dreambooth/runs, which a test answers late (as a slow server)
const runsAnswer = new Promise((resolve) => { answerRuns = (body) => resolve({ ok: true, json: async () => body }); });

const fake = {
  app: {
    extensions: [],
    canvas: { ds: { scale: 1 } },
    dirty: 0,
    graph: { setDirtyCanvas: () => { fake.app.dirty += 1; } },
    registerExtension(ext) { this.extensions.push(ext); },
  },
  api: Object.assign(new EventTarget(), {
    fetched: [],
    fetchApi(route) { this.fetched.push(route); return runsAnswer; },
  }),
};

function fakeCanvas() {
  const ctx = fakeContext();
  contexts.push(ctx);
  return { style: {}, dataset: {}, attributes: {}, width: 0, height: 0, clientWidth: 360, clientHeight: 170,
    getContext: () => ctx, setAttribute(name, value) { this.attributes[name] = String(value); } };
}

/** A LiteGraph-like node; withDom=false models a frontend without addDOMWidget. */
function makeNode(id, comfyClass = "DBStudioTrain", withDom = true) {
  const node = {
    id, comfyClass, type: comfyClass, size: [220, 80], widgets: [], flags: {}, inputs: [], outputs: [],
    removed: 0,
    computeSize() { return [220, 80 + this.widgets.reduce((h, w) => h + (w.options?.getMinHeight?.() ?? 20), 0)]; },
    setSize(s) { this.size = s; },
    onRemoved() { this.removed += 1; },
  };
  if (withDom) {
    node.addDOMWidget = function (name, type, element, options) {
      const w = { name, type, element, options };
      this.widgets.push(w);
      return w;
    };
  }
  return node;
}

const send = (type, detail) => fake.api.dispatchEvent(new CustomEvent(type, { detail }));
const lastTexts = (ctx) => ctx.texts();

let ext;

before(async () => {
  // the layout ComfyUI serves: /scripts/app.js and /extensions/<pack>/*.js
  mkdirSync(join(root, "scripts"));
  writeFileSync(join(root, "scripts", "app.js"), "export const app = globalThis.__dbFake.app;\n");
  writeFileSync(join(root, "scripts", "api.js"), "export const api = globalThis.__dbFake.api;\n");
  const pack = join(root, "extensions", "dreambooth");
  mkdirSync(pack, { recursive: true });
  for (const f of readdirSync(WEB).filter((f) => f.endsWith(".js"))) cpSync(join(WEB, f), join(pack, f));
  Object.assign(globalThis, {
    __dbFake: fake,
    document: { createElement: (tag) => (assert.equal(tag, "canvas"), fakeCanvas()) },
    requestAnimationFrame: (cb) => frames.push(cb),
  });
  await import(pathToFileURL(join(pack, "dreambooth_progress.js")).href);
  ext = fake.app.extensions.find((e) => e.name === "dreambooth.studio.progress");
  ext.setup();
});

after(() => rmSync(root, { recursive: true, force: true }));

// ---------- tests (they share the extension's state, in order) ----------

test("registers one extension with setup and nodeCreated", () => {
  assert.equal(fake.app.extensions.length, 1);
  assert.equal(typeof ext.nodeCreated, "function");
});

test("other nodes are left alone", () => {
  const other = makeNode(9, "KSampler");
  ext.nodeCreated(other);
  assert.equal(other.widgets.length, 0);
  assert.deepEqual(other.size, [220, 80]);
});

test("a train node gets a canvas widget that is never serialized", () => {
  const node = makeNode(7);
  ext.nodeCreated(node);
  assert.equal(node.widgets.length, 1);
  const [w] = node.widgets;
  assert.equal(w.options.serialize, false);
  assert.equal(w.serialize, false);
  assert.ok(w.options.getMinHeight() >= 120);
  assert.ok(node.size[0] >= 360, "wide enough for the status line");
  assert.ok(node.size[1] >= 80 + w.options.getMinHeight());
  flushFrames();
  assert.equal(lastTexts(contexts.at(-1))[0], "waiting for a run");
  globalThis.__node7 = node;
});

test("messages reach the node's chart, repainted once per animation frame", () => {
  const ctx = contexts.at(-1);
  const dirty = fake.app.dirty;
  send("dreambooth.status", { node: "7", text: "Loading model" });
  for (let step = 1; step <= 3; step++) {
    send("dreambooth.progress", { node: "7", step, total: 400, loss: 0.1 * step, instance_loss: 0, prior_loss: 0,
      lr: 2e-6, elapsed_s: step, eta_s: 192 });
  }
  assert.equal(frames.length, 1, "four messages, one scheduled frame");
  ctx.calls.length = 0;
  flushFrames();
  assert.equal(fake.app.dirty, dirty + 1);
  assert.equal(lastTexts(ctx)[0], "step 3/400 · loss 0.3000 · lr 2.0e-06 · 3m12s left");
  assert.ok(ctx.calls.filter((c) => c.name === "lineTo").length >= 4, "curves drawn");

  send("dreambooth.done", { node: "7", output: "dreambooth/zwx-dog.safetensors", steps: 400 });
  ctx.calls.length = 0;
  flushFrames();
  assert.equal(lastTexts(ctx)[0], "done · 400 steps · dreambooth/zwx-dog.safetensors");
  // the status lines as the canvas's text too (screen readers, the browser test)
  assert.equal(globalThis.__node7.widgets[0].element.attributes["aria-label"],
    "done · 400 steps · dreambooth/zwx-dog.safetensors — step 3/400 · loss 0.3000 · lr 2.0e-06 · 3m12s left");
});

test("a node inside a subgraph is found by the last part of its path", () => {
  const inner = makeNode(3);
  ext.nodeCreated(inner);
  const ctx = contexts.at(-1);
  send("dreambooth.progress", { node: "12:3", step: 1, total: 50, loss: 0.25, lr: 1e-5, eta_s: 30 });
  flushFrames();
  assert.equal(lastTexts(ctx)[0], "step 1/50 · loss 0.2500 · lr 1.0e-05 · 30s left");
  // node 7 keeps its own run
  assert.equal(lastTexts(contexts[0]).filter((t) => t.startsWith("done"))[0], "done · 400 steps · dreambooth/zwx-dog.safetensors");
  inner.onRemoved();
  assert.equal(inner.removed, 1, "the node's own onRemoved still runs");
});

test("without addDOMWidget the panel is drawn in onDrawForeground under the widgets", () => {
  globalThis.__node7.onRemoved(); // leave this node as the only train node on the page
  const node = makeNode(5, "DBStudioTrain", false);
  ext.nodeCreated(node);
  assert.ok(node.size[1] >= 80 + 120, "room for the panel");
  const ctx = fakeContext();
  node.onDrawForeground(ctx);
  // the only train node: it shows the newest run ("12:3") even though its id differs
  assert.equal(ctx.texts()[0], "step 1/50 · loss 0.2500 · lr 1.0e-05 · 30s left");
  const box = ctx.calls.find((c) => c.name === "translate");
  assert.deepEqual(box.args, [8, 6]);
  node.flags.collapsed = true;
  const collapsed = fakeContext();
  node.onDrawForeground(collapsed);
  assert.equal(collapsed.calls.length, 0, "nothing drawn while collapsed");
});

test("a page opened later shows the runs the server remembers; a run already live keeps its own", async () => {
  assert.deepEqual(fake.api.fetched, ["/dreambooth/runs"], "asked once, at setup");
  const node = makeNode(40);
  ext.nodeCreated(node);
  const ctx = contexts.at(-1);
  const hint = "Queue the same workflow again to continue from here.";
  answerRuns({
    40: [{ type: "status", text: "Training SD 1.x at 64 px" },
      { type: "progress", step: 1, total: 60, loss: 1.5 },
      { type: "progress", step: 7, total: 60, loss: 1.6391, lr: 1e-5, eta_s: 1697 },
      { type: "stopped", step: 7, text: hint }],
    7: [{ type: "progress", step: 1, total: 9, loss: 9 }], // older than what this page saw live
  });
  await new Promise((resolve) => setTimeout(resolve, 0));
  flushFrames();
  assert.deepEqual(lastTexts(ctx).slice(0, 2), ["stopped at step 7 · its state is kept", hint]);
  assert.ok(ctx.calls.filter((c) => c.name === "lineTo").length >= 2, "the restored curve is drawn");
  const again = makeNode(7);
  ext.nodeCreated(again);
  flushFrames();
  assert.equal(lastTexts(contexts.at(-1))[0], "done · 400 steps · dreambooth/zwx-dog.safetensors");
});
