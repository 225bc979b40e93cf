// Hogwild! dashboard: submit a problem, watch the workers write into their shared memory, replay old jobs.
// Plain DOM code with no dependencies (the page must work with nothing external reachable). Model text is
// only ever placed with textContent or text nodes, never parsed as HTML.
"use strict";

const KEY_STORAGE = "hogwild_key";
const COLOR_COUNT = 8; // style.css defines .c0 ... .c7
const ENDED = new Set(["finished", "cancelled", "failed"]);
const STATUS_OF_REASON = { cancelled: "cancelled", error: "failed" };
const STATUS_RANK = { queued: 0, running: 1, finished: 2, cancelled: 2, failed: 2 };
const STATS_EVERY_MS = 5000;
const CLOCK_EVERY_MS = 200;
const MODEL_RETRY_MAX_MS = 10000;

const $ = (id) => document.getElementById(id);

// The job on screen. `lastSeq` makes duplicate events (a reconnect that resends) harmless; `timed` is false
// for a replay, whose token speeds would only measure the replay: an ended job's speeds come from the
// server's record instead (`final`), the same figures a live view ends on. `stopped` freezes the clock
// between the done event and the job object that carries the server's duration.
const view = {
  job: null,
  source: null,
  lastSeq: -1,
  workers: [],
  historyCount: 0,
  timed: false,
  opened: 0,
  stopped: null,
  final: null,
  frame: 0,
};

/* ---------- API ---------- */

function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

// EventSource cannot send headers, so the key also travels as a cookie (docs/API.md).
function storeKey(key) {
  if (key) {
    localStorage.setItem(KEY_STORAGE, key);
    document.cookie = `hogwild_key=${encodeURIComponent(key)}; path=/; SameSite=Strict`;
  } else {
    localStorage.removeItem(KEY_STORAGE);
    document.cookie = "hogwild_key=; path=/; max-age=0; SameSite=Strict";
  }
}

