// The "AI Usage" settings panel. Everything it shows comes from the credits API: the
// level colour, the costs and the sentences about a coach's credits are decided
// server-side, so this file fetches, renders, follows the live usage stream and, with
// ?demo=1, runs actions the way the coaching app does.

import {
  TEXT,
  barText,
  buttonLabel,
  heldLine,
  hintText,
  historyEntry,
  historyTime,
  leftLine,
  levelText,
  resetLine,
  summaryLine,
  usedLabel,
  workingText,
} from "./wording.js";

const DEFAULT_DELAY_MS = 1200;
const MAX_DELAY_MS = 10000;
const DEFAULT_POLL_MS = 15000;
const MIN_POLL_MS = 200;
const MAX_POLL_MS = 300000;
const DEFAULT_RECONNECT_MS = 2000;
// Events per history page (a hold and its outcome are two), and per summary read.
const HISTORY_PAGE = 20;
const SUMMARY_PAGE = 500;
// Bounds on reads for one click or one summary: the log keeps at most 10,000 events.
const MAX_PAGES = 20;

const $ = (id) => document.getElementById(id);

const panel = $("panel");
const coachId = panel.dataset.coachId;
// Resolved against the page URL so a path prefix in front of the service is kept.
const apiBase = new URL("../", window.location.href);
const params = new URLSearchParams(window.location.search);
const demo = params.get("demo") === "1";
const delayMs = clampInt(params.get("delay_ms"), DEFAULT_DELAY_MS, 0, MAX_DELAY_MS);
const pollMs = clampInt(params.get("poll_ms"), DEFAULT_POLL_MS, MIN_POLL_MS, MAX_POLL_MS);
const apiKey = takeKeyFromFragment();

let features = [];
let labels = {};
let busy = false;
let lastUsage = null;
let historyBefore = null;
let historyGeneration = 0;
let historyTimer = 0;

function clampInt(raw, fallback, min, max) {
  const n = Number.parseInt(raw ?? "", 10);
  if (Number.isNaN(n)) return fallback;
  return Math.min(max, Math.max(min, n));
}

// A key arrives in the fragment (#key=...), which browsers never send to a server, so
// it stays out of access logs and Referer headers. It is then removed from the address
// bar and history and kept in memory only: a reload without it asks for it again.
function takeKeyFromFragment() {
  const fragment = new URLSearchParams(window.location.hash.slice(1));
  const key = fragment.get("key");
  if (key !== null) {
    const clean = window.location.pathname + window.location.search;
    window.history.replaceState(null, "", clean);
  }
  return key && key.trim() ? key.trim() : null;
}

// Random without crypto.randomUUID, which browsers only offer on HTTPS or localhost.
function newIdempotencyKey() {
  const bytes = new Uint8Array(16);
  window.crypto.getRandomValues(bytes);
  return "panel-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function authHeaders(headers = {}) {
  return apiKey ? { ...headers, Authorization: `Bearer ${apiKey}` } : headers;
}

async function api(method, path, { body, headers = {} } = {}) {
  const init = { method, headers: authHeaders({ Accept: "application/json", ...headers }) };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(new URL(path, apiBase), init);
  } catch {
    return { ok: false, status: 0, data: { detail: TEXT.unreachable } };
  }
  let data = {};
  try {
    data = await response.json();
  } catch {
    data = { detail: TEXT.unexpected };
  }
  return { ok: response.ok, status: response.status, data };
}

const coachPath = () => `v1/coaches/${encodeURIComponent(coachId)}`;
const labelOf = (feature) => labels[feature] ?? feature.replaceAll("_", " ");

// --- usage ---------------------------------------------------------------------------

