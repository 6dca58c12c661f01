// The "AI Usage" settings panel. Everything it shows comes from the credits API:
// the level colour, the costs and every sentence a coach reads about credits are
// decided server-side, so this file only fetches, renders and sequences an action.

const LEVEL_TEXT = { green: "On track", amber: "Running low", red: "Almost out" };

// Verbs for the buttons; a feature without one falls back to the API's label.
const ACTION_TEXT = {
  checkin_draft: "Draft check-in response",
  trend_analysis: "Analyze client trends",
};

const DEFAULT_DELAY_MS = 1200;
const MAX_DELAY_MS = 10000;

const $ = (id) => document.getElementById(id);

const panel = $("panel");
const coachId = panel.dataset.coachId;
// Resolved against the page URL so a path prefix in front of the service is kept.
const apiBase = new URL("../", window.location.href);
const params = new URLSearchParams(window.location.search);
const delayMs = clampDelay(params.get("delay_ms"));
const apiKey = takeKeyFromFragment();

let features = [];
let busy = false;

function clampDelay(raw) {
  const n = Number.parseInt(raw ?? "", 10);
  if (Number.isNaN(n)) return DEFAULT_DELAY_MS;
  return Math.min(MAX_DELAY_MS, Math.max(0, n));
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

async function api(method, path, { body, headers = {} } = {}) {
  const init = { method, headers: { Accept: "application/json", ...headers } };
  if (apiKey) init.headers.Authorization = `Bearer ${apiKey}`;
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(new URL(path, apiBase), init);
  } catch {
    return {
      ok: false,
      status: 0,
      data: { detail: "We couldn't reach the credits service. Please try again in a moment." },
    };
  }
  let data = {};
  try {
    data = await response.json();
  } catch {
    data = { detail: "The credits service gave an unexpected answer. Please try again." };
  }
  return { ok: response.ok, status: response.status, data };
}

const coachPath = () => `v1/coaches/${encodeURIComponent(coachId)}`;

function creditsWord(n) {
  return n === 1 ? "credit" : "credits";
}

// "Resets December 1, 00:00 UTC": formatted in UTC whatever the viewer's time zone.
function formatReset(iso) {
  const when = new Date(iso);
  if (Number.isNaN(when.getTime())) return "";
  const day = new Intl.DateTimeFormat("en-US", {
    timeZone: "UTC",
    month: "long",
    day: "numeric",
  }).format(when);
  const hh = String(when.getUTCHours()).padStart(2, "0");
  const mm = String(when.getUTCMinutes()).padStart(2, "0");
  return `Resets ${day}, ${hh}:${mm} UTC`;
}

function renderUsage(usage) {
  const level = LEVEL_TEXT[usage.level] ? usage.level : "red";
  // At the very end "Almost out" would understate it; the colour still follows the level.
  const levelText = usage.used >= usage.allowance ? "All used" : LEVEL_TEXT[level];
  $("used-count").textContent = `${usage.used} of ${usage.allowance}`;

  const bar = $("usage-bar");
  bar.classList.remove("level-green", "level-amber", "level-red");
  bar.classList.add(`level-${level}`);
  bar.dataset.level = level;
  bar.setAttribute("aria-valuemin", "0");
  bar.setAttribute("aria-valuemax", String(usage.allowance));
  bar.setAttribute("aria-valuenow", String(usage.used));
  bar.setAttribute(
    "aria-valuetext",
    `${usage.used} of ${usage.allowance} credits used, ${levelText.toLowerCase()}`,
  );
  $("usage-fill").style.width = `${Math.min(100, Math.max(0, usage.percent_used))}%`;

  const levelEl = $("level-text");
  levelEl.className = `level level-${level}`;
  levelEl.textContent = levelText;

  let left = `${usage.remaining} ${creditsWord(usage.remaining)} left`;
  if (usage.held > 0) left += ` · ${usage.held} in use by actions in progress`;
  $("remaining").textContent = left;
  $("resets").textContent = formatReset(usage.resets_at);

  $("usage").hidden = false;
  $("panel-message").hidden = true;
}

function showPanelMessage(result) {
  const message = $("panel-message");
  if (result.status === 401 || result.status === 403) {
    message.textContent =
      "This panel needs an API key that may read and spend credits. Open it from the " +
      "coaching app, or for local testing add #key=<your key> to the address.";
  } else {
    message.textContent = result.data.detail || "Your AI credits could not be loaded just now.";
  }
  message.hidden = false;
}

async function loadUsage() {
  const result = await api("GET", coachPath() + "/usage");
  if (result.ok) renderUsage(result.data);
  else showPanelMessage(result);
  return result.ok;
}

function buttonLabel(feature) {
  const action = ACTION_TEXT[feature.feature] ?? feature.label;
  return `${action} · ${feature.cost} ${creditsWord(feature.cost)}`;
}

function renderActions() {
  const actions = $("actions");
  actions.replaceChildren(
    ...features.map((feature) => {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "action";
      button.dataset.feature = feature.feature;
      button.textContent = buttonLabel(feature);
      button.addEventListener("click", () => runAction(feature));
      return button;
    }),
  );
  $("try").hidden = false;
}

function setBusy(value, text = "") {
  busy = value;
  for (const button of $("actions").querySelectorAll("button")) button.disabled = value;
  $("actions").setAttribute("aria-busy", String(value));
  $("activity").textContent = text;
}

function showNotice(text) {
  const notice = $("notice");
  notice.textContent = text;
  notice.hidden = false;
}

function clearNotice() {
  const notice = $("notice");
  notice.textContent = "";
  notice.hidden = true;
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

const sleep = (ms) => new Promise((resolve) => window.setTimeout(resolve, ms));

// One simulated AI action: hold the cost, "generate", then commit on success or refund
// on failure, so a coach is charged only for work that finished.
async function runAction(feature) {
  if (busy) return;
  const simulateFailure = $("simulate-failure").checked;
  clearNotice();
  setBusy(true, `Working on it: ${feature.label.toLowerCase()}…`);
  try {
    const held = await api("POST", coachPath() + "/reservations", {
      body: { feature: feature.feature },
      headers: { "Idempotency-Key": newIdempotencyKey() },
    });
    if (!held.ok) {
      // The 429 detail already says, calmly, that credits are used up and when they refresh.
      showNotice(held.data.detail || "This action could not start. Please try again.");
      return;
    }
    // The hold already counts against what is left; show it while the action runs.
    if (held.data.usage) renderUsage(held.data.usage);
    await sleep(delayMs);
    const id = encodeURIComponent(held.data.reservation_id);
    if (simulateFailure) {
      const refunded = await api("POST", `v1/reservations/${id}/refund`);
      if (refunded.ok) {
        addResult(feature, "The AI action didn't finish, so nothing was charged.", "refunded");
      } else {
        showNotice(refunded.data.detail || "The action stopped; please check your credits.");
      }
      return;
    }
    const committed = await api("POST", `v1/reservations/${id}/commit`);
    if (committed.ok) {
      addResult(feature, committed.data.note, "committed");
    } else {
      showNotice(committed.data.detail || "The action finished but could not be recorded.");
    }
  } finally {
    await loadUsage();
    setBusy(false);
  }
}

async function start() {
  const [featureResult] = await Promise.all([api("GET", "v1/features"), loadUsage()]);
  if (!featureResult.ok) {
    showPanelMessage(featureResult);
  } else {
    features = featureResult.data.features;
    renderActions();
  }
  panel.setAttribute("aria-busy", "false");
  panel.dataset.ready = "true";
}

start();
