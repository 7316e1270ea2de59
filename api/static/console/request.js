import {
  $, LIVE, api, apiKey, cancelRequest, el, formatSeconds, formatTime, imageBlobUrl, pageError,
  problemText, setText, show, showMessage, signedIn, statusBadge,
} from "./console.js";

const requestId = $("request").dataset.requestId;
const base = `/v2/requests/${encodeURIComponent(requestId)}`;
const POLL_MS = 750;
const EXTENSIONS = { webp: "webp", jpeg: "jpg", jpg: "jpg", png: "png" };
let shownImages = 0;
let finished = false;

function describe(parameters) {
  if (!parameters) return;
  setText("prompt", parameters.prompt);
  if (parameters.negative_prompt) {
    setText("negative-prompt", `Not: ${parameters.negative_prompt}`);
    show("negative-prompt");
  }
  setText(
    "parameters",
    `${parameters.width}×${parameters.height}, ${parameters.steps} steps, cfg ${parameters.cfg}, ` +
      `${parameters.scheduler}, seed ${parameters.seed}, ${parameters.number_of_images} image(s), ` +
      `${parameters.output_format}`,
  );
}

// The result: fresh expiring links and seeds. Each image is fetched with the key and
// shown as a blob; the expiring link is offered to share.
async function showResults() {
  const result = await api(base);
  if (result.status === 410) {
    showMessage("request-note", "These results passed their retention and were deleted.");
    return;
  }
  if (!result.body) return;
  describe(result.body.parameters);
  const outputs = Array.isArray(result.body.outputs) ? result.body.outputs : [];
  if (result.body.results_expire_at) {
    setText("results-expiry", `Kept until ${formatTime(result.body.results_expire_at)}; links expire ${formatTime(result.body.output_expires_at)}.`);
  }
  for (const output of outputs.slice(shownImages)) {
    shownImages += 1;
    show("results");
    const image = el("img", { alt: `Image ${output.index + 1}, seed ${output.seed}`, class: "result", "data-index": output.index });
    const download = el("a", { class: "button secondary", text: "Download" });
    const figure = el(
      "figure",
      { class: "image-card" },
      image,
      el(
        "figcaption",
        {},
        el("span", { class: "seed", text: `Seed ${output.seed}` }),
        download,
        el("a", { href: output.url, target: "_blank", rel: "noopener noreferrer", class: "link", text: "Expiring link" }),
      ),
    );
    $("images").append(figure);
    try {
      const url = await imageBlobUrl(requestId, output.index);
      image.src = url;
      const extension = EXTENSIONS[result.body.parameters?.output_format] || "img";
      download.href = url;
      download.download = `${requestId}-${output.index}-seed${output.seed}.${extension}`;
    } catch (error) {
      figure.append(el("p", { class: "field-error", text: error.message }));
    }
  }
}

function showStatus(body, httpStatus) {
  statusBadge($("status"), body.status, body.cancelled);
  const progress = body.progress || {};
  const images = progress.images || 1;
  const done = progress.images_done || 0;
  const fraction = body.status === "COMPLETED" ? 1 : Math.min(1, (done + (progress.steps ? (progress.step || 0) / progress.steps : 0)) / images);
  $("progress-bar").value = fraction;
  setText("queue-position", body.status === "QUEUED" && body.queue_position !== undefined ? body.queue_position : "–");
  setText("eta", LIVE.has(body.status) ? formatSeconds(body.eta_seconds) : "–");
  setText("step", body.status === "PROCESSING" ? `${progress.step || 0} of ${progress.steps}` : body.status === "QUEUED" ? "waiting" : "–");
  setText("images-done", `${done} of ${images}`);
  show("cancel", LIVE.has(body.status));
  if (httpStatus === 422 || body.status === "FAILED") {
    showMessage("request-error", body.error || "The render failed");
  }
  return done;
}

async function poll() {
  if (finished) return;
  let next = POLL_MS;
  try {
    const result = await api(`${base}/status`);
    if (result.status === 404) {
      showMessage("request-error", problemText(result));
      show("progress-panel", false);
      return;
    }
    if (result.body && result.body.status) {
      const done = showStatus(result.body, result.status);
      if (!LIVE.has(result.body.status)) {
        finished = true;
        await showResults();
        return;
      }
      if (done > shownImages) await showResults(); // images appear as they are stored
    } else {
      next = 3000; // the farm is away (503): keep trying, more slowly
      showMessage("request-note", problemText(result));
    }
  } catch (error) {
    pageError(error);
    next = 3000;
  }
  setTimeout(poll, next);
}

// One Server-Sent Event from its block of lines; null for a comment (the keep-alive).
function parseEvent(block) {
  const event = { event: "message", id: null, data: [] };
  for (const raw of block.split("\n")) {
    const line = raw.endsWith("\r") ? raw.slice(0, -1) : raw;
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const name = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (name === "data") event.data.push(value);
    else if (name === "event") event.event = value;
    else if (name === "id") event.id = value;
  }
  if (!event.data.length) return null;
  return { ...event, data: JSON.parse(event.data.join("\n")) };
}

let streamed = null; // the last status the stream gave, updated by its progress events

// One event of the stream; true once the request has ended.
async function handle(event) {
  if (event.event === "status") {
    streamed = event.data;
  } else if (event.event === "progress") {
    const { step, steps, images_done, images } = event.data;
    streamed = { ...(streamed || {}), status: "PROCESSING", queue_position: undefined, progress: { step, steps, images_done, images } };
  } else if (event.event === "completed") {
    await poll(); // the final status (and the cancel flag), then the results
    return true;
  } else {
    return false;
  }
  const done = showStatus(streamed, 200);
  if (done > shownImages) await showResults(); // images appear as they are stored
  return false;
}

// The request's events (GET .../events) read with fetch(), since an EventSource cannot
// send the key in a header; a cut stream resumes after its last event, and polling
// takes over where there is no stream.
async function follow() {
  let lastId = null;
  for (let attempt = 0; attempt < 3 && !finished; attempt += 1) {
    const headers = { Accept: "text/event-stream", "x-api-key": apiKey() };
    if (lastId) headers["Last-Event-ID"] = lastId;
    let response;
    try {
      response = await fetch(`${base}/events`, { headers, credentials: "omit", cache: "no-store", referrerPolicy: "no-referrer" });
    } catch {
      break;
    }
    const type = response.headers.get("Content-Type") || "";
    if (!response.ok || !response.body || !type.startsWith("text/event-stream")) break;
    document.body.dataset.updates = "stream";
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = parseEvent(buffer.slice(0, cut));
          buffer = buffer.slice(cut + 2);
          if (!event) continue;
          if (event.id) lastId = event.id;
          if (await handle(event)) return;
        }
      }
    } catch {
      // Cut mid-stream: reconnect and resume after the last event.
    }
  }
  if (!finished) {
    document.body.dataset.updates = "polling";
    await poll();
  }
}

$("cancel").addEventListener("click", async () => {
  $("cancel").disabled = true;
  try {
    const result = await cancelRequest(requestId);
    showMessage("request-note", result.body?.detail || (result.ok ? "Cancelled" : problemText(result)));
  } catch (error) {
    pageError(error);
  } finally {
    $("cancel").disabled = false;
  }
});

signedIn()
  .then(async () => {
    const first = await api(base);
    if (first.status === 404) {
      showMessage("request-error", problemText(first));
      show("progress-panel", false);
      return;
    }
    describe(first.body?.parameters);
    await follow();
  })
  .catch(pageError);