class ApiError extends Error {
  constructor(status, message, field) {
    super(status ? `${status}: ${message}` : message);
    this.status = status;
    this.field = field;
  }
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let res;
  try {
    res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (err) {
    throw new ApiError(0, `server unreachable (${err.message})`);
  }
  let data = null;
  try {
    data = await res.json();
  } catch {
    data = null;
  }
  if (!res.ok) {
    const err = data && data.error;
    let message = (err && err.message) || (data && data.detail) || res.statusText || "request failed";
    if (typeof message !== "string") message = JSON.stringify(message);
    const retry = res.headers.get("Retry-After");
    if (retry) message += ` (retry after ${retry} s)`;
    throw new ApiError(res.status, message, err && err.field);
  }
  return data;
}

/* ---------- small helpers ---------- */

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function workerName(index) {
  const w = view.workers[index];
  return w ? w.name : `Worker ${index + 1}`;
}

// A job's `prompt` is the problem as submitted, or the chat messages of the OpenAI route.
function promptOf(job) {
  if (!Array.isArray(job.prompt)) return String(job.prompt || "");
  if (job.prompt.length === 1) return String(job.prompt[0].content || "");
  return job.prompt.map((m) => `${m.role}: ${m.content}`).join("\n");
}

// What the job list calls a job: the problem, or a chat's first user message, on one line.
function titleOf(job) {
  const messages = Array.isArray(job.prompt) ? job.prompt : [];
  const first = messages.find((m) => m.role === "user");
  const text = first ? String(first.content || "") : promptOf(job);
  return text.replace(/\s+/g, " ").trim() || job.id;
}

// The later of two statuses: a list fetched before an event arrived must not undo what the event said.
function laterStatus(a, b) {
  return (STATUS_RANK[b] || 0) > (STATUS_RANK[a] || 0) ? b : a;
}

function duration(seconds) {
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  return `${Math.floor(seconds / 60)} min ${String(Math.floor(seconds % 60)).padStart(2, "0")} s`;
}

function speed(tokens, seconds) {
  return `${(tokens / seconds).toFixed(1)} tok/s`;
}

function clock(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleTimeString() : "";
}

function showBanner(node, text) {
  node.textContent = text || "";
  node.hidden = !text;
}

/* ---------- the job view ---------- */

function paintStatus(badge, status) {
  badge.textContent = status;
  badge.className = `status s-${status}`;
}

// The job on screen and its entry in the job list move together, as its events arrive.
function setStatus(status) {
  view.job.status = status;
  paintStatus($("job-status"), status);
  const item = document.querySelector(`#jobs li[data-id="${CSS.escape(view.job.id)}"] .status`);
  if (item) paintStatus(item, status);
  $("cancel").disabled = ENDED.has(status);
  renderClock();
}

// Elapsed time while the job runs, the server's duration once it ended; total tokens/s beside it.
function renderClock() {
  const job = view.job;
  const timings = job.timings || {};
  const ended = ENDED.has(job.status);
  let seconds = timings.duration_s;
  if (seconds == null && timings.created) {
    seconds = Math.max(0, (view.stopped || Date.now() / 1000) - timings.created);
  }
  $("job-clock").textContent = seconds == null ? "" : `${ended ? "took" : "elapsed"} ${duration(seconds)}`;
  let total = "";
  if (view.final) {
    total = speed(view.final.generated.reduce((a, b) => a + b, 0), view.final.seconds);
  } else if (view.timed && seconds) {
    const generated = view.workers.reduce((n, w) => n + (w ? w.generated : 0), 0);
    if (generated) total = speed(generated, seconds);
  }
  $("job-speed").textContent = total && `${total} in all`;
}

function addWorker(index, name) {
  const card = el("article", `worker c${index % COLOR_COUNT}`);
  card.dataset.worker = String(index);
  const head = el("header", "worker-head");
  head.append(el("span", "dot"), el("h3", "worker-name", name));
  const stats = el("span", "worker-stats", "waiting");
  const state = el("span", "worker-state", "");
  head.append(stats);
  const text = el("div", "worker-text");
  const foot = el("footer", "worker-foot");
  foot.append(state);
  card.append(head, text, foot);
  $("worker-grid").append(card);
  const w = {
    index, name, card, text, stats, state,
    segment: null, segmentForced: null,
    generated: 0, forced: 0, step: 0, checks: 0,
    last: 0, finish: null, dirty: true, stick: true,
  };
  // Follow the text as it grows unless the reader scrolled up to read.
  text.addEventListener("scroll", () => {
    w.stick = text.scrollHeight - text.scrollTop - text.clientHeight < 24;
  });
  view.workers[index] = w;
  return w;
}

function worker(index) {
  for (let i = view.workers.length; i <= index; i++) addWorker(i, `Worker ${i + 1}`);
  return view.workers[index];
}

function renderWorker(w) {
  const parts = [`${w.generated} tok`];
  // Live: measured from when the stream opened, so it includes the wait for prefill, what the user
  // experiences. Ended: the worker's generated tokens over the job's duration, as the server recorded them.
  if (view.final) {
    parts.push(speed(view.final.generated[w.index] || 0, view.final.seconds));
  } else if (view.timed && w.generated && w.last > view.opened) {
    parts.push(speed(w.generated, (w.last - view.opened) / 1000));
  }
  w.stats.textContent = parts.join(" · ");
  const state = [`step ${w.step || 1}`];
  if (w.checks) state.push(`${w.checks} quick check${w.checks > 1 ? "s" : ""}`);
  if (w.finish) state.push(w.finish);
  w.state.textContent = state.join(" · ");
  if (w.stick) w.text.scrollTop = w.text.scrollHeight;
  w.dirty = false;
}

// Tokens arrive far faster than the screen refreshes: mark workers dirty, redraw once per frame.
function schedule() {
  if (view.frame) return;
  view.frame = requestAnimationFrame(() => {
    view.frame = 0;
    for (const w of view.workers) if (w && w.dirty) renderWorker(w);
  });
}

function onToken(d) {
  const w = worker(d.worker);
  const forced = Boolean(d.forced);
  if (!w.segment || w.segmentForced !== forced) {
    const span = el("span", forced ? "forced" : "gen");
    w.segment = document.createTextNode("");
    span.append(w.segment);
    w.text.append(span);
    w.segmentForced = forced;
  }
  w.segment.appendData(d.text || "");
  if (forced) {
    w.forced += 1;
  } else {
    w.last = performance.now();
    w.generated += 1;
  }
  if (typeof d.step === "number") w.step = d.step;
  w.dirty = true;
  schedule();
}

// The job's workers where the reader can see them: on a phone the form above them can fill the screen.
function reveal() {
  const first = $("worker-grid").firstElementChild;
  if (first && first.getBoundingClientRect().top > window.innerHeight * 0.6) {
    $("job").scrollIntoView({ block: "start" });
  }
}

function addHistory(item) {
  $("history").append(item);
  $("history-empty").hidden = true;
  $("history-count").textContent = view.historyCount ? `${view.historyCount} steps` : "";
}

function onStep(d) {
  view.historyCount += 1;
  const item = el("li", `step c${d.worker % COLOR_COUNT}`);
  const who = el("div", "who");
  who.append(el("span", "dot"), el("strong", "", workerName(d.worker)), el("span", "muted", ` step ${d.step}`));
  item.append(who, el("div", "step-text", (d.text || "").trim()));
  addHistory(item);
  const w = worker(d.worker);
  w.step = d.step + 1;
  w.dirty = true;
  schedule();
}

function onQuickCheck(d) {
  const w = worker(d.worker);
  w.checks += 1;
  w.dirty = true;
  schedule();
  const item = el("li", `check c${d.worker % COLOR_COUNT}`);
  item.append(el("span", "dot"), el("span", "", `Quick check for ${workerName(d.worker)} at step ${d.step}: `),
    el("em", "", "am I doing redundant work?"));
  addHistory(item);
}

function onCheckpoint(d) {
  const list = $("checkpoints");
  const answer = d.answer === null || d.answer === undefined ? "(none)" : String(d.answer);
  const item = el("li", "checkpoint");
  item.append(el("span", "budget", `${d.budget} tokens`), el("span", "cp-answer", answer),
    el("span", "muted", `${d.tokens} generated`));
  list.append(item);
  list.hidden = false;
  $("result").hidden = false;
}

function onFinal(d) {
  $("answer").textContent = d.answer === null || d.answer === undefined ? "(none)" : String(d.answer);
  $("result").hidden = false;
}

function onDone(d) {
  view.source.close();
  view.source = null;
  view.stopped = Date.now() / 1000;
  const reason = d.finish_reason || "?";
  const done = $("done");
  done.replaceChildren();
  done.append(el("span", `reason r-${reason}`, reason));
  const usage = d.usage || {};
  for (const [k, v] of Object.entries(usage)) {
    done.append(el("span", "usage", `${k.replace(/_tokens$/, "").replace("_", " ")} ${v}`));
  }
  if ($("answer").textContent === "") $("answer").textContent = "(none)";
  $("result").hidden = false;
  setStatus(STATUS_OF_REASON[reason] || "finished");
  $("stream-note").textContent = "";
  for (const w of view.workers) if (w) w.dirty = true;
  schedule();
  const id = view.job.id;
  // The job object has what events do not: exact status, timings, per-worker finish reasons.
  api("GET", `v1/jobs/${encodeURIComponent(id)}`).then((job) => {
    if (view.job && view.job.id === id) applyJob(job);
  }).catch(() => {});
  loadJobs();
  loadStats();
}

function applyJob(job) {
  const status = view.job && view.job.id === job.id ? laterStatus(job.status, view.job.status) : job.status;
  view.job = job;
  const timings = job.timings || {};
  if (ENDED.has(job.status) && timings.duration_s) {
    view.final = { seconds: timings.duration_s, generated: (job.workers || []).map((w) => w.generated) };
    for (const w of view.workers) if (w) w.dirty = true;
  }
  setStatus(status);
  const meta = [];
  if (job.model) meta.push(job.model);
  const opts = job.options || {};
  if (opts.layout) meta.push(opts.layout);
  if (timings.ttft_s != null) meta.push(`first token ${timings.ttft_s.toFixed(2)} s`);
  $("job-meta").textContent = meta.join(" · ");
  for (const info of job.workers || []) {
    const w = view.workers[info.index];
    if (w && info.finish_reason && ENDED.has(job.status)) {
      w.finish = info.finish_reason;
      w.dirty = true;
    }
  }
  if (job.error) showBanner($("job-error"), `Error: ${job.error}`);
  schedule();
}

function resetView(job) {
  if (view.source) view.source.close();
  view.source = null;
  view.job = job;
  view.lastSeq = -1;
  view.workers = [];
  view.historyCount = 0;
  view.stopped = null;
  view.final = null;
  $("worker-grid").replaceChildren();
  $("history").replaceChildren();
  $("history-empty").hidden = false;
  $("history-count").textContent = "";
  $("answer").textContent = "";
  $("done").replaceChildren();
  $("checkpoints").replaceChildren();
  $("checkpoints").hidden = true;
  $("result").hidden = true;
  showBanner($("job-error"), "");
  $("stream-note").textContent = "";
  $("welcome").hidden = true;
  $("job").hidden = false;
  $("job-id").textContent = job.id;
  $("job-prompt").textContent = promptOf(job).trim();
  $("job-prompt").hidden = !$("job-prompt").textContent;
  const count = Math.max((job.options && job.options.workers) || 0, (job.workers || []).length);
  const names = new Map((job.workers || []).map((w) => [w.index, w.name]));
  for (let i = 0; i < count; i++) addWorker(i, names.get(i) || `Worker ${i + 1}`);
  $("worker-grid").style.setProperty("--columns", String(Math.min(Math.max(count, 1), 4)));
  applyJob(job);
  for (const node of document.querySelectorAll("#jobs li")) {
    node.classList.toggle("current", node.dataset.id === job.id);
  }
  window.history.replaceState(null, "", `#${job.id}`);
}

const HANDLERS = {
  token: onToken, step: onStep, quick_check: onQuickCheck, checkpoint: onCheckpoint, final: onFinal, done: onDone,
};

function follow(job) {
  resetView(job);
  view.timed = !ENDED.has(job.status);
  view.opened = performance.now();
  const source = new EventSource(`v1/jobs/${encodeURIComponent(job.id)}/events`);
  view.source = source;
  const guard = (handler) => (ev) => {
    if (view.source !== source) return;
    const seq = ev.lastEventId === "" ? NaN : Number(ev.lastEventId);
    if (!Number.isNaN(seq)) {
      if (seq <= view.lastSeq) return;
      view.lastSeq = seq;
    }
    $("stream-note").textContent = "";
    if (view.job.status === "queued") setStatus("running"); // as the server's record does on any event
    handler(JSON.parse(ev.data));
  };
  for (const [name, handler] of Object.entries(HANDLERS)) source.addEventListener(name, guard(handler));
  source.addEventListener("error", (ev) => {
    if (view.source !== source) return;
    if (ev.data !== undefined) {
      // The server's own `error` event: the job failed; `done` follows.
      guard((d) => showBanner($("job-error"), `Error: ${d.message}`))(ev);
    } else if (source.readyState === EventSource.CLOSED) {
      showBanner($("job-error"), "The event stream was refused (check the API key) or the job is gone.");
      view.source = null;
    } else {
      // The browser reconnects by itself and sends Last-Event-ID: nothing is lost.
      $("stream-note").textContent = "reconnecting…";
    }
  });
}

async function openJob(id) {
  try {
    follow(await api("GET", `v1/jobs/${encodeURIComponent(id)}`));
    reveal();
  } catch (err) {
    $("welcome").hidden = true;
    $("job").hidden = false;
    showBanner($("job-error"), `Cannot open ${id}: ${err.message}`);
  }
}

/* ---------- recent jobs ---------- */

async function loadJobs() {
  let jobs;
  try {
    const body = await api("GET", "v1/jobs");
    jobs = Array.isArray(body) ? body : body.data || [];
  } catch (err) {
    $("jobs").replaceChildren();
    $("jobs-empty").textContent = `Cannot list jobs: ${err.message}`;
    $("jobs-empty").hidden = false;
    return;
  }
  const items = jobs.map((job) => {
    const current = view.job && view.job.id === job.id;
    const li = el("li", current ? "current" : "");
    li.dataset.id = job.id;
    const button = el("button", "job-item");
    button.type = "button";
    const top = el("div", "job-line");
    const status = current ? laterStatus(job.status, view.job.status) : job.status;
    top.append(el("span", `status s-${status}`, status), el("span", "muted", clock((job.timings || {}).created)));
    const answer = job.answer === null || job.answer === undefined ? "" : `→ ${job.answer}`;
    button.append(top, el("div", "job-prompt", titleOf(job)), el("div", "job-answer", answer));
    button.title = job.id;
    button.addEventListener("click", () => openJob(job.id));
    li.append(button);
    return li;
  });
  $("jobs").replaceChildren(...items);
  $("jobs-empty").textContent = "No jobs yet.";
  $("jobs-empty").hidden = items.length > 0;
}

// Asked again, less and less often, until the server names its model: a page opened while the engine
// loads would otherwise say "model unknown" for good. A missing key waits for the key to change instead.
let modelAsk = 0;
let modelTimer = 0;
async function loadModel(attempt = 0) {
  clearTimeout(modelTimer);
  const ask = ++modelAsk;
  let label;
  let known = true;
  try {
    const body = await api("GET", "v1/models");
    const first = body && body.data && body.data[0];
    label = first ? first.id : "no model";
    known = Boolean(first);
  } catch (err) {
    label = err.status === 401 ? "API key needed" : err.status === 503 ? "model loading…" : "model unknown";
    known = err.status === 401;
  }
  if (ask !== modelAsk) return; // a newer question (the key changed) answers instead
  $("model").textContent = label;
  $("model").title = label;
  if (!known) {
    modelTimer = setTimeout(() => loadModel(attempt + 1), Math.min(1000 * 2 ** attempt, MODEL_RETRY_MAX_MS));
  }
}

/* The engine's load and how much of the prompts it read from the prefix cache, refreshed while open. */
async function loadStats() {
  const pill = $("engine-stats");
  try {
    const s = await api("GET", "v1/stats");
    const parts = [`${s.running} running`, `${s.queued} queued`];
    if (s.prefix_cache) {
      parts.push(s.prefix_cache_queries
        ? `prefix cache ${(100 * s.prefix_cache_hit_rate).toFixed(0)}% hit`
        : "prefix cache empty");
    }
    pill.textContent = parts.join(" · ");
    pill.title = `prompt tokens: ${s.prefix_cache_hits} of ${s.prefix_cache_queries} read from the cache; ` +
      `KV pages: ${s.used_pages} held by jobs, ${s.evictable_pages} cached and idle, ${s.total_pages} in all`;
    pill.hidden = false;
  } catch (err) {
    pill.hidden = true;
  }
}

/* ---------- form ---------- */

function readForm() {
  const body = { prompt: $("prompt").value };
  for (const name of ["workers", "max_tokens", "quick_check_every", "seed"]) {
    const value = $(name).value.trim();
    if (value !== "") body[name] = Number.parseInt(value, 10);
  }
  const temperature = $("temperature").value.trim();
  if (temperature !== "") body.temperature = Number.parseFloat(temperature);
  body.layout = $("layout").value;
  if (body.layout === "plain") body.workers = 1;
  if ($("instructions").value) body.instructions = $("instructions").value;
  const checkpoints = $("checkpoints-input").value.trim();
  if (checkpoints) body.checkpoints = checkpoints.split(/[\s,]+/).map((x) => Number.parseInt(x, 10));
  return body;
}

async function submit(event) {
  event.preventDefault();
  const error = $("form-error");
  showBanner(error, "");
  for (const node of document.querySelectorAll(".invalid")) node.classList.remove("invalid");
  if (!$("prompt").value.trim()) {
    $("prompt").classList.add("invalid");
    showBanner(error, "Write a problem first.");
    return;
  }
  const button = $("submit");
  button.disabled = true;
  try {
    const body = readForm();
    follow(await api("POST", "v1/jobs", body));
    reveal();
    loadJobs();
  } catch (err) {
    if (err.field && $(err.field)) $(err.field).classList.add("invalid");
    showBanner(error, err.message);
  } finally {
    button.disabled = false;
  }
}

async function cancel() {
  if (!view.job) return;
  $("cancel").disabled = true;
  try {
    applyJob(await api("DELETE", `v1/jobs/${encodeURIComponent(view.job.id)}`));
  } catch (err) {
    showBanner($("job-error"), `Cancel failed: ${err.message}`);
    $("cancel").disabled = false;
  }
}

function init() {
  const keyInput = $("api-key");
  keyInput.value = apiKey();
  storeKey(keyInput.value); // the cookie may have expired while localStorage kept the key
  const applyKey = () => {
    storeKey(keyInput.value.trim());
    loadModel();
    loadJobs();
    loadStats();
  };
  keyInput.addEventListener("change", applyKey);
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    applyKey();
  });
  $("submit-form").addEventListener("submit", submit);
  $("prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) $("submit-form").requestSubmit();
  });
  $("cancel").addEventListener("click", cancel);
  $("refresh-jobs").addEventListener("click", loadJobs);
  loadModel();
  loadJobs();
  loadStats();
  setInterval(() => { if (!document.hidden) loadStats(); }, STATS_EVERY_MS);
  setInterval(() => {
    if (view.job && !ENDED.has(view.job.status) && !document.hidden) renderClock();
  }, CLOCK_EVERY_MS);
  // The address names the job on screen, so reloading, links and the back button reopen it.
  const openFromHash = () => {
    const id = decodeURIComponent(location.hash.slice(1));
    if (id && !(view.job && view.job.id === id)) openJob(id);
  };
  window.addEventListener("hashchange", openFromHash);
  openFromHash();
}

document.addEventListener("DOMContentLoaded", init);