function renderUsage(usage) {
  const changed =
    lastUsage !== null &&
    (lastUsage.used !== usage.used ||
      lastUsage.held !== usage.held ||
      lastUsage.allowance !== usage.allowance);
  lastUsage = usage;
  const level = ["green", "amber", "red"].includes(usage.level) ? usage.level : "red";

  // The effective allowance (grants and overrides included) is what the figures use.
  $("used-count").textContent = `${usage.used} of ${usage.allowance}`;
  $("used-label").textContent = usedLabel(usage.allowance);

  const bar = $("usage-bar");
  bar.classList.remove("level-green", "level-amber", "level-red");
  bar.classList.add(`level-${level}`);
  bar.dataset.level = level;
  bar.setAttribute("aria-valuemin", "0");
  bar.setAttribute("aria-valuemax", String(usage.allowance));
  bar.setAttribute("aria-valuenow", String(usage.used));
  bar.setAttribute("aria-valuetext", barText(usage));
  $("usage-fill").style.width = `${Math.min(100, Math.max(0, usage.percent_used))}%`;

  const levelEl = $("level-text");
  levelEl.className = `level level-${level}`;
  levelEl.textContent = levelText(usage);

  $("remaining").textContent = leftLine(usage.remaining);
  $("held").textContent = heldLine(usage.held);
  // The current year is the service's, from the period, not the viewer's clock.
  const year = Number.parseInt(String(usage.period).slice(0, 4), 10);
  $("resets").textContent = resetLine(usage.resets_at, year);

  $("usage").hidden = false;
  $("panel-message").hidden = true;
  renderHints();
  if (changed) scheduleHistory();
}

function showPanelMessage(result) {
  const message = $("panel-message");
  if (result.status === 401 || result.status === 403) {
    message.textContent = TEXT.needsKey;
  } else {
    message.textContent = result.data.detail || TEXT.usageFailed;
  }
  message.hidden = false;
}

async function loadUsage() {
  const result = await api("GET", coachPath() + "/usage");
  if (result.ok) renderUsage(result.data);
  else if (lastUsage === null) showPanelMessage(result);
  return result;
}

// --- live: the usage stream, read with fetch so it can carry the key ----------------

function parseEvent(block) {
  const event = { type: "message", data: [], retry: null };
  for (const line of block.split(/\r?\n/)) {
    if (line === "" || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event.type = value;
    else if (field === "data") event.data.push(value);
    else if (field === "retry" && /^\d+$/.test(value)) event.retry = Number(value);
  }
  return event;
}

// Reads one stream to its end; returns how long the server asked to wait before the next.
async function readStream(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let retry = DEFAULT_RECONNECT_MS;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return retry;
    buffer += value;
    const blocks = buffer.split(/\r?\n\r?\n/);
    buffer = blocks.pop();
    for (const block of blocks) {
      const event = parseEvent(block);
      if (event.retry !== null) retry = event.retry;
      if (event.type === "usage" && event.data.length) {
        try {
          renderUsage(JSON.parse(event.data.join("\n")));
        } catch {
          // A malformed event is skipped; the next one carries the whole usage again.
        }
      }
    }
  }
}

const sleep = (ms) => new Promise((resolve) => window.setTimeout(resolve, ms));

async function follow() {
  const url = new URL(coachPath() + "/usage/stream", apiBase);
  for (;;) {
    let response = null;
    try {
      response = await fetch(url, { headers: authHeaders({ Accept: "text/event-stream" }) });
    } catch {
      response = null;
    }
    if (response === null || !response.ok || !response.body) {
      // Refused (too many streams, a proxy that buffers, no network): poll instead.
      poll();
      return;
    }
    panel.dataset.live = "stream";
    let wait = DEFAULT_RECONNECT_MS;
    try {
      wait = await readStream(response.body);
    } catch {
      // The connection dropped; reconnect as EventSource would.
    }
    await sleep(wait);
    // Whatever changed while reconnecting arrives as the new stream's first event.
  }
}

function poll() {
  panel.dataset.live = "polling";
  window.setInterval(loadUsage, pollMs);
}

// --- history: this month's actions, newest first, from the event log ------------------

function eventsPath(limit, before) {
  const query = new URLSearchParams({ limit: String(limit) });
  if (before !== null) query.set("before", String(before));
  return `${coachPath()}/events?${query}`;
}

