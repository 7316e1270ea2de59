import {
  $, LIVE, api, cancelRequest, el, formatTime, imageBlobUrl, pageError, problemText, setText,
  show, showMessage, signedIn, statusBadge,
} from "./console.js";

// ?limit=N in the page's address picks the page size (the API allows 1 to 100).
const asked = Number(new URLSearchParams(location.search).get("limit"));
const PAGE_SIZE = Number.isInteger(asked) && asked >= 1 && asked <= 100 ? asked : 12;
const REFRESH_MS = 2000;
// The cursors of the pages before this one (null: the first page), for "Newer".
let cursors = [null];
let nextCursor = null;
let refreshTimer = null;
let blobUrls = [];

function card(request) {
  const badge = el("span", { class: "badge" });
  statusBadge(badge, request.status, request.cancelled);
  const thumb = el("div", { class: "thumb" });
  if (request.images_done > 0) {
    const image = el("img", { alt: `First image of request ${request.request_id}`, loading: "lazy" });
    thumb.append(image);
    imageBlobUrl(request.request_id, 0)
      .then((url) => {
        blobUrls.push(url);
        image.src = url;
      })
      .catch(() => image.replaceWith(el("span", { class: "muted", text: "image unavailable" })));
  } else {
    thumb.append(el("span", { class: "muted", text: LIVE.has(request.status) ? "rendering…" : "no image" }));
  }
  const parameters = request.parameters || {};
  const actions = el(
    "div",
    { class: "card-actions" },
    el("a", { href: `/console/requests/${encodeURIComponent(request.request_id)}`, class: "button secondary", text: "Open" }),
  );
  if (LIVE.has(request.status)) {
    const cancel = el("button", { type: "button", class: "danger", text: "Cancel", "data-cancel": request.request_id });
    cancel.addEventListener("click", async () => {
      cancel.disabled = true;
      try {
        const result = await cancelRequest(request.request_id);
        if (!result.ok && result.status !== 422) showMessage("page-error", problemText(result));
        await load(cursors[cursors.length - 1]);
      } catch (error) {
        pageError(error);
      }
    });
    actions.append(cancel);
  }
  return el(
    "article",
    { class: "request-card", "data-request-id": request.request_id },
    thumb,
    el("div", { class: "card-head" }, badge, el("span", { class: "muted", text: formatTime(request.created_at) })),
    el("p", { class: "prompt", text: request.prompt }),
    el("p", {
      class: "muted",
      text: `${request.images_done} of ${request.number_of_images} image(s) · ${parameters.width}×${parameters.height} · ${parameters.steps} steps · seed ${parameters.seed}`,
    }),
    request.error ? el("p", { class: "field-error", text: request.error }) : null,
    actions,
  );
}

async function load(cursor) {
  clearTimeout(refreshTimer);
  const query = new URLSearchParams({ limit: String(PAGE_SIZE) });
  const status = $("status-filter").value;
  if (status) query.set("status", status);
  if (cursor) query.set("cursor", cursor);
  const result = await api(`/v2/requests?${query}`);
  if (!result.ok || !result.body) {
    showMessage("page-error", problemText(result));
    return;
  }
  for (const url of blobUrls) URL.revokeObjectURL(url);
  blobUrls = [];
  const requests = result.body.requests || [];
  $("gallery").replaceChildren(...requests.map(card));
  show("gallery-empty", requests.length === 0);
  nextCursor = result.body.next_cursor || null;
  $("older").disabled = !nextCursor;
  $("newer").disabled = cursors.length <= 1;
  setText("page-number", `Page ${cursors.length}`);
  // Live requests change: refresh this page while any is queued or rendering.
  if (requests.some((request) => LIVE.has(request.status))) {
    refreshTimer = setTimeout(() => load(cursors[cursors.length - 1]).catch(pageError), REFRESH_MS);
  }
}

$("older").addEventListener("click", () => {
  if (!nextCursor) return;
  cursors.push(nextCursor);
  load(nextCursor).catch(pageError);
});
$("newer").addEventListener("click", () => {
  if (cursors.length <= 1) return;
  cursors.pop();
  load(cursors[cursors.length - 1]).catch(pageError);
});
$("status-filter").addEventListener("change", () => {
  cursors = [null];
  load(null).catch(pageError);
});

signedIn()
  .then(() => load(null))
  .catch(pageError);
