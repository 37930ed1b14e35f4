// Crossview matcher page: token -> cameras -> recent sightings -> query -> timeline per camera.
// Thumbnails are fetched with the bearer header and shown as blob URLs, so the token never goes into a
// URL. Everything is built with DOM nodes and textContent: camera and node names are never parsed as HTML.

const API = "/api/v1";
const TOKEN_KEY = "crossview-token";
const RECENT_LIMIT = 60;
const LIVE_EVERY_MS = 3000; // the edges' status and new alerts

const $ = (selector) => document.querySelector(selector);
const state = { token: sessionStorage.getItem(TOKEN_KEY) || "", camera: null, subject: null, liveTimer: null, lastAlert: 0,
  alerts: [], cameras: [], asked: 0 }; // asked: navigations so far, so a late answer never replaces a newer one
const thumbs = new Map(); // sighting id -> Promise of a blob URL

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// ---- HTTP ------------------------------------------------------------------------------------

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${state.token}`, ...(options.headers || {}) };
  const res = await fetch(path, { ...options, headers });
  if (!res.ok) throw new ApiError(res.status, await errorText(res));
  return res;
}

async function errorText(res) {
  try {
    const { detail } = await res.json();
    // FastAPI reports malformed requests (422) as a list of {loc, msg}.
    if (Array.isArray(detail)) return detail.map((e) => `${e.loc.slice(1).join(".")}: ${e.msg}`).join("; ");
    return detail || `${res.status} ${res.statusText}`;
  } catch {
    return `${res.status} ${res.statusText}`;
  }
}

const getJson = async (path) => (await api(path)).json();

const postJson = async (path, body) =>
  (await api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) })).json();

function loadThumb(sighting) {
  if (!thumbs.has(sighting.id)) {
    const url = api(sighting.thumbnail_url).then((r) => r.blob()).then((b) => URL.createObjectURL(b));
    url.catch(() => thumbs.delete(sighting.id)); // let a later render retry
    thumbs.set(sighting.id, url);
  }
  return thumbs.get(sighting.id);
}

// ---- DOM helpers -----------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value == null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  node.append(...children.filter((c) => c != null));
  return node;
}

function thumbnail(sighting) {
  if (!sighting.has_thumbnail) return el("div", { class: "thumb none" }, "no image");
  const img = el("img", { class: "thumb", alt: `sighting ${sighting.id}`, dataset: { id: sighting.id } });
  loadThumb(sighting).then((url) => { img.src = url; }, () => img.classList.add("broken"));
  return img;
}

const pad = (n) => String(n).padStart(2, "0");

function fmtTime(ts) {
  const d = new Date(ts * 1000);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

function fmtDateTime(ts) {
  const d = new Date(ts * 1000);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${fmtTime(ts)}`;
}

function fmtBox([x1, y1, x2, y2]) {
  return `${Math.round(x2 - x1)}×${Math.round(y2 - y1)} at ${Math.round(x1)},${Math.round(y1)}`;
}

// Colours from the model's calibration (matcher/results.py LIKELY, POSSIBLE); raw similarity gets none: it is no
// probability, and a colour would say it was.
function scoreClass(hit) {
  if (hit.probability == null) return "raw";
  return hit.probability >= 0.9 ? "high" : hit.probability >= 0.5 ? "mid" : "low";
}

const scoreText = (hit) => (hit.probability == null ? `sim ${hit.score.toFixed(2)}` : `P ${hit.probability.toFixed(2)}`);

function legend(result) {
  if (!result.calibrated) {
    return el("p", { class: "legend muted" }, "Scores are cosine similarity: this model has no calibration, so they are not ",
      "probabilities (crossview calibrate adds one).");
  }
  return el("p", { class: "legend" }, "P(same person), from the model's calibration: ",
    el("span", { class: "score high" }, "≥ 0.9 likely same person"), " ", el("span", { class: "score mid" }, "≥ 0.5 possible"),
    " ", el("span", { class: "score low" }, "below: unlikely"),
    ". Tracks one camera saw at the same time are different people: they share one person's odds.");
}

function showError(message) {
  $("#error").textContent = message;
  $("#error").hidden = !message;
  if (message) $("#error").scrollIntoView({ block: "nearest" });
}

function showView(name) {
  $("#picker").hidden = name !== "picker";
  $("#results").hidden = name !== "results";
}