function historyItem(event, entry) {
  const item = document.createElement("li");
  item.className = `entry entry-${event.kind}`;
  item.dataset.kind = event.kind;
  const title = document.createElement("span");
  title.className = "entry-title";
  title.textContent = entry.title;
  const amount = document.createElement("span");
  amount.className = "entry-amount";
  amount.textContent = entry.amount;
  const when = document.createElement("span");
  when.className = "entry-when";
  when.textContent = entry.why ? `${historyTime(event.at)} · ${entry.why}` : historyTime(event.at);
  item.append(title, amount, when);
  return item;
}

function historyFailed(result) {
  $("history-message").textContent =
    result.status === 401 || result.status === 403
      ? TEXT.needsKey
      : result.data.detail || TEXT.historyFailed;
}

// The next page of entries (pages with nothing to show are read through), put after the
// ones shown, or in their place for a fresh start: the list never flashes empty.
async function loadHistoryPage(generation, replace) {
  const items = [];
  for (let page = 0; page < MAX_PAGES && items.length === 0; page += 1) {
    const result = await api("GET", eventsPath(HISTORY_PAGE, historyBefore));
    if (generation !== historyGeneration) return;
    if (!result.ok) {
      historyFailed(result);
      return;
    }
    for (const event of result.data.events) {
      const entry = historyEntry(event, labelOf);
      if (entry) items.push(historyItem(event, entry));
    }
    historyBefore = result.data.next_before;
    if (historyBefore === null) break;
  }
  if (replace) $("history-list").replaceChildren(...items);
  else $("history-list").append(...items);
  $("history-more").hidden = historyBefore === null;
}

async function loadSummary(generation) {
  const counts = new Map();
  let before = null;
  for (let page = 0; page < MAX_PAGES; page += 1) {
    const result = await api("GET", eventsPath(SUMMARY_PAGE, before));
    if (generation !== historyGeneration) return;
    if (!result.ok) {
      historyFailed(result);
      return;
    }
    for (const event of result.data.events) {
      if (event.kind === "committed") counts.set(event.feature, (counts.get(event.feature) ?? 0) + 1);
    }
    before = result.data.next_before;
    if (before === null) break;
  }
  // Ties keep the order of the features list, so the line does not shuffle.
  const order = [...features.map((f) => f.feature), ...counts.keys()];
  const named = [...new Set(order)].filter((feature) => counts.has(feature));
  $("history-summary").textContent = summaryLine(
    named.map((feature) => ({ feature, label: labelOf(feature), count: counts.get(feature) })),
  );
}

async function reloadHistory() {
  historyGeneration += 1;
  const generation = historyGeneration;
  historyBefore = null;
  $("history-message").textContent = "";
  $("history").hidden = false;
  await Promise.all([loadSummary(generation), loadHistoryPage(generation, true)]);
  // For tests and tools: how many times the history has been read afresh.
  if (generation === historyGeneration) {
    panel.dataset.historyLoads = String(Number(panel.dataset.historyLoads ?? 0) + 1);
  }
}

function scheduleHistory() {
  // One reload for a burst of changes (a hold and its commit arrive close together).
  window.clearTimeout(historyTimer);
  historyTimer = window.setTimeout(reloadHistory, 250);
}

async function showEarlier() {
  const more = $("history-more");
  more.disabled = true;
  $("history-list").setAttribute("aria-busy", "true");
  await loadHistoryPage(historyGeneration, false);
  $("history-list").setAttribute("aria-busy", "false");
  more.disabled = false;
}

// --- demo: the coaching app's AI actions around the panel ------------------------------

function actionButtons() {
  return [...$("actions").querySelectorAll("button")];
}

