import { $, api, apiKey, el, pageError, problemText, setText, show, showMessage, signedIn } from "./console.js";

const PAGE_SIZE = 50;
let nextCursor = null;

function isoDay(date) {
  return date.toISOString().slice(0, 10);
}

function query(cursor) {
  const params = new URLSearchParams({ limit: String(PAGE_SIZE) });
  if ($("usage-from").value) params.set("from", $("usage-from").value);
  if ($("usage-to").value) params.set("to", $("usage-to").value);
  if (cursor) params.set("cursor", cursor);
  return params;
}

function row(day) {
  return el(
    "tr",
    {},
    el("td", { text: day.day }),
    el("td", { text: day.user }),
    el("td", { class: "num", text: day.granted }),
    el("td", { class: "num", text: day.held }),
    el("td", { class: "num", text: day.captured }),
    el("td", { class: "num", text: day.released }),
  );
}

async function load(cursor) {
  showMessage("usage-error", "");
  const result = await api(`/v1/usage?${query(cursor)}`);
  if (!result.ok || !result.body) {
    const fields = result.body?.errors?.map((error) => `${error.field}: ${error.message}`).join("; ");
    showMessage("usage-error", fields || problemText(result));
    return;
  }
  const rows = (result.body.usage || []).map(row);
  if (cursor) $("usage-rows").append(...rows);
  else $("usage-rows").replaceChildren(...rows);
  show("usage-empty", !cursor && rows.length === 0);
  nextCursor = result.body.next_cursor || null;
  show("usage-more", Boolean(nextCursor));
}

// The whole period as one CSV file: the API's CSV pages (cursor in X-Next-Cursor) joined.
async function downloadCsv() {
  showMessage("usage-error", "");
  const lines = [];
  let cursor = null;
  for (let page = 0; page < 50; page += 1) {
    const params = query(cursor);
    params.set("limit", "1000");
    const response = await fetch(`/v1/usage?${params}`, {
      headers: { Accept: "text/csv", "x-api-key": apiKey() },
      credentials: "omit",
    });
    if (!response.ok) {
      showMessage("usage-error", `The farm answered HTTP ${response.status}`);
      return;
    }
    const rows = (await response.text()).split("\r\n").filter((line) => line !== "");
    lines.push(...(lines.length ? rows.slice(1) : rows));
    cursor = response.headers.get("X-Next-Cursor");
    if (!cursor) break;
  }
  const url = URL.createObjectURL(new Blob([lines.join("\r\n") + "\r\n"], { type: "text/csv" }));
  const name = `usage-${$("usage-from").value || "start"}-${$("usage-to").value || "today"}.csv`;
  const link = el("a", { href: url, download: name });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

const today = new Date();
$("usage-to").value = isoDay(today);
$("usage-from").value = isoDay(new Date(today.getTime() - 29 * 24 * 3600 * 1000));
$("usage-form").addEventListener("submit", (event) => {
  event.preventDefault();
  load(null).catch(pageError);
});
$("usage-more").addEventListener("click", () => load(nextCursor).catch(pageError));
$("usage-csv").addEventListener("click", () => downloadCsv().catch(pageError));

signedIn()
  .then(async (me) => {
    setText("balance", me.credits);
    await load(null);
  })
  .catch(pageError);