// Runs an async UI action; a 401 sends the user back to the token form, anything else is shown.
async function guarded(action) {
  showError("");
  document.body.classList.add("busy");
  try {
    await action();
  } catch (e) {
    if (e.status === 401) logout("The token was not accepted.");
    else showError(e.message);
  } finally {
    document.body.classList.remove("busy");
  }
}

// ---- login -----------------------------------------------------------------------------------

function showLogin(message = "") {
  $("#login").hidden = false;
  $("#app").hidden = true;
  $("#logout").hidden = true;
  $("#login-error").textContent = message;
  $("#token").focus();
}

function logout(message = "") {
  clearInterval(state.liveTimer);
  state.token = "";
  sessionStorage.removeItem(TOKEN_KEY);
  thumbs.forEach((url) => url.then(URL.revokeObjectURL, () => {}));
  thumbs.clear();
  showLogin(message);
}

async function connect(token) {
  state.token = token;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("#login").hidden = true;
  $("#app").hidden = false;
  $("#logout").hidden = false;
  await guarded(async () => {
    await Promise.all([loadCameras(), loadModels(), loadEdges(), loadWatchlist(), loadAlerts()]);
    await showRecent(null);
  });
  clearInterval(state.liveTimer);
  state.liveTimer = setInterval(refreshLive, LIVE_EVERY_MS);
}

// ---- edge status -----------------------------------------------------------------------------

function fmtAgo(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 120) return `${s}s`;
  if (s < 7200) return `${Math.floor(s / 60)}m${pad(s % 60)}s`;
  return `${Math.floor(s / 3600)}h${pad(Math.floor(s / 60) % 60)}m`;
}

const since = (ts, now) => `since ${fmtTime(ts)} (${fmtAgo(now - ts)})`;
const stateBadge = (s) => el("span", { class: `state ${s}` }, s);

function cameraDetail(c) {
  if (c.state !== "online") return c.source_state + (c.error ? `: ${c.error}` : "");
  const rate = c.target_fps ? `${c.fps.toFixed(1)} of ${c.target_fps} fps` : `${c.fps.toFixed(1)} fps`;
  let text = c.behind ? `falling behind: ${rate}` : rate;
  if (c.position) text += `, frame ${c.position[0]} of ${c.position[1]}`;
  return text;
}

function edgeItem(e, now) {
  const spool = `spool ${e.spool.sightings} (oldest ${fmtAgo(e.spool.oldest_s)}), ${e.spool.dropped} dropped`;
  return el("li", { class: "edge", dataset: { node: e.node, state: e.state } },
    el("strong", {}, e.node), stateBadge(e.state), el("span", { class: "muted" }, since(e.since, now)),
    el("span", { class: "detail muted" }, `last heartbeat ${fmtAgo(now - e.last_seen)} ago · model ${e.model} · ${spool}`),
    el("ul", { class: "edge-cameras" }, ...e.cameras.map((c) =>
      el("li", { dataset: { camera: c.id, state: c.state } },
        el("strong", {}, c.id), stateBadge(c.state), el("span", { class: "muted" }, since(c.since, now)),
        el("span", { class: `detail${c.behind ? " behind" : " muted"}` }, cameraDetail(c))))));
}

async function loadEdges() {
  const { now, edges, summary } = await getJson(`${API}/edges`);
  const count = (what) => Object.entries(summary[what]).filter(([, n]) => n).map(([s, n]) => `${n} ${s}`).join(", ");
  $("#status-summary").textContent = edges.length
    ? `Edges: ${count("edges")} · cameras: ${count("cameras") || "none"}`
    : "No edge has sent a heartbeat yet.";
  $("#edges").replaceChildren(...edges.map((e) => edgeItem(e, now)));
}

// Polled: a failure shows on the panel, not as the page's error banner, and the next poll retries.
async function refreshLive() {
  try {
    await Promise.all([loadEdges(), loadAlerts(), loadStats()]);
  } catch (e) {
    if (e.status === 401) logout("The token was not accepted.");
    else $("#status-summary").textContent = `Status unavailable: ${e.message}`;
  }
}

// ---- watchlist and alerts --------------------------------------------------------------------

async function loadWatchlist() {
  const entries = await getJson(`${API}/watchlist`);
  $("#watchlist").replaceChildren(...(entries.length ? entries.map(watchItem) : [el("li", { class: "muted" }, "Nobody yet: open a sighting and watch for that person.")]));
}

