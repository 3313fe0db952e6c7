// The ImageWorks Chat Proxy dashboard. One poll chain reads GET /v1/admin/overview about once a
// second (never two at once, backing off while the proxy is down); the buttons POST to the admin
// endpoints and report in the status line. A change of `boot_id` means a new proxy process.
"use strict";

const POLL_MS = 1000;
const POLL_TIMEOUT_MS = 5000;
const BACKOFF_MAX_MS = 5000;
const RESTART_BACKOFF_MAX_MS = 1000; // while a restart is awaited, look again often...
const RESTART_PATIENCE_MS = 60000; // ...for this long
const RESTARTED_SHOWN_MS = 15000;
const KEY_STORAGE = "imageworks.chat-proxy.admin-key";
const SWAP_STEPS = ["draining", "stopping", "starting", "waiting for health"];
const CHART_WINDOW_S = 300;
const LOG_TAIL_MARK = "\n--- last log lines ---\n"; // how the proxy appends a model server's log
const MESSAGE_MAX = 400;
const BUCKET_S = 10;

const $ = (id) => document.getElementById(id);

const view = {
  connection: $("connection"),
  connectionDetail: $("connection-detail"),
  version: $("proxy-version"),
  pid: $("proxy-pid"),
  uptime: $("proxy-uptime"),
  boot: $("proxy-boot"),
  stop: $("stop"),
  reload: $("reload"),
  restart: $("restart"),
  message: $("message"),
  keyForm: $("key-form"),
  key: $("key"),
  keyNote: $("key-note"),
  panels: $("panels"),
  models: document.querySelector("#models tbody"),
  modelsEmpty: $("models-empty"),
  slotState: $("slot-state"),
  slotActivity: $("slot-activity"),
  slotHolder: $("slot-holder"),
  slotPid: $("slot-pid"),
  slotActive: $("slot-active"),
  slotWaiting: $("slot-waiting"),
  slotSwaps: $("slot-swaps"),
  swapSteps: $("swap-steps"),
  lastSwaps: $("last-swaps"),
  history: $("slot-history"),
  inFlight: $("in-flight"),
  requests: document.querySelector("#requests tbody"),
  requestsEmpty: $("requests-empty"),
  chart: $("chart"),
  errorCard: document.querySelector(".card.error"),
  errorSummary: $("error-summary"),
  errorLog: $("error-log"),
};

const state = {
  key: readStoredKey(),
  bootId: null,
  lastSeen: 0, // Date.now() of the last overview
  failures: 0,
  restart: null, // {since} from the click on "Restart Chat Proxy" until a new boot_id
  restartedAt: 0,
  paused: false, // the poll chain waits for a key
  timer: 0,
  polling: false,
  pollAgain: false,
  activating: new Set(), // models this page asked to activate, until the answer
  names: new Map(), // logical name -> display name (the id /v1/models lists)
  rows: new Map(), // display name -> the models table row's cells
  detailIds: 0,
  requestsShown: "",
};

// -- talking to the proxy -----------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status; // 0: no HTTP answer at all
    this.code = code;
  }
}

function readStoredKey() {
  try {
    return sessionStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return ""; // storage disabled: the key lives as long as the page
  }
}

function storeKey(key) {
  state.key = key;
  try {
    sessionStorage.setItem(KEY_STORAGE, key);
  } catch {
    // kept in memory only
  }
}

async function api(method, path, body, timeoutMs) {
  const headers = { Accept: "application/json" };
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  const init = { method, headers, cache: "no-store", credentials: "same-origin" };
  if (method !== "GET") {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body ?? {});
  }
  if (timeoutMs) init.signal = AbortSignal.timeout(timeoutMs);
  let response;
  let text;
  try {
    response = await fetch(path, init);
    text = await response.text();
  } catch (err) {
    const late = err && (err.name === "TimeoutError" || err.name === "AbortError");
    throw new ApiError(0, late ? "no answer in time" : "cannot reach the proxy", "network");
  }
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const error = data && typeof data === "object" ? data.error : null;
    const message =
      error && typeof error.message === "string" ? error.message : `HTTP ${response.status}`;
    throw new ApiError(response.status, message, error ? error.code : null);
  }
  return data;
}

