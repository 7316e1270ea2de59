// Shared by every console page: the API key, fetch() with it, safe DOM building.
//
// The key lives in this tab's sessionStorage and travels only in the x-api-key
// header; it is never put in a URL, a cookie or the page. User text (prompts, names)
// only ever reaches the page through textContent or attribute setters, never innerHTML.

const KEY_NAME = "kolors-farm.api-key";
const FLASH_NAME = "kolors-farm.flash";
export const SIGN_IN_PATH = "/console/";
export const REFUSED = "That API key was refused";

export function apiKey() {
  return sessionStorage.getItem(KEY_NAME);
}

export function storeKey(key) {
  sessionStorage.setItem(KEY_NAME, key);
}

export function signOut(message) {
  sessionStorage.removeItem(KEY_NAME);
  if (message) sessionStorage.setItem(FLASH_NAME, message);
  location.replace(SIGN_IN_PATH);
}

export function takeFlash() {
  const message = sessionStorage.getItem(FLASH_NAME);
  sessionStorage.removeItem(FLASH_NAME);
  return message;
}

// fetch() with the key. Resolves to {status, ok, body, response}; body is parsed JSON
// (or null). A 401 on a signed-in page means the key was revoked: back to sign-in.
export async function api(path, { method = "GET", body, headers = {}, key, accept } = {}) {
  const sent = { Accept: accept || "application/json", ...headers };
  const useKey = key || apiKey();
  if (useKey) sent["x-api-key"] = useKey;
  const init = { method, headers: sent, credentials: "omit", cache: "no-store", referrerPolicy: "no-referrer" };
  if (body !== undefined) {
    sent["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const remaining = response.headers.get("x-remaining-credits");
  if (remaining !== null) showCredits(remaining);
  let parsed = null;
  const type = response.headers.get("Content-Type") || "";
  if (type.includes("json")) {
    try {
      parsed = await response.json();
    } catch {
      parsed = null;
    }
  }
  if (response.status === 401 && !key) {
    signOut(REFUSED);
    throw new Error(REFUSED);
  }
  return { status: response.status, ok: response.ok, body: parsed, response };
}

// An image fetched with the key, as an object URL (the CSP allows blob: images, so
// result links on other origins, such as presigned S3 URLs, need no exception).
export async function imageBlobUrl(requestId, index) {
  const response = await fetch(`/v2/requests/${encodeURIComponent(requestId)}/images/${index}`, {
    headers: { "x-api-key": apiKey() },
    credentials: "omit",
  });
  if (!response.ok) throw new Error(`image ${index}: HTTP ${response.status}`);
  return URL.createObjectURL(await response.blob());
}

// el("p", {class: "x", text: "..."}, child, ...): text goes in as text, always.
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "text") node.textContent = String(value);
    else if (name === "class") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name.startsWith("on") && typeof value === "function") node.addEventListener(name.slice(2), value);
    else if (value === true) node.setAttribute(name, "");
    else node.setAttribute(name, String(value));
  }
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function $(id) {
  return document.getElementById(id);
}

export function setText(id, value) {
  const node = $(id);
  if (node) node.textContent = value === undefined || value === null ? "" : String(value);
}

export function show(id, visible = true) {
  const node = typeof id === "string" ? $(id) : id;
  if (node) node.hidden = !visible;
}

export function showMessage(id, message) {
  setText(id, message || "");
  show(id, Boolean(message));
}

export function showCredits(credits) {
  setText("who-credits", credits);
}

export function problemText(result) {
  const body = result.body;
  if (body && typeof body.error === "string") return body.error;
  if (body && typeof body.detail === "string") return body.detail;
  return `The farm answered HTTP ${result.status}`;
}

export function formatTime(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? String(iso) : date.toLocaleString();
}

export function formatSeconds(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 1) return "under a second";
  if (seconds < 90) return `${Math.round(seconds)} s`;
  return `${Math.round(seconds / 60)} min`;
}

export function statusBadge(node, status, cancelled) {
  const label = cancelled && status === "FAILED" ? "CANCELLED" : status;
  node.textContent = label;
  node.dataset.status = label;
  node.className = "badge";
}

export const LIVE = new Set(["QUEUED", "PROCESSING"]);

export async function cancelRequest(requestId) {
  return api(`/v2/requests/${encodeURIComponent(requestId)}/cancel`, { method: "POST" });
}

// Every page but sign-in: require a key, fill the header from GET /v1/me.
// Resolves to the caller ({user, tenant, is_admin, credits}).
export async function signedIn() {
  if (!apiKey()) {
    location.replace(SIGN_IN_PATH);
    throw new Error("not signed in");
  }
  $("sign-out")?.addEventListener("click", () => signOut());
  const page = document.body.dataset.page;
  document.querySelector(`[data-nav="${page}"]`)?.setAttribute("aria-current", "page");
  const result = await api("/v1/me");
  if (!result.ok || !result.body) {
    showMessage("page-error", problemText(result));
    throw new Error(problemText(result));
  }
  const me = result.body;
  setText("who-user", `${me.user} · ${me.tenant}`);
  showCredits(me.credits);
  show("nav-operator", Boolean(me.is_admin));
  return me;
}

export function pageError(error) {
  if (error && error.message === REFUSED) return;
  showMessage("page-error", error && error.message ? error.message : String(error));
}