function watchItem(e) {
  const threshold = e.calibrated ? `P ≥ ${e.min_probability}` : `similarity ≥ ${e.min_similarity} (uncalibrated)`;
  return el("li", { dataset: { entry: e.id } },
    el("button", { type: "button", class: "link", title: "take off the watchlist",
      onclick: () => guarded(async () => { await api(`${API}/watchlist/${e.id}`, { method: "DELETE" }); await loadWatchlist(); }) }, "remove"),
    el("strong", {}, e.name),
    el("span", { class: "detail muted" }, `${threshold} · ${e.cameras ? e.cameras.join(", ") : "all cameras"} · model ${e.model}`));
}

async function loadAlerts() {
  const fresh = await getJson(`${API}/alerts?after=${state.lastAlert}&limit=100`);
  if (!fresh.length) return;
  state.lastAlert = fresh[fresh.length - 1].id;
  state.alerts = [...fresh.reverse(), ...state.alerts].slice(0, 50); // newest first
  $("#alerts").replaceChildren(...state.alerts.map((a) => alertItem(a, fresh.includes(a))));
}

function alertItem(a, isNew) {
  const score = a.probability != null ? `P ${a.probability.toFixed(2)}` : `similarity ${a.similarity.toFixed(2)} (uncalibrated)`;
  return el("li", { class: isNew ? "fresh" : null, dataset: { alert: a.id, sighting: a.sighting } },
    el("strong", {}, a.name), ` on ${a.camera} at ${fmtTime(a.ts)}`,
    el("span", { class: "detail muted" }, `${score} · ${a.node} · track ${a.track}`),
    el("button", { type: "button", class: "link", onclick: () => guarded(async () => {
      search({ sighting: await getJson(`${API}/sightings/${a.sighting}`) });
    }) }, "where else?"));
}

function showWatchForm(subject, result) {
  const form = $("#watch-form");
  form.hidden = !subject.sighting;
  if (form.hidden) return;
  // Thresholds on raw cosine when the model has no calibration; the matcher says which when the entry is made.
  $("#watch-threshold").value = $("#watch-threshold").value || 0.8;
  $("#watch-note").textContent = `cosine similarity (model ${result.model})`;
}

async function watchSubject() {
  const s = state.subject.sighting;
  const entry = await postJson(`${API}/watchlist`, { name: $("#watch-name").value.trim(), sighting_id: s.id,
    min_similarity: Number($("#watch-threshold").value) });
  $("#watch-note").textContent = `${entry.name} is on the watchlist (${entry.calibrated ? `P ≥ ${entry.min_probability.toFixed(2)}` : "raw similarity"}).`;
  await loadWatchlist();
}

// ---- cameras, models, recent sightings -------------------------------------------------------

async function loadCameras() {
  const cameras = await getJson(`${API}/cameras`);
  state.cameras = cameras.map((c) => c.camera);
  const total = cameras.reduce((n, c) => n + c.sightings, 0);
  $("#summary").textContent = `${cameras.length} camera${cameras.length === 1 ? "" : "s"}, ${total} sightings`;
  $("#cameras").replaceChildren(
    cameraItem(null, "All cameras", `${total} sightings`),
    ...cameras.map((c) => cameraItem(c.camera, c.camera,
      `${c.node} · ${c.tracks} tracks · last ${fmtTime(c.last_ts)}`)),
  );
  $("#filter-cameras").replaceChildren(...cameras.map((c) =>
    el("label", {}, el("input", { type: "checkbox", value: c.camera, checked: true }), c.camera)));
}

function cameraItem(camera, title, detail) {
  const button = el("button", { type: "button", class: "camera", dataset: { camera: camera ?? "" },
    onclick: () => guarded(() => showRecent(camera)) }, el("strong", {}, title), el("span", { class: "muted" }, detail));
  return el("li", {}, button);
}

// Model versions with stored sightings; an image query also needs the matcher to have that ONNX file.
async function loadModels() {
  const { partitions, migration } = await getJson(`${API}/stats`);
  $("#model").replaceChildren(...Object.keys(partitions).map((m) => el("option", { value: m }, m)));
  showMigration(migration);
}