const isKeyProblem = (err) => err instanceof ApiError && (err.status === 401 || err.status === 403);

// -- the poll chain -----------------------------------------------------------------------------

function schedule(ms) {
  clearTimeout(state.timer);
  state.timer = setTimeout(poll, ms);
}

// Poll as soon as the current poll (if any) is done: after an action, to show its effect.
function pollSoon() {
  if (state.paused) return;
  if (state.polling) state.pollAgain = true;
  else schedule(0);
}

async function poll() {
  state.timer = 0;
  if (state.polling) return;
  state.polling = true;
  let delay = POLL_MS;
  try {
    const overview = await api("GET", "/v1/admin/overview", undefined, POLL_TIMEOUT_MS);
    state.failures = 0;
    showOverview(overview);
  } catch (err) {
    delay = pollFailed(err);
  } finally {
    state.polling = false;
  }
  if (delay === null) return; // paused until a key is given
  schedule(state.pollAgain ? 0 : delay);
  state.pollAgain = false;
}

function pollFailed(err) {
  if (isKeyProblem(err)) {
    askForKey(keyNote(err));
    state.paused = true; // until a key is given: no point asking again every second
    return null;
  }
  if (!(err instanceof ApiError)) {
    // The overview had a shape this page does not understand: say so, keep polling.
    say(`The dashboard could not show the overview: ${err && err.message}`, "error");
    return POLL_MS * 2;
  }
  state.failures += 1;
  setConnection(state.restart ? "restarting" : "reconnecting");
  view.panels.classList.add("stale");
  const quiet = state.lastSeen ? ` · last update ${clock(state.lastSeen / 1000)}` : "";
  const cause = err.status ? `HTTP ${err.status}: ${err.message}` : err.message;
  view.connectionDetail.textContent = `${cause}${quiet}`;
  // Right after a restart request, look often; a proxy that stays away (exit mode with no
  // supervisor, say) is then asked as rarely as any other.
  const soon = state.restart && Date.now() - state.restart.since < RESTART_PATIENCE_MS;
  const cap = soon ? RESTART_BACKOFF_MAX_MS : BACKOFF_MAX_MS;
  return Math.min(cap, 250 * 2 ** Math.min(state.failures, 5));
}

function setConnection(kind) {
  const text = {
    connecting: "connecting…",
    live: "live",
    reconnecting: "reconnecting…",
    restarting: "restarting…",
    restarted: "restarted",
    key: "admin key needed",
  }[kind];
  view.connection.dataset.conn = kind;
  if (view.connection.textContent !== text) view.connection.textContent = text;
  view.restart.disabled = kind === "restarting" || state.restart !== null;
}

function keyNote(err) {
  if (err.status === 403) return "That key is not an admin key.";
  return state.key ? "That key was refused." : "The proxy needs a key.";
}

function askForKey(note) {
  setConnection("key");
  view.keyNote.textContent = note;
  view.keyForm.hidden = false;
  view.key.focus();
}

// -- showing the overview -------------------------------------------------------------------------

function showOverview(o) {
  const proxy = o.proxy;
  const now = Date.now();
  if (state.bootId !== null && proxy.boot_id !== state.bootId) {
    const took = state.restart ? ` in ${((now - state.restart.since) / 1000).toFixed(1)} s` : "";
    say(`Chat Proxy restarted${took}: new boot ${short(proxy.boot_id)}, pid ${proxy.pid}.`, "ok");
    state.restart = null;
    state.restartedAt = now;
  }
  state.bootId = proxy.boot_id;
  state.lastSeen = now;
  let kind = "live";
  if (state.restart || proxy.restarting) kind = "restarting";
  else if (now - state.restartedAt < RESTARTED_SHOWN_MS) kind = "restarted";
  setConnection(kind);
  view.panels.classList.remove("stale");
  view.connectionDetail.textContent = `updated ${clock(now / 1000)}`;

  setText(view.version, proxy.version);
  setText(view.pid, String(proxy.pid));
  setText(view.uptime, duration(proxy.uptime_s));
  setText(view.boot, short(proxy.boot_id));
  view.boot.title =
    `${proxy.boot_id} · started ${proxy.started_at} · restart mode ${proxy.restart_mode}`;

  state.names = new Map(o.models.map((m) => [m.name, m.id]));
  showModels(o.models);
  showSlot(o.slot);
  showRequests(o.requests);
  const serverNow = Date.parse(proxy.started_at) / 1000 + proxy.uptime_s;
  drawChart(o.requests.series, Number.isFinite(serverNow) ? serverNow : now / 1000);
  showError(o.slot.last_error);
}

