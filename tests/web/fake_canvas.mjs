// A CanvasRenderingContext2D stand-in that records what is drawn (6 px per character of text).

export function fakeContext() {
  const calls = [];
  const state = { font: "", fillStyle: "", strokeStyle: "", lineWidth: 1, textAlign: "", textBaseline: "", lineJoin: "" };
  const record = (name) => (...args) => { calls.push({ name, args, ...state }); };
  const ctx = {
    calls,
    texts: () => calls.filter((c) => c.name === "fillText").map((c) => c.args[0]),
    measureText: (text) => ({ width: 6 * String(text).length }),
  };
  for (const name of ["save", "restore", "translate", "beginPath", "closePath", "moveTo", "lineTo", "arcTo", "arc",
    "rect", "clip", "fill", "stroke", "fillText", "fillRect", "clearRect", "setTransform", "scale"]) {
    ctx[name] = record(name);
  }
  return new Proxy(ctx, {
    set(target, key, value) {
      if (key in state) state[key] = value;
      else target[key] = value;
      return true;
    },
    get(target, key) {
      return key in state ? state[key] : target[key];
    },
  });
}