async function loadStats() {
  showMigration((await getJson(`${API}/stats`)).migration);
}

// The gallery's re-embedding by a new production version (matcher.migration): shown while it runs.
function showMigration(m) {
  const note = $("#migration");
  note.hidden = !m || m.state !== "migrating";
  if (note.hidden) return;
  const pct = m.total ? Math.floor((100 * m.migrated) / m.total) : 100;
  note.textContent = `Re-embedding the gallery by ${m.model}: ${m.migrated} of ${m.total} sightings (${pct}%), `
    + `${m.per_second.toFixed(1)}/s` + (m.without_thumbnail ? ` · ${m.without_thumbnail} without a thumbnail cannot be` : "");
}

// A search during a migration covers the history only as far back as it got.
function coverageNote(result) {
  const c = result.coverage;
  if (!c) return "";
  const back = c.oldest_ts_covered == null ? "" : `, back to ${fmtDateTime(c.oldest_ts_covered)}`;
  return el("p", { class: "coverage" }, `${c.model} became production: ${c.migrated} of ${c.total} earlier sightings `
    + `re-embedded so far${back}. A search by ${c.model} does not cover the rest yet.`);
}

async function showRecent(camera) {
  state.camera = camera;
  const asked = ++state.asked;
  document.querySelectorAll(".camera").forEach((b) => b.classList.toggle("active", b.dataset.camera === (camera ?? "")));
  const params = new URLSearchParams({ limit: RECENT_LIMIT });
  if (camera) params.set("camera", camera);
  const sightings = await getJson(`${API}/sightings?${params}`);
  if (asked !== state.asked) return; // a later click asked for something else: its answer wins
  $("#picker-title").textContent = camera ? `Recent sightings on ${camera}` : "Recent sightings, all cameras";
  $("#grid").replaceChildren(...(sightings.length ? sightings.map(pickButton) : [el("p", { class: "muted" }, "No sightings yet.")]));
  showView("picker");
}

function pickButton(s) {
  return el("button", {
    type: "button", class: "pick", dataset: { id: s.id },
    title: `#${s.id} · ${s.camera} · ${fmtDateTime(s.ts)} · track ${s.track}`,
    onclick: () => search({ sighting: s }),
  }, thumbnail(s), el("span", { class: "caption" }, `${fmtTime(s.ts)} · ${s.camera}`));
}

// ---- queries ---------------------------------------------------------------------------------

function readFilters() {
  const time = (id) => ($(id).value ? new Date($(id).value).getTime() / 1000 : null);
  const boxes = [...document.querySelectorAll("#filter-cameras input")];
  const checked = boxes.filter((b) => b.checked).map((b) => b.value);
  return {
    since: time("#since"),
    until: time("#until"),
    cameras: checked.length === boxes.length ? null : checked, // all ticked: no camera filter
    min_score: Number($("#min-score").value || 0),
    top_k: Number($("#top-k").value || 10),
  };
}

async function runQuery(subject, filters) {
  if (subject.sighting) return postJson(`${API}/query`, { sighting_id: subject.sighting.id, ...filters });
  const form = new FormData();
  form.append("image", subject.file);
  form.append("model", subject.model);
  for (const [key, value] of Object.entries(filters)) {
    if (value == null) continue;
    for (const v of [].concat(value)) form.append(key, v);
  }
  return (await api(`${API}/query/image`, { method: "POST", body: form })).json();
}

function search(subject) {
  state.subject = subject;
  const asked = ++state.asked;
  return guarded(async () => {
    const filters = readFilters();
    if (filters.cameras && !filters.cameras.length) throw new Error("Tick at least one camera in the filters.");
    const result = await runQuery(subject, filters);
    if (asked === state.asked) renderResults(subject, result);
  });
}

// ---- results ---------------------------------------------------------------------------------

