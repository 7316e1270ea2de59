import {
  $, LIVE, api, cancelRequest, el, formatSeconds, formatTime, imageBlobUrl, pageError,
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
    await poll();
  })
  .catch(pageError);
