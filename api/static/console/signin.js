import { $, REFUSED, api, apiKey, show, showMessage, storeKey, takeFlash } from "./console.js";

const RENDER_PATH = "/console/render";

async function signIn(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  showMessage("signin-error", "");
  if (!key) {
    showMessage("signin-error", "Paste an API key first");
    return;
  }
  $("signin-submit").disabled = true;
  try {
    const result = await api("/v1/me", { key });
    if (result.status === 401) {
      showMessage("signin-error", REFUSED);
      $("api-key").select();
      return;
    }
    if (!result.ok) {
      showMessage("signin-error", `The farm could not check the key (HTTP ${result.status}); try again`);
      return;
    }
    storeKey(key);
    location.assign(RENDER_PATH);
  } catch (error) {
    showMessage("signin-error", `The farm did not answer: ${error.message}`);
  } finally {
    $("signin-submit").disabled = false;
  }
}

const flash = takeFlash();
if (flash) showMessage("signin-error", flash);
else if (apiKey()) location.replace(RENDER_PATH);
$("signin-form").addEventListener("submit", signIn);
show("signin-form");
