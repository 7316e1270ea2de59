import { $, api, el, formatTime, pageError, problemText, setText, show, showMessage, signedIn } from "./console.js";

const WORKERS_MS = 2000;
const PAGE_SIZE = 50;
const pages = { tenants: null, users: null };

function percent(fraction) {
  return fraction === null || fraction === undefined ? "–" : `${Math.round(fraction * 100)} %`;
}

function memory(worker) {
  if (worker.memory_total_mb === null || worker.memory_total_mb === undefined) return "–";
  const used = worker.memory_used_mb ?? "?";
  return `${used} / ${worker.memory_total_mb} MiB`;
}

function workerRow(worker) {
  const job = worker.current_job
    ? el("a", { href: `/console/requests/${encodeURIComponent(worker.current_job)}`, text: worker.current_job })
    : el("span", { class: "muted", text: "idle" });
  return el(
    "tr",
    { "data-worker": worker.name },
    el("td", { text: worker.name }),
    el("td", { text: worker.device_name && worker.device_name !== worker.device ? `${worker.device} (${worker.device_name})` : (worker.device || "–") }),
    el("td", { class: "num", text: memory(worker) }),
    el("td", { text: worker.warm ? "warm" : "warming up" }),
    el("td", { class: "num", text: percent(worker.busy_fraction) }),
    el("td", {}, job),
  );
}

async function loadWorkers() {
  try {
    const result = await api("/v1/admin/workers");
    if (result.ok && result.body) {
      const workers = result.body.workers || [];
      $("workers").replaceChildren(...workers.map(workerRow));
      show("workers-empty", workers.length === 0);
      setText("dispatcher", result.body.dispatcher || "none active");
    }
  } catch (error) {
    pageError(error);
  }
  setTimeout(loadWorkers, WORKERS_MS);
}

// The tenant's webhook signing secret(s), fetched only when asked for (never kept elsewhere).
async function showSecret(name, cell) {
  const result = await api(`/v1/admin/tenants/${encodeURIComponent(name)}/webhook-secret`);
  if (!result.ok || !result.body) {
    cell.replaceChildren(el("span", { class: "field-error", text: problemText(result) }));
    return;
  }
  const codes = result.body.signing.map((secret) => el("div", {}, el("code", { "data-secret": "", text: secret })));
  if (codes.length > 1) codes.push(el("div", { class: "muted", text: "both sign until the old one expires (24 h after a rotation)" }));
  cell.replaceChildren(...codes);
}

function tenantRow(tenant) {
  const secret = el("td", {});
  secret.append(
    el("button", {
      type: "button",
      class: "secondary",
      "data-show-secret": "",
      text: "Show",
      onclick: () => showSecret(tenant.name, secret).catch(pageError),
    }),
  );
  return el(
    "tr",
    { "data-tenant": tenant.name },
    el("td", { text: tenant.name }),
    el("td", { class: "num", text: tenant.weight }),
    el("td", { class: "num", text: tenant.queued }),
    el("td", { class: "num", text: tenant.running }),
    el("td", { text: formatTime(tenant.oldest_queued_at) }),
    secret,
  );
}

function userRow(user) {
  return el(
    "tr",
    { "data-user": user.name },
    el("td", { text: user.name }),
    el("td", { text: user.tenant }),
    el("td", { class: "num", "data-credits": "", text: user.credits }),
    el("td", { text: user.is_admin ? "admin" : "" }),
    el("td", { class: "num", text: user.weight }),
  );
}

// One page of a keyset-paginated list: appended after the rows already shown.
async function loadPage(kind, rowOf, cursor) {
  const query = new URLSearchParams({ limit: String(PAGE_SIZE) });
  if (cursor) query.set("cursor", cursor);
  const result = await api(`/v1/admin/${kind}?${query}`);
  if (!result.ok || !result.body) {
    showMessage("page-error", problemText(result));
    return;
  }
  const items = result.body[kind] || [];
  const rows = items.map(rowOf);
  if (cursor) $(kind).append(...rows);
  else $(kind).replaceChildren(...rows);
  if (kind === "users") {
    const options = items.map((user) => el("option", { value: user.name }));
    if (cursor) $("user-names").append(...options);
    else $("user-names").replaceChildren(...options);
  }
  pages[kind] = result.body.next_cursor || null;
  show(`${kind}-more`, Boolean(pages[kind]));
}

async function grant(event) {
  event.preventDefault();
  showMessage("grant-error", "");
  showMessage("grant-done", "");
  const name = $("grant-user").value.trim();
  if (!name) {
    showMessage("grant-error", "Name the user to grant credits to");
    return;
  }
  const body = { credits: $("grant-credits").value.trim() };
  if ($("grant-note").value.trim()) body.note = $("grant-note").value.trim();
  $("grant-submit").disabled = true;
  try {
    const result = await api(`/v1/admin/users/${encodeURIComponent(name)}/credits`, { method: "POST", body });
    if (!result.ok) {
      const errors = result.body?.errors?.map((error) => `${error.field}: ${error.message}`).join("; ");
      showMessage("grant-error", errors || problemText(result));
      return;
    }
    showMessage("grant-done", `${result.body.user} now has ${result.body.credits} credits`);
    const cell = document.querySelector(`tr[data-user="${CSS.escape(result.body.user)}"] [data-credits]`);
    if (cell) cell.textContent = result.body.credits;
    $("grant-credits").value = "";
  } catch (error) {
    pageError(error);
  } finally {
    $("grant-submit").disabled = false;
  }
}

signedIn()
  .then(async (me) => {
    if (!me.is_admin) {
      show("operator-denied");
      return;
    }
    show("operator");
    $("grant-form").addEventListener("submit", grant);
    $("tenants-more").addEventListener("click", () => loadPage("tenants", tenantRow, pages.tenants).catch(pageError));
    $("users-more").addEventListener("click", () => loadPage("users", userRow, pages.users).catch(pageError));
    await Promise.all([loadWorkers(), loadPage("tenants", tenantRow, null), loadPage("users", userRow, null)]);
  })
  .catch(pageError);
