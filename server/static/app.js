// loraswap playground: ask one adapter, compare several (this file); list, upload and delete adapters (adapters.js).
// Plain JavaScript against the public API (/v1/models, /v1/answer, /v1/adapters); no dependencies.
// Keys live in the `keys` object below, in this tab's memory only: nothing is written to any storage.
// Paths are relative to the page, so the playground also works behind a proxy that adds a path prefix.
"use strict";

const $ = (id) => document.getElementById(id);
const keys = { api: "", admin: "" };
const state = { baseId: "", names: [], cards: 0 };

/** An error the API answered, worded as the API worded it ({"error": {"message", "type", "param", "code"}}). */
class ApiError extends Error {
  constructor(status, error) {
    super(error.message);
    this.status = status;
    this.type = error.type || null;
    this.code = error.code || null;
  }
}

function authHeaders(admin) {
  // Inference routes take the API key (the server also accepts the admin key there); admin routes the admin key.
  const key = admin ? keys.admin : keys.api || keys.admin;
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function readError(res) {
  let body = null;
  try {
    body = await res.json();
  } catch {
    // not JSON: fall back to the status line
  }
  if (body && body.error && typeof body.error.message === "string") return new ApiError(res.status, body.error);
  return new ApiError(res.status, { message: `HTTP ${res.status} ${res.statusText}`.trim() });
}

/** fetch() with the right key; a non-2xx answer throws an ApiError. */
async function api(path, { method = "GET", body, admin = false, signal } = {}) {
  const headers = authHeaders(admin);
  let payload = body;
  if (body !== undefined && !(body instanceof FormData)) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  const res = await fetch(path, { method, headers, body: payload, signal });
  if (!res.ok) {
    const err = await readError(res);
    if (res.status === 401 && !admin) askForKey(err);
    throw err;
  }
  return res;
}

/** POST /v1/answer with stream: true; calls onEvent for each server-sent event until [DONE]. */
async function streamAnswer(body, signal, onEvent) {
  const res = await api("v1/answer", { method: "POST", body: { ...body, stream: true }, signal });
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const event = JSON.parse(data);
        if (event.error) throw new ApiError(res.status, event.error); // failed after the stream started
        onEvent(event);
      }
    }
  }
}

function showError(el, err) {
  el.replaceChildren();
  if (err instanceof ApiError) {
    const detail = document.createElement("span");
    detail.className = "detail";
    detail.textContent = [`HTTP ${err.status}`, err.type, err.code].filter(Boolean).join(" · ");
    el.append(document.createTextNode(err.message), detail);
  } else {
    el.textContent = `Could not reach the server: ${err.message}`;
  }
  el.hidden = false;
}

function clearError(el) {
  el.hidden = true;
  el.replaceChildren();
}