function showModels(models) {
  const seen = new Set();
  models.forEach((m, index) => {
    let row = state.rows.get(m.id);
    if (!row) {
      row = modelRow(m.id);
      state.rows.set(m.id, row);
    }
    seen.add(m.id);
    // Each model has two rows: its own, and the one below it saying why it cannot be reached
    // (or that its server runs in safe mode).
    if (view.models.children[2 * index] !== row.tr) {
      view.models.insertBefore(row.tr, view.models.children[2 * index] || null);
    }
    if (row.tr.nextElementSibling !== row.detail) row.tr.after(row.detail);
    setText(row.logical, m.name === m.id ? "" : m.name);
    setText(row.backend, m.backend);
    setText(row.quant, m.quantization || "–");
    setText(row.format, m.format || "");
    setText(row.caps, m.capabilities.length ? m.capabilities.join(", ") : "–");
    setText(row.state, m.state);
    row.state.dataset.state = m.state;
    setText(row.waiting, String(m.waiting));
    // "not installed" says the files are missing, "unreachable" that its server (a remote, or
    // the Ollama it is served by) does not answer: activating either can only fail. `installed`
    // false with another state means unknown, and may be activated.
    const missing = m.state === "not installed";
    const down = m.state === "unreachable";
    const why = down ? unreachableText(m.unreachable) : "";
    // A server that crashed at load runs with its safe-mode arguments: the row below says so.
    const safe = m.safe_mode && m.safe_mode.length ? safeModeText(m.safe_mode) : "";
    setText(row.why, why || safe);
    row.detail.hidden = !(why || safe);
    row.detail.classList.toggle("safe", !why && Boolean(safe));
    row.tr.classList.toggle("has-detail", Boolean(why || safe));
    row.tr.classList.toggle("not-installed", missing);
    row.button.disabled = missing || down || m.state === "active" || state.activating.has(m.id);
    row.button.title = missing ? "not installed" : why;
  });
  for (const [id, row] of state.rows) {
    if (!seen.has(id)) {
      row.tr.remove();
      row.detail.remove();
      state.rows.delete(id);
    }
  }
  view.modelsEmpty.hidden = models.length > 0;
}

function safeModeText(args) {
  return `runs in safe mode (${args.join(" ")}): its server crashed while loading without it`;
}

// Why a model's server does not answer, and what to do: "reason; fix".
function unreachableText(unreachable) {
  if (!unreachable) return "its server does not answer";
  return unreachable.fix ? `${unreachable.reason}; ${unreachable.fix}` : unreachable.reason;
}

function modelRow(id) {
  const tr = document.createElement("tr");
  const cell = (className) => {
    const td = document.createElement("td");
    if (className) td.className = className;
    tr.append(td);
    return td;
  };
  const name = cell("name");
  name.append(id);
  const logical = document.createElement("small");
  name.append(logical);
  const row = {
    tr,
    logical,
    backend: cell(),
    quant: document.createElement("span"),
    format: document.createElement("small"),
  };
  cell().append(row.quant, row.format);
  row.caps = cell();
  row.state = cell("state");
  row.waiting = cell("num");
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = "Activate";
  button.setAttribute("aria-label", `Activate ${id}`);
  button.dataset.model = id;
  cell().append(button);
  row.button = button;
  // Why the model cannot be reached, and the fix: the full width of the table, under its row.
  row.detail = document.createElement("tr");
  row.detail.className = "detail";
  row.detail.hidden = true;
  row.why = document.createElement("td");
  row.why.colSpan = tr.children.length;
  row.why.id = `why-${(state.detailIds += 1)}`;
  row.detail.append(row.why);
  button.setAttribute("aria-describedby", row.why.id);
  return row;
}

