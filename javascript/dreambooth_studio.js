// The DreamBooth tab's live panel in the Automatic1111 / Forge WebUI: polls the extension's API
// (/dreambooth/v1/run, a1111/routes.py) and draws the run with the same chart as the ComfyUI node (web/).
// The WebUI loads every javascript/*.js of an extension as a classic script; the chart modules are imported
// from the extension's web/ folder beside this one.
(() => {
  const WEB = new URL("../web/", document.currentScript.src);
  const API = "/dreambooth/v1";

  async function start() {
    const panel = gradioApp().querySelector("#dreambooth-live");
    if (!panel) return;
    const core = await import(new URL("dreambooth_chart_core.js", WEB).href);
    const { drawPanel, PANEL_MIN_HEIGHT } = await import(new URL("dreambooth_chart_draw.js", WEB).href);
    const canvas = panel.querySelector(".dreambooth-chart");
    const statusLine = panel.querySelector(".dreambooth-status");
    const trigger = panel.querySelector(".dreambooth-trigger");
    const previews = panel.querySelector(".dreambooth-previews");
    const run = core.createRun();
    let after = 0;

    function draw() {
      const width = canvas.clientWidth || 480;
      const height = Math.max(PANEL_MIN_HEIGHT, 220);
      canvas.width = width * devicePixelRatio;
      canvas.height = height * devicePixelRatio;
      canvas.style.height = `${height}px`;
      const ctx = canvas.getContext("2d");
      ctx.setTransform(devicePixelRatio, 0, 0, devicePixelRatio, 0, 0);
      drawPanel(ctx, run, 0, 0, width, height);
    }

    let saved = null; // the "saved" event: the checkpoint's name as the WebUI lists it

    function show(event) {
      // "done" names the file by its path; the WebUI's own name for it reads better
      core.applyRunEvent(run, event.type === "done" && saved ? { ...event, output: saved.checkpoint } : event);
      if (event.type === "start") {
        saved = null;
        trigger.textContent = "";
        previews.replaceChildren();
        panel.classList.remove("dreambooth-failed");
      } else if (event.type === "samples") {
        previews.replaceChildren(...Array.from({ length: event.count }, (_, i) => {
          const img = document.createElement("img");
          img.src = `${API}/preview/${i}?seq=${event.seq}`;
          img.alt = `preview ${i + 1} at step ${event.step}`;
          return img;
        }));
      } else if (event.type === "saved") {
        saved = event;
        trigger.innerHTML = "";
        const code = document.createElement("code");
        code.textContent = event.trigger_phrase;
        trigger.append(`Saved as ${event.checkpoint} (in the checkpoint list). Trigger phrase: `, code);
      } else if (event.type === "error") {
        panel.classList.add("dreambooth-failed");
      }
      const [main, second] = core.headerLines(run);
      statusLine.textContent = second ? `${main} — ${second}` : main;
    }

    async function poll() {
      let busy = false;
      try {
        const answer = await fetch(`${API}/run?after=${after}`);
        if (answer.ok) {
          const data = await answer.json();
          data.events.forEach(show);
          after = data.seq;
          busy = data.state === "running" || data.state === "stopping";
          if (data.events.length) draw();
        }
      } catch (error) {
        // the WebUI restarting: try again later
      }
      setTimeout(poll, busy ? 1000 : 3000);
    }

    new ResizeObserver(draw).observe(canvas);
    draw();
    poll();
  }

  onUiLoaded(start);
})();