function fmtBytes(n) {
  if (typeof n !== "number") return "—";
  if (n < 1024) return `${n} B`;
  if (n < 1 << 20) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / (1 << 20)).toFixed(2)} MiB`;
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function label(name) {
  if (name === "auto") return "auto";
  if (name === "base") return state.baseId ? `base (${state.baseId})` : "base";
  return name;
}

// -- keys --

function askForKey(err) {
  const panel = $("keys");
  const wasHidden = panel.hidden;
  panel.hidden = false;
  $("keys-toggle").setAttribute("aria-expanded", "true");
  $("keys-why").textContent = keys.api
    ? `The server refused this key. It answered: ${err.message}`
    : `This server needs an API key. It answered: ${err.message}`;
  $("server-info").textContent = "This server needs an API key.";
  if (wasHidden) $("api-key").focus();
}

$("keys-toggle").addEventListener("click", () => {
  const panel = $("keys");
  panel.hidden = !panel.hidden;
  $("keys-toggle").setAttribute("aria-expanded", String(!panel.hidden));
  if (!panel.hidden) $("api-key").focus();
});

$("keys-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  keys.api = $("api-key").value.trim();
  $("keys-why").textContent = "";
  if (await refreshModels()) {
    $("keys").hidden = true;
    $("keys-toggle").setAttribute("aria-expanded", "false");
    $("keys-toggle").focus();
    if (!$("panel-adapters").hidden) loadAdapters();
  }
});

$("keys-forget").addEventListener("click", () => {
  keys.api = keys.admin = "";
  $("api-key").value = $("admin-key").value = "";
  refreshModels();
});

$("admin-key").addEventListener("input", (e) => {
  keys.admin = e.target.value.trim();
});

// -- models: the adapter picker and the compare choices --

async function refreshModels() {
  try {
    const { data } = await (await api("v1/models")).json();
    const base = data.find((m) => m.parent === null);
    state.baseId = base ? base.id : "";
    state.names = data.filter((m) => m.parent !== null && m.id !== "base" && m.id !== "auto").map((m) => m.id);
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 401)) $("server-info").textContent = `Could not list models: ${err.message}`;
    return false;
  }
  const n = state.names.length;
  $("server-info").textContent = `Base ${state.baseId} · ${n} adapter${n === 1 ? "" : "s"}`;
  fillPicker();
  fillChoices();
  return true;
}

function choices() {
  return ["auto", "base", ...state.names];
}

function fillPicker() {
  const select = $("ask-adapter");
  const current = select.value;
  select.replaceChildren(
    ...choices().map((name) => el("option", { value: name, textContent: name === "auto" ? "auto (by question type)" : label(name) })),
  );
  if (choices().includes(current)) select.value = current;
  else if (state.names.length) select.value = state.names[0];
}

function fillChoices() {
  const box = $("cmp-choices");
  const before = new Set([...box.querySelectorAll("input:checked")].map((i) => i.value));
  const wanted = before.size ? before : new Set(["base", ...state.names.slice(0, 2)]);
  box.replaceChildren(
    ...choices().map((name, i) => {
      const input = el("input", { type: "checkbox", id: `cmp-choice-${i}`, value: name, checked: wanted.has(name) });
      return el("div", { className: "check" }, input, el("label", { htmlFor: input.id, textContent: label(name) }));
    }),
  );
}

// -- an answer card: one streamed answer, used by Ask (one) and Compare (several) --

function answerCard(adapter, headingTag) {
  const id = `card-${++state.cards}`;
  const title = el(headingTag, { className: "card-title", id: `${id}-title` }, el("span", { className: "chip", textContent: label(adapter) }));
  const routed = el("p", { className: "routed muted", hidden: true });
  const answer = el("div", { className: "answer" });
  answer.setAttribute("aria-live", "polite");
  answer.setAttribute("aria-busy", "true");
  const error = el("div", { className: "error", hidden: true });
  error.setAttribute("role", "alert");
  const stats = el("p", { className: "stats muted" });
  const card = el("article", { className: "card" }, title, routed, answer, error, stats);
  card.setAttribute("aria-labelledby", title.id);
  card.dataset.adapter = adapter;

  async function run(body, signal) {
    card.dataset.state = "streaming";
    stats.textContent = "Waiting for the first token…";
    const started = performance.now();
    let first = true;
    try {
      await streamAnswer({ adapter, ...body }, signal, (ev) => {
        if (first) {
          first = false;
          if (ev.routed) {
            routed.replaceChildren(
              "auto chose ",
              el("strong", { className: "used", textContent: ev.adapter }),
              ` (question type “${ev.routed.qtype}”, router probability ${ev.routed.probability.toFixed(2)})`,
            );
            routed.hidden = false;
          }
          stats.textContent = "Streaming…";
        }
        if (ev.delta) answer.textContent += ev.delta;
        if (ev.finish_reason) {
          const secs = (performance.now() - started) / 1000;
          const tokens = ev.usage ? ev.usage.completion_tokens : 0;
          const why = ev.finish_reason === "length" ? "cut at max tokens" : "finished";
          stats.textContent = `${tokens} tokens · ${why} · ${secs.toFixed(1)} s`;
        }
      });
      card.dataset.state = "done";
    } catch (err) {
      if (err.name === "AbortError") {
        card.dataset.state = "stopped";
        stats.textContent = "Stopped.";
      } else {
        card.dataset.state = "error";
        stats.textContent = "";
        answer.hidden = !answer.textContent;
        showError(error, err);
        if (err.code === "model_not_found") refreshModels(); // the list was stale: show what exists now
      }
    } finally {
      answer.setAttribute("aria-busy", "false");
    }
  }
  return { el: card, run };
}

/** max_tokens and temperature from a form's inputs; null (and the browser's message) when one is invalid. */
function readSettings(prefix) {
  const max = $(`${prefix}-max-tokens`);
  const temp = $(`${prefix}-temperature`);
  for (const input of [max, temp]) {
    if (!input.checkValidity()) {
      input.reportValidity();
      return null;
    }
  }
  const out = {};
  if (max.value !== "") out.max_tokens = Number(max.value);
  if (temp.value !== "") out.temperature = Number(temp.value);
  return out;
}

function setBusy(prefix, busy) {
  $(`${prefix}-go`).disabled = busy;
  $(`${prefix}-stop`).disabled = !busy;
}

// -- Ask --

let askRun = null;

$("ask-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const question = $("ask-question").value.trim();
  const settings = readSettings("ask");
  if (!question || !settings) return;
  if (askRun) askRun.abort(); // a new question replaces a running one (Ctrl+Enter while streaming)
  const ctl = new AbortController();
  askRun = ctl;
  const card = answerCard($("ask-adapter").value, "h2");
  $("ask-out").replaceChildren(card.el);
  setBusy("ask", true);
  await card.run({ question, ...settings }, ctl.signal);
  if (askRun === ctl) setBusy("ask", false);
});

$("ask-stop").addEventListener("click", () => askRun && askRun.abort());

// -- Compare --

let cmpRun = null;

$("cmp-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  clearError($("cmp-error"));
  const picked = [...$("cmp-choices").querySelectorAll("input:checked")].map((i) => i.value);
  const question = $("cmp-question").value.trim();
  const settings = readSettings("cmp");
  if (!question || !settings) return;
  if (picked.length < 2) {
    $("cmp-error").textContent = "Pick two or more adapters to compare.";
    $("cmp-error").hidden = false;
    return;
  }
  if (cmpRun) cmpRun.abort();
  const ctl = new AbortController();
  cmpRun = ctl;
  const cards = picked.map((name) => answerCard(name, "h3"));
  $("cmp-columns").replaceChildren(...cards.map((c) => c.el));
  setBusy("cmp", true);
  await Promise.all(cards.map((c) => c.run({ question, ...settings }, ctl.signal)));
  if (cmpRun === ctl) setBusy("cmp", false);
});

$("cmp-stop").addEventListener("click", () => cmpRun && cmpRun.abort());

for (const id of ["ask-question", "cmp-question"]) {
  $(id).addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      e.target.form.requestSubmit();
    }
  });
}

// -- tabs (WAI-ARIA tabs pattern: arrow keys, Home and End move between them) --

const tabs = [...document.querySelectorAll('[role="tab"]')];

function selectTab(tab, focus) {
  for (const t of tabs) {
    const on = t === tab;
    t.setAttribute("aria-selected", String(on));
    t.tabIndex = on ? 0 : -1;
    $(t.getAttribute("aria-controls")).hidden = !on;
  }
  if (focus) tab.focus();
  history.replaceState(null, "", `#${tab.id.slice(4)}`);
  if (tab.id === "tab-adapters") loadAdapters();
}

for (const tab of tabs) {
  tab.addEventListener("click", () => selectTab(tab, false));
  tab.addEventListener("keydown", (e) => {
    const i = tabs.indexOf(tab);
    const to = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[e.key];
    if (to === undefined) return;
    e.preventDefault();
    selectTab(tabs[(to + tabs.length) % tabs.length], true);
  });
}

// Once every script of the page has run (adapters.js defines the Adapters tab's loadAdapters).
document.addEventListener("DOMContentLoaded", () => {
  const start = tabs.find((t) => `#${t.id.slice(4)}` === location.hash);
  refreshModels().then(() => {
    if (start) selectTab(start, false);
  });
});