function showSlot(slot) {
  setText(view.slotState, slot.state);
  setText(view.slotActivity, `${slot.activity} for ${duration(slot.phase_elapsed_s)}`);
  if (slot.holder) {
    const since = slot.holder_since ? ` since ${clock(slot.holder_since)}` : "";
    setText(view.slotHolder, `${displayName(slot.holder)}${since}`);
  } else {
    setText(view.slotHolder, "none (the GPU is free)");
  }
  setText(view.slotPid, slot.pid == null ? "–" : String(slot.pid));
  setText(view.slotActive, String(slot.active_requests));
  const waiting = Object.entries(slot.waiting || {}).filter(([, n]) => n > 0);
  setText(
    view.slotWaiting,
    waiting.length ? waiting.map(([name, n]) => `${displayName(name)}: ${n}`).join(", ") : "none",
  );
  setText(view.slotSwaps, String(slot.swaps));

  const current = SWAP_STEPS.indexOf(slot.activity);
  view.swapSteps.querySelectorAll("li").forEach((li, index) => {
    li.classList.toggle("done", current >= 0 && index < current);
    if (index === current) li.setAttribute("aria-current", "step");
    else li.removeAttribute("aria-current");
  });

  replaceItems(
    view.lastSwaps,
    (slot.last_swaps || [])
      .slice(-5)
      .reverse()
      .map((s) => `${displayName(s.model)}: ${s.duration_s.toFixed(1)} s, at ${clock(s.at)}`),
  );
  replaceItems(
    view.history,
    (slot.history || [])
      .slice(-8)
      .reverse()
      .map((h) => `${clock(h.at)} ${h.event}${h.model ? ` ${displayName(h.model)}` : ""}`),
  );
}

function showRequests(requests) {
  setText(view.inFlight, String(requests.in_flight));
  const recent = requests.recent || [];
  const fingerprint = JSON.stringify(recent);
  if (fingerprint === state.requestsShown) return;
  state.requestsShown = fingerprint;
  const rows = recent.map((r) => {
    const tr = document.createElement("tr");
    const cells = [
      [clock(r.at), ""],
      [displayName(r.model), ""],
      [`${r.status} ${r.outcome}${r.stream ? " · stream" : ""}`, `outcome-${r.outcome}`],
      [`${Math.round(r.latency_ms)} ms`, "num"],
      [r.ttft_ms == null ? "–" : `${Math.round(r.ttft_ms)} ms`, "num"],
      [r.completion_tokens == null ? "–" : String(r.completion_tokens), "num"],
    ];
    for (const [text, className] of cells) {
      const td = document.createElement("td");
      td.textContent = text;
      if (className) td.className = className;
      tr.append(td);
    }
    return tr;
  });
  view.requests.replaceChildren(...rows);
  view.requestsEmpty.hidden = rows.length > 0;
}

function showError(error) {
  view.errorCard.classList.toggle("has-error", Boolean(error));
  if (!error) {
    setText(view.errorSummary, "None since the proxy started.");
    view.errorLog.hidden = true;
    return;
  }
  const model = error.model ? ` (${displayName(error.model)})` : "";
  setText(view.errorSummary, `Error at ${clock(error.at)}${model}: ${error.message}`);
  const tail = (error.log_tail || "").replace(/^\n+/, "");
  setText(view.errorLog, tail);
  view.errorLog.hidden = !tail;
  view.errorLog.setAttribute("aria-label", "The model server's log, last lines");
}

// -- the chart: mean latency (line) and completion tokens per second (bars) ----------------------

const CHART = { left: 50, right: 386, top: 12, bottom: 146 };