function renderActions() {
  $("actions").replaceChildren(
    ...features.map((feature) => {
      const wrap = document.createElement("div");
      wrap.className = "action-wrap";
      const button = document.createElement("button");
      button.type = "button";
      button.className = "action";
      button.dataset.feature = feature.feature;
      button.textContent = buttonLabel(feature);
      const hint = document.createElement("span");
      hint.className = "hint";
      hint.id = `hint-${feature.feature}`;
      button.setAttribute("aria-describedby", hint.id);
      button.addEventListener("click", () => runAction(feature, button));
      wrap.append(button, hint);
      return wrap;
    }),
  );
  renderHints();
}

// A cost that no longer fits gets a quiet hint; the button stays as it is, and clicking
// it still answers with the calm notice.
function renderHints() {
  if (!demo || lastUsage === null) return;
  const available = new Map((lastUsage.features ?? []).map((f) => [f.feature, f.available]));
  for (const feature of features) {
    const fits = available.get(feature.feature) ?? feature.cost <= lastUsage.remaining;
    const hint = $(`hint-${feature.feature}`);
    if (hint) hint.textContent = fits ? "" : hintText(feature.cost, lastUsage.remaining);
  }
}

function setBusy(value, text = "") {
  busy = value;
  for (const button of actionButtons()) button.disabled = value;
  $("actions").setAttribute("aria-busy", String(value));
  $("activity").textContent = text;
}

function showNotice(text, button) {
  $("notice").textContent = text;
  button.setAttribute("aria-describedby", `hint-${button.dataset.feature} notice`);
}

function clearNotice() {
  $("notice").textContent = "";
  for (const button of actionButtons()) {
    button.setAttribute("aria-describedby", `hint-${button.dataset.feature}`);
  }
}

function addResult(feature, text, outcome) {
  const item = document.createElement("li");
  item.className = `result result-${outcome}`;
  item.dataset.outcome = outcome;
  const title = document.createElement("span");
  title.className = "result-title";
  title.textContent = feature.label;
  const note = document.createElement("span");
  note.className = "result-note";
  note.textContent = text;
  item.append(title, note);
  $("results").prepend(item);
}

// One simulated AI action: hold the cost, "generate", then commit on success or refund
// on failure, so a coach is charged only for work that finished.
async function runAction(feature, button) {
  if (busy) return;
  const simulateFailure = $("simulate-failure").checked;
  clearNotice();
  setBusy(true, workingText(feature.label));
  try {
    const held = await api("POST", coachPath() + "/reservations", {
      body: { feature: feature.feature },
      headers: { "Idempotency-Key": newIdempotencyKey() },
    });
    if (!held.ok) {
      // The 429 detail already says, calmly, what is missing and when it comes back.
      showNotice(held.data.detail || TEXT.couldNotStart, button);
      return;
    }
    // The hold already counts against what is left; show it while the action runs.
    if (held.data.usage) renderUsage(held.data.usage);
    await sleep(delayMs);
    const id = encodeURIComponent(held.data.reservation_id);
    if (simulateFailure) {
      const refunded = await api("POST", `v1/reservations/${id}/refund`);
      if (refunded.ok) addResult(feature, TEXT.refunded, "refunded");
      else showNotice(refunded.data.detail || TEXT.refundFailed, button);
      return;
    }
    const committed = await api("POST", `v1/reservations/${id}/commit`);
    if (committed.ok) addResult(feature, committed.data.note, "committed");
    else showNotice(committed.data.detail || TEXT.commitFailed, button);
  } finally {
    await loadUsage();
    setBusy(false);
  }
}

// --- start ------------------------------------------------------------------------------

async function start() {
  $("history-more").addEventListener("click", showEarlier);
  if (demo) $("demo").hidden = false;
  const [featureResult, usageResult] = await Promise.all([
    api("GET", "v1/features"),
    loadUsage(),
  ]);
  if (featureResult.ok) {
    features = featureResult.data.features;
    labels = Object.fromEntries(features.map((f) => [f.feature, f.label]));
    if (demo) renderActions();
  } else {
    showPanelMessage(featureResult);
  }
  if (usageResult.ok) {
    await reloadHistory();
    follow();
  }
  panel.setAttribute("aria-busy", "false");
  panel.dataset.ready = "true";
}

start();
