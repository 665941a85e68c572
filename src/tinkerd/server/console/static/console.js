// The console's shared behaviour: copy buttons, confirmed writes to the REST API (cookie + CSRF token), downloads.
"use strict";
const csrf = () => (document.querySelector('meta[name="csrf-token"]') || {}).content || "";

async function api(method, url, body) {
  const options = { method, credentials: "same-origin", headers: { "X-CSRF-Token": csrf() } };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(url, options);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.detail || `${response.status} ${response.statusText}`);
  return data;
}

function flash(text, isError) {
  const box = document.getElementById("flash");
  if (!box) return;
  box.textContent = text;
  box.className = "flash" + (isError ? " error" : "");
  box.style.display = "block";
}

document.addEventListener("click", async (event) => {
  const button = event.target.closest("button");
  if (!button) return;
  try {
    if (button.dataset.copy !== undefined) {
      await copyText(button.dataset.copy);
      button.textContent = "Copied";
      setTimeout(() => { button.textContent = "Copy"; }, 1500);
    } else if (button.dataset.url) {
      if (button.dataset.confirm && !window.confirm(button.dataset.confirm)) return;
      await api(button.dataset.method, button.dataset.url);
      if (button.dataset.then) window.location.assign(button.dataset.then); else window.location.reload();
    } else if (button.dataset.ttl) {
      const hours = Number(document.getElementById("ttl-hours").value);
      const ttl = button.dataset.never ? null : Math.round(hours * 3600);
      if (!button.dataset.never && !(hours > 0)) { flash("Enter a number of hours first.", true); return; }
      await api("PUT", button.dataset.ttl, { ttl_seconds: ttl });
      window.location.reload();
    } else if (button.dataset.archive) {
      button.disabled = true;
      const link = await api("GET", button.dataset.archive);
      button.disabled = false;
      window.location.assign(link.url);
    }
  } catch (error) {
    button.disabled = false;
    flash(error.message, true);
  }
});

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) return navigator.clipboard.writeText(text);
  const area = document.createElement("textarea");  // plain http on a LAN address: no clipboard API
  area.value = text;
  document.body.appendChild(area);
  area.select();
  document.execCommand("copy");
  area.remove();
}