function drawChart(series, serverNow) {
  const svg = view.chart;
  const ns = svg.namespaceURI; // the HTML parser put <svg> in the SVG namespace
  const make = (tag, attrs, text) => {
    const node = document.createElementNS(ns, tag);
    for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  };
  const label = (x, y, text, anchor = "start") =>
    make("text", { class: "label", x, y, "text-anchor": anchor }, text);
  const axis = (x1, y1, x2, y2) => make("line", { class: "axis", x1, y1, x2, y2 });

  const { left, right, top, bottom } = CHART;
  const start = serverNow - CHART_WINDOW_S;
  const x = (t) => {
    const along = Math.min(Math.max(t - start, 0), CHART_WINDOW_S) / CHART_WINDOW_S;
    return left + along * (right - left);
  };
  const nodes = [
    axis(left, bottom, right, bottom),
    axis(left, top, left, bottom),
    axis(right, top, right, bottom),
    label(x(start), bottom + 14, "−5 min"),
    label(x(start + CHART_WINDOW_S / 2), bottom + 14, "−2.5 min", "middle"),
    label(x(serverNow), bottom + 14, "now", "end"),
  ];

  const buckets = (series || []).filter((b) => b.at + BUCKET_S > start && b.requests > 0);
  if (!buckets.length) {
    const text = "No requests in the last 5 minutes";
    const middle = (left + right) / 2;
    nodes.push(make("text", { class: "empty", x: middle, y: 80, "text-anchor": "middle" }, text));
    svg.replaceChildren(...nodes);
    svg.setAttribute("aria-label", text);
    return;
  }

  const latency = (b) => b.mean_latency_ms || 0;
  const rate = (b) => (b.completion_tokens || 0) / BUCKET_S;
  const maxLatency = niceCeiling(Math.max(...buckets.map(latency)));
  const maxRate = niceCeiling(Math.max(...buckets.map(rate)));
  const y = (value, max) => bottom - (value / max) * (bottom - top);
  const barWidth = Math.max(2, (BUCKET_S / CHART_WINDOW_S) * (right - left) - 2);
  const latencyText = maxLatency >= 1000 ? `${maxLatency / 1000} s` : `${maxLatency} ms`;
  nodes.push(
    label(left - 4, top + 4, latencyText, "end"),
    label(left - 4, bottom, "0", "end"),
    label(right + 4, top + 4, `${maxRate} tok/s`),
    label(right + 4, bottom, "0"),
  );

  const points = [];
  for (const b of buckets) {
    const summary =
      `${clock(b.at)}: ${b.requests} requests, mean ${Math.round(latency(b))} ms, ` +
      `${rate(b).toFixed(1)} tok/s`;
    const barTop = y(rate(b), maxRate);
    const height = bottom - barTop;
    const bar = make("rect", { class: "bar", x: x(b.at), y: barTop, width: barWidth, height });
    bar.append(make("title", {}, summary));
    nodes.push(bar);
    points.push({ x: x(b.at) + barWidth / 2, y: y(latency(b), maxLatency), summary });
  }
  if (points.length > 1) {
    const d = points.map((p, i) => `${i ? "L" : "M"}${p.x.toFixed(1)},${p.y.toFixed(1)}`).join(" ");
    nodes.push(make("path", { class: "line", d }));
  }
  for (const p of points) {
    const dot = make("circle", { class: "dot", cx: p.x.toFixed(1), cy: p.y.toFixed(1), r: 3 });
    dot.append(make("title", {}, p.summary));
    nodes.push(dot);
  }
  svg.replaceChildren(...nodes);
  svg.setAttribute(
    "aria-label",
    `Last 5 minutes: mean latency up to ${latencyText}, ` +
      `throughput up to ${maxRate} tokens per second`,
  );
}

function niceCeiling(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5, 10]) {
    if (value <= step * power) return step * power;
  }
  return 10 * power;
}

// -- the buttons ----------------------------------------------------------------------------------

async function activate(model) {
  state.activating.add(model);
  say(`Activating ${model}…`, "busy");
  pollSoon();
  const started = performance.now();
  try {
    await api("POST", "/v1/admin/activate", { model });
    say(`${model} is active (ready after ${seconds(started)} s).`, "ok");
  } catch (err) {
    failed(`Activating ${model} failed`, err);
  } finally {
    state.activating.delete(model);
    pollSoon();
  }
}

async function stopModel() {
  say("Stopping the model (its requests finish first)…", "busy");
  view.stop.disabled = true;
  pollSoon();
  const started = performance.now();
  try {
    await api("POST", "/v1/admin/stop", {});
    say(`Model stopped after ${seconds(started)} s: the GPU is free.`, "ok");
  } catch (err) {
    failed("Stopping the model failed", err);
  } finally {
    view.stop.disabled = false;
    pollSoon();
  }
}

