import { $, api, pageError, problemText, showMessage, signedIn } from "./console.js";

const form = $("render-form");

function controls() {
  return [...form.querySelectorAll("[data-param]")];
}

// The JSON body, typed as the schema says; an empty number is left out (the API's default).
function collect() {
  const body = {};
  for (const control of controls()) {
    const name = control.dataset.param;
    const raw = control.value;
    if (control.dataset.type === "integer" || control.dataset.type === "number") {
      if (raw.trim() === "") continue;
      const value = Number(raw);
      body[name] = Number.isFinite(value) ? value : raw; // the API names a non-number
    } else {
      body[name] = raw;
    }
  }
  return body;
}

function clearErrors() {
  for (const node of form.querySelectorAll("[data-error-for]")) {
    node.textContent = "";
    node.hidden = true;
  }
  for (const control of controls()) control.removeAttribute("aria-invalid");
  showMessage("form-error", "");
}

// A 400 lists {field, rule, message}: each goes next to its field; the rest above the button.
function showErrors(result) {
  const errors = (result.body && Array.isArray(result.body.errors)) ? result.body.errors : [];
  const unplaced = [];
  for (const error of errors) {
    const name = String(error.field || "").split(".")[0];
    const slot = form.querySelector(`[data-error-for="${CSS.escape(name)}"]`);
    if (!slot) {
      unplaced.push(`${error.field}: ${error.message}`);
      continue;
    }
    slot.textContent = slot.textContent ? `${slot.textContent}; ${error.message}` : String(error.message);
    slot.hidden = false;
    form.querySelector(`[data-param="${CSS.escape(name)}"]`)?.setAttribute("aria-invalid", "true");
  }
  if (!errors.length || unplaced.length) {
    showMessage("form-error", unplaced.length ? unplaced.join("; ") : problemText(result));
  }
  form.querySelector("[aria-invalid=true]")?.focus();
}

async function submit(event) {
  event.preventDefault();
  clearErrors();
  $("render-submit").disabled = true;
  try {
    const result = await api("/v2/kolors", { method: "POST", body: collect() });
    if (result.ok && result.body && result.body.request_id) {
      location.assign(`/console/requests/${encodeURIComponent(result.body.request_id)}`);
      return;
    }
    showErrors(result);
  } catch (error) {
    pageError(error);
  } finally {
    $("render-submit").disabled = false;
  }
}

form.addEventListener("submit", submit);
form.addEventListener("reset", () => clearErrors());
signedIn().catch(pageError);
