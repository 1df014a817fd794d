// loraswap playground, the Adapters tab: list the adapters with their held-out metrics, upload and delete.
// Loaded after app.js, whose helpers ($, api, el, fmtBytes, showError, refreshModels) it uses.

// -- Adapters --

function formatMetrics(m) {
  if (!m || !Object.keys(m).length) return "none recorded";
  const parts = [];
  const num = (v) => typeof v === "number";
  if (num(m.nll)) {
    let s = num(m.base_nll) ? `NLL ${m.base_nll.toFixed(3)} → ${m.nll.toFixed(3)}` : `NLL ${m.nll.toFixed(3)}`;
    if (num(m.nll_change)) s += ` (${m.nll_change > 0 ? "+" : ""}${(m.nll_change * 100).toFixed(1)}%)`;
    parts.push(s);
  }
  for (const [k, v] of Object.entries(m)) {
    if (["nll", "base_nll", "nll_change", "heldout_n", "quant"].includes(k)) continue;
    parts.push(`${k} ${num(v) ? Number(v.toFixed(4)) : v}`);
  }
  if (num(m.heldout_n)) parts.push(`${m.heldout_n}\u00a0questions`);
  if (m.quant) parts.push(`${m.quant} base`);
  return parts.join(" · ");
}

function cell(labelText, ...children) {
  // One wrapper, so that on a phone (cells as label/value grids) the value stays in one grid cell.
  const td = el("td", {}, el("div", {}, ...children));
  td.dataset.label = labelText;
  return td;
}

function adapterRow(a) {
  const name = cell("Name", el("span", { className: "name", textContent: a.name }), el("span", { className: "sub", textContent: a.source === "user" ? "uploaded" : a.source }));
  const base = cell("Base", a.base_id, el("span", { className: "sub", textContent: a.base_fingerprint }));
  const actions = cell("");
  actions.className = "actions-cell";
  if (a.source === "user") {
    const button = el("button", { type: "button", className: "danger", textContent: "Delete" });
    button.setAttribute("aria-label", `Delete adapter ${a.name}`);
    button.addEventListener("click", () => deleteAdapter(a.name, button));
    actions.append(button);
  }
  const rank = cell("Rank", a.rank === null || a.rank === undefined ? "—" : String(a.rank));
  rank.classList.add("num");
  const size = cell("Size", fmtBytes(a.size_bytes));
  size.classList.add("num");
  const metrics = cell("Held-out", formatMetrics(a.metrics));
  metrics.classList.add("metrics");
  const row = el("tr", {}, name, cell("Qtype", a.qtype || "—"), cell("Method", a.method), rank, size, base, cell("Loaded", a.loaded ? "yes" : "no"), metrics, actions);
  row.dataset.name = a.name;
  return row;
}

async function loadAdapters() {
  clearError($("ad-error"));
  $("ad-summary").textContent = "Loading…";
  try {
    const { data } = await (await api("v1/adapters")).json();
    data.sort((a, b) => a.name.localeCompare(b.name));
    $("ad-rows").replaceChildren(...data.map(adapterRow));
    const loaded = data.filter((a) => a.loaded).length;
    $("ad-summary").textContent =
      `${data.length} adapter${data.length === 1 ? "" : "s"} for this base, ${loaded} loaded in a worker ` +
      "(adapters load on first use). Held-out NLL: the base's, then the adapter's, on held-out questions of " +
      "the adapter's qtype; lower is better.";
  } catch (err) {
    $("ad-summary").textContent = "";
    showError($("ad-error"), err);
  }
}

async function deleteAdapter(name, button) {
  if (!window.confirm(`Delete adapter "${name}"? Requests already running on it finish first.`)) return;
  clearError($("ad-error"));
  $("ad-status").textContent = $("up-status").textContent = "";
  button.disabled = true;
  try {
    await api(`v1/adapters/${encodeURIComponent(name)}`, { method: "DELETE", admin: true });
    $("ad-status").textContent = `Deleted ${name}.`;
    await Promise.all([loadAdapters(), refreshModels()]);
  } catch (err) {
    button.disabled = false;
    showError($("ad-error"), err);
    if (err.status === 401 || err.status === 403) $("admin-key").focus();
  }
}

$("up-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  clearError($("up-error"));
  const file = $("up-file").files[0];
  const form = new FormData();
  form.append("name", $("up-name").value.trim());
  form.append("file", file, file.name);
  if ($("up-overwrite").checked) form.append("overwrite", "true");
  $("up-go").disabled = true;
  $("up-status").textContent = "Uploading and validating…";
  try {
    const a = await (await api("v1/adapters", { method: "POST", body: form, admin: true })).json();
    $("up-status").textContent = `Uploaded ${a.name}: ${a.method}, rank ${a.rank}, ${fmtBytes(a.size_bytes)}.`;
    e.target.reset();
    await Promise.all([loadAdapters(), refreshModels()]);
  } catch (err) {
    $("up-status").textContent = "";
    showError($("up-error"), err);
    if (err.status === 401 || err.status === 403) $("admin-key").focus();
  } finally {
    $("up-go").disabled = false;
  }
});

$("ad-refresh").addEventListener("click", loadAdapters);