async function reloadRegistry() {
  say("Reloading the registry…", "busy");
  view.reload.disabled = true;
  try {
    const answer = await api("POST", "/v1/admin/reload", {});
    const warnings = answer.warnings || [];
    const noted = warnings.length ? `; ${warnings.length} warning(s): ${warnings.join("; ")}` : "";
    const listed =
      typeof answer.listed === "number" ? `, ${answer.listed} listed by /v1/models` : "";
    const kind = warnings.length ? "busy" : "ok";
    say(`Registry reloaded: ${answer.entries} entries${listed}${noted}.`, kind);
  } catch (err) {
    failed("Reloading the registry failed", err);
  } finally {
    view.reload.disabled = false;
    pollSoon();
  }
}

async function restartProxy() {
  const restart = { since: Date.now() };
  state.restart = restart;
  setConnection("restarting");
  say("Restarting the Chat Proxy…", "busy");
  try {
    const answer = await api("POST", "/v1/admin/restart", {}, 15000);
    if (state.restart !== restart) return; // already back: the poll said so
    const note =
      answer.mode === "exit"
        ? " The proxy exits: it comes back only if Docker or systemd restarts it."
        : "";
    const waiting = "waiting for the Chat Proxy to come back…";
    say(`Restart accepted (${answer.mode} mode): ${waiting}${note}`, "busy");
  } catch (err) {
    if (state.restart !== restart) return;
    if (err.status === 0) {
      say("No answer to the restart request: waiting for the Chat Proxy…", "busy");
    } else {
      state.restart = null;
      failed("Restarting the Chat Proxy failed", err);
      setConnection(state.bootId ? "live" : "connecting");
    }
  } finally {
    pollSoon();
  }
}

function failed(what, err) {
  if (isKeyProblem(err)) askForKey(keyNote(err));
  const detail = err instanceof ApiError && err.status ? ` (HTTP ${err.status})` : "";
  // A failed start carries the model server's log: the "Last error" panel shows it in full.
  let message = String(err && err.message);
  const cut = message.indexOf(LOG_TAIL_MARK);
  if (cut >= 0) message = `${message.slice(0, cut)} (its log is under Last error)`;
  if (message.length > MESSAGE_MAX) message = `${message.slice(0, MESSAGE_MAX)}…`;
  say(`${what}: ${message}${detail}`, "error");
}

function say(text, kind) {
  view.message.textContent = kind === "error" ? `Error: ${text}` : text;
  view.message.dataset.kind = kind;
}

// -- small helpers ------------------------------------------------------------------------------

function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

function replaceItems(list, texts) {
  const current = Array.from(list.children, (li) => li.textContent);
  if (current.length === texts.length && current.every((t, i) => t === texts[i])) return;
  list.replaceChildren(
    ...texts.map((t) => {
      const li = document.createElement("li");
      li.textContent = t;
      return li;
    }),
  );
}

function displayName(name) {
  return state.names.get(name) || name;
}

function short(bootId) {
  return String(bootId).slice(0, 8);
}

function seconds(startedMs) {
  return ((performance.now() - startedMs) / 1000).toFixed(1);
}

// An ISO time or epoch seconds, as the local wall-clock time.
function clock(at) {
  const date = typeof at === "number" ? new Date(at * 1000) : new Date(at);
  if (Number.isNaN(date.getTime())) return "?";
  const pad = (n) => String(n).padStart(2, "0");
  return `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
}

function duration(totalSeconds) {
  const s = Math.max(0, Number(totalSeconds) || 0);
  if (s < 60) return `${s.toFixed(1)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${String(Math.floor(s % 60)).padStart(2, "0")} s`;
  return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")} min`;
}

// -- start ---------------------------------------------------------------------------------------

view.models.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-model]");
  if (button && !button.disabled) activate(button.dataset.model);
});
view.stop.addEventListener("click", () => stopModel());
view.reload.addEventListener("click", () => reloadRegistry());
view.restart.addEventListener("click", () => restartProxy());
view.keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  storeKey(view.key.value.trim());
  view.key.value = "";
  view.keyForm.hidden = true;
  setConnection("connecting");
  if (state.paused) {
    state.paused = false;
    schedule(0);
  } else {
    pollSoon();
  }
});

setConnection("connecting");
schedule(0);
