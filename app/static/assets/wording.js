// Every sentence the panel writes itself, worded for one and for many. The sentences the
// API writes (notes, the calm notice) arrive ready-made; docs/wording.md lists both.

export const creditsWord = (n) => (n === 1 ? "credit" : "credits");

const LEVEL_TEXT = { green: "On track", amber: "Running low", red: "Almost out" };

// Nouns for the history summary; a feature without one is counted by its label.
const FEATURE_NOUNS = {
  checkin_draft: ["draft", "drafts"],
  trend_analysis: ["analysis", "analyses"],
};

// Verbs for the demo buttons; a feature without one falls back to the API's label.
const ACTION_TEXT = {
  checkin_draft: "Draft check-in response",
  trend_analysis: "Analyze client trends",
};

export const TEXT = {
  loading: "Loading your AI credits…",
  needsKey:
    "This panel needs an API key with the worker and reader scopes. Open it from the " +
    "coaching app, or for local testing add #key=<your key> to the address.",
  unreachable: "We couldn't reach the credits service. Please try again in a moment.",
  unexpected: "The credits service gave an unexpected answer. Please try again.",
  usageFailed: "Your AI credits could not be loaded just now.",
  historyFailed: "Your history could not be loaded just now.",
  noHistory: "No AI actions yet this month.",
  showEarlier: "Show earlier",
  refunded: "The AI action didn't finish, so nothing was charged.",
  couldNotStart: "This action could not start. Please try again.",
  refundFailed: "The action stopped; please check your credits.",
  commitFailed: "The action finished but could not be recorded.",
};

export function levelText(usage) {
  // At the very end "Almost out" would understate it; the colour still follows the level.
  if (usage.allowance > 0 && usage.used >= usage.allowance) return "All used";
  if (usage.allowance <= 0) return "No credits";
  return LEVEL_TEXT[usage.level] ?? LEVEL_TEXT.red;
}

/** After the figure "13 of 50": "credits used this month" (of 1: "credit"). */
export const usedLabel = (allowance) => `${creditsWord(allowance)} used this month`;

export function barText(usage) {
  const word = creditsWord(usage.allowance);
  return `${usage.used} of ${usage.allowance} ${word} used, ${levelText(usage).toLowerCase()}`;
}

export const leftLine = (remaining) => `${remaining} ${creditsWord(remaining)} left`;

/** Credits held by actions still running; costs are whole credits, so 1 is one action. */
export function heldLine(held) {
  if (held <= 0) return "";
  return held === 1 ? "1 on hold for an action in progress" : `${held} on hold for actions in progress`;
}

/** "Resets December 1, 00:00 UTC", with the year when it is not ``currentYear``. */
export function resetLine(iso, currentYear) {
  const when = new Date(iso);
  if (Number.isNaN(when.getTime())) return "";
  const parts = { timeZone: "UTC", month: "long", day: "numeric" };
  if (when.getUTCFullYear() !== currentYear) parts.year = "numeric";
  const day = new Intl.DateTimeFormat("en-US", parts).format(when);
  return `Resets ${day}, ${clock(when)} UTC`;
}

/** "Nov 14, 09:05 UTC": when a history entry happened. */
export function historyTime(iso) {
  const when = new Date(iso);
  if (Number.isNaN(when.getTime())) return "";
  const day = new Intl.DateTimeFormat("en-US", {
    timeZone: "UTC",
    month: "short",
    day: "numeric",
  }).format(when);
  return `${day}, ${clock(when)} UTC`;
}

function clock(when) {
  const hh = String(when.getUTCHours()).padStart(2, "0");
  const mm = String(when.getUTCMinutes()).padStart(2, "0");
  return `${hh}:${mm}`;
}

export function buttonLabel(feature) {
  const action = ACTION_TEXT[feature.feature] ?? feature.label;
  return `${action} · ${feature.cost} ${creditsWord(feature.cost)}`;
}

/** The quiet hint on a button whose cost no longer fits: "needs 3 · 1 left". */
export const hintText = (cost, remaining) => `needs ${cost} · ${remaining} left`;

export const workingText = (label) => `Working on it: ${label.toLowerCase()}…`;

/** "12 drafts · 3 analyses": committed actions per feature, most frequent first. */
export function summaryLine(counts) {
  const parts = counts
    .filter((c) => c.count > 0)
    .sort((a, b) => b.count - a.count)
    .map(({ feature, label, count }) => {
      const nouns = FEATURE_NOUNS[feature];
      if (nouns) return `${count} ${count === 1 ? nouns[0] : nouns[1]}`;
      return `${label} × ${count}`;
    });
  return parts.length ? parts.join(" · ") : TEXT.noHistory;
}

/**
 * One history entry: its title and what it did to the credits, or null for an event the
 * coach need not see (a hold being made, an extension).
 */
export function historyEntry(event, labelOf) {
  switch (event.kind) {
    case "committed":
      return { title: labelOf(event.feature), amount: `${event.cost} ${creditsWord(event.cost)}` };
    case "refunded":
      return { title: labelOf(event.feature), amount: "Not charged", why: "didn't finish" };
    case "expired":
      return { title: labelOf(event.feature), amount: "Not charged", why: "timed out" };
    case "granted": {
      const n = Math.abs(event.credits);
      const word = creditsWord(n);
      return event.credits >= 0
        ? { title: "Credits added", amount: `+${n} ${word}` }
        : { title: "Credits removed", amount: `−${n} ${word}` };
    }
    case "allowance_changed":
      return event.monthly_allowance === null || event.monthly_allowance === undefined
        ? { title: "Monthly allowance back to standard", amount: "" }
        : {
            title: "Monthly allowance changed",
            amount: `${event.monthly_allowance} ${creditsWord(event.monthly_allowance)}`,
          };
    default:
      return null;
  }
}