function renderResults(subject, result) {
  const rows = Object.entries(result.cameras)
    .filter(([, hits]) => hits.length)
    .map(([camera, hits]) => ({ camera, hits: [...hits].sort((a, b) => a.first_ts - b.first_ts) }))
    .sort((a, b) => a.hits[0].first_ts - b.hits[0].first_ts); // read top-down in the order the person went
  const tracks = rows.reduce((n, r) => n + r.hits.length, 0);
  $("#query").replaceChildren(querySummary(subject, result, `${tracks} track${tracks === 1 ? "" : "s"} on ${rows.length} camera${rows.length === 1 ? "" : "s"}`),
    legend(result), coverageNote(result));
  const searched = result.query.filters.cameras || state.cameras;
  const unmatched = searched.filter((c) => !rows.some((r) => r.camera === c));
  $("#timeline").replaceChildren(...(rows.length ? rows.map(timelineRow) : [el("p", { class: "muted" }, "No matches with these filters.")]),
    ...unmatched.map((camera) => el("p", { class: "nomatch muted", dataset: { camera } }, `${camera}: no match`)));
  showWatchForm(subject, result);
  showView("results");
}

function querySummary(subject, result, found) {
  const foundLine = el("p", {}, found, el("span", { class: "muted" }, " · framed: each track's best match"));
  if (subject.sighting) {
    const s = subject.sighting;
    return el("div", { class: "subject" }, thumbnail(s), el("div", {},
      el("h2", {}, `Sighting #${s.id} on ${s.camera}`),
      el("p", { class: "muted" }, `${fmtDateTime(s.ts)} · ${s.node} · track ${s.track} · model ${result.model}`),
      foundLine));
  }
  subject.preview ??= URL.createObjectURL(subject.file);
  const preview = el("img", { class: "thumb", alt: "uploaded crop", src: subject.preview });
  return el("div", { class: "subject" }, preview, el("div", {},
    el("h2", {}, `Uploaded crop ${subject.file.name}`),
    el("p", { class: "muted" }, `model ${result.model}`),
    foundLine));
}

function timelineRow({ camera, hits }) {
  const best = hits.reduce((a, b) => (b.score > a.score ? b : a));
  return el("section", { class: "row", dataset: { camera } },
    el("header", { class: "row-label" },
      el("strong", {}, camera),
      el("span", { class: "muted" }, `${hits.length} track${hits.length === 1 ? "" : "s"}`),
      el("span", { class: `score ${scoreClass(best)}` }, `best ${scoreText(best)}`)),
    el("div", { class: "strip" }, ...hits.map(hitGroup)));
}

function hitGroup(hit) {
  const sightings = [...hit.sightings].sort((a, b) => a.ts - b.ts);
  const title = hit.probability == null ? "cosine similarity to the query (uncalibrated model)"
    : `${hit.verdict}: P(same person) ${hit.probability.toFixed(3)}, cosine similarity ${hit.score.toFixed(3)}`;
  return el("article", { class: `hit ${scoreClass(hit)}`, dataset: { track: hit.track } },
    el("header", {},
      el("span", { class: `score ${scoreClass(hit)}`, title }, scoreText(hit)),
      el("span", { class: "muted" }, hit.first_ts === hit.last_ts ? fmtTime(hit.first_ts) : `${fmtTime(hit.first_ts)}–${fmtTime(hit.last_ts)}`)),
    el("div", { class: "frames" }, ...sightings.map((s) => frame(s, s.id === hit.best.id))),
    el("footer", { class: "muted" }, `${hit.node} · track ${hit.track} · best box ${fmtBox(hit.best.box)}`));
}

function frame(s, best) {
  // Clicking a result follows the person: it becomes the next query.
  return el("button", { type: "button", class: `frame${best ? " best" : ""}`, dataset: { id: s.id },
    title: `#${s.id} · ${fmtDateTime(s.ts)} · box ${fmtBox(s.box)}${best ? " · best match" : ""}`,
    onclick: () => search({ sighting: s }) },
  thumbnail(s), el("span", { class: "caption" }, fmtTime(s.ts)));
}

// ---- wiring ----------------------------------------------------------------------------------

$("#login-form").addEventListener("submit", (e) => {
  e.preventDefault();
  connect($("#token").value.trim());
});
$("#logout").addEventListener("click", () => logout());
$("#back").addEventListener("click", () => guarded(() => showRecent(state.camera)));
$("#filters").addEventListener("submit", (e) => {
  e.preventDefault();
  if (state.subject && !$("#results").hidden) search(state.subject);
});
$("#watch-form").addEventListener("submit", (e) => {
  e.preventDefault();
  guarded(watchSubject);
});
$("#upload-form").addEventListener("submit", (e) => {
  e.preventDefault();
  search({ file: $("#crop").files[0], model: $("#model").value });
});

if (state.token) connect(state.token);
else showLogin();
