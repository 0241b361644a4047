// InstantID playground: a thin client of the HTTP API (docs/api.md), nothing the API does not offer.
// No framework, no build step. The API key lives in memory (and in sessionStorage only when the user
// presses "Use"); it goes out only as an Authorization header, never in a URL, never to the console.
"use strict";

const BASE = new URL(".", location.href); // the app's route prefix: the page is served at <prefix>/
const KEY_STORE = "instantid.apiKey";
const RESULTS_STORE = "instantid.results";
const MAX_RESULTS = 12;
const $ = (id) => document.getElementById(id);

const state = {
  key: sessionStorage.getItem(KEY_STORE) || "",
  faces: [],      // {dataUrl, width, height, face, error}
  pose: null,     // same shape
  init: null,     // img2img: the picture to restyle {dataUrl, width, height}
  identity: null, // GET /v1/identities/{id}
  models: null,   // GET /v1/models
  schema: {},     // GenerateRequest properties from /openapi.json: the deployment's bounds and defaults
  maxFaces: 4,
  results: loadResults(),
  running: null,  // {cancel()}
  jobId: null,    // the job the page is following (for tests and the curious)
};

// Request options: {id, add(body)}, each reading its own control in #more-options; the server's defaults
// stand wherever the control leaves the field out.
const OPTIONS = [
  {id: "enhance_face_region", add: (body) => { body.enhance_face_region = $("enhance_face_region").checked; }},
  {id: "prompt_weighting", add: (body) => { body.prompt_weighting = $("prompt_weighting").value; }},
  {id: "init_image", add: (body) => {
    if (state.init) Object.assign(body, {init_image: state.init.dataUrl, strength: Number($("strength").value)});
  }},
  {id: "return_pose_image", add: (body) => { if ($("return_pose_image").checked) body.return_pose_image = true; }},
];

// -- API ----------------------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, error) {
    super(error.message);
    this.status = status;
    this.code = error.code;
    this.field = error.field || null;
    this.details = error.details || [];
  }
}

async function api(path, {method = "GET", body, signal} = {}) {
  const headers = {};
  if (state.key) headers.Authorization = "Bearer " + state.key;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let resp;
  try {
    resp = await fetch(new URL(path, BASE), {method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body)});
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, {code: "network", message: "The server cannot be reached."});
  }
  if (resp.status === 204) return null;
  const text = await resp.text();
  let data = null;
  try { data = JSON.parse(text); } catch (_) { /* not JSON: Serve's own overload answer */ }
  if (resp.ok && data !== null) return data;
  const error = data && data.error ? data.error
    : {code: resp.status === 503 ? "unavailable" : "http_" + resp.status,
       message: resp.status === 503 ? "The service is busy; try again in a moment." : `HTTP ${resp.status}`};
  throw new ApiError(resp.status, error);
}

// Runs one generation as a job (POST /v1/jobs, docs/jobs.md): step progress from the job's event stream,
// Cancel through the signal (POST .../cancel: the server drops the job's rows at the next denoising step),
// and the job's result, which is /v1/generate's response. The stream is read with fetch, since EventSource
// cannot send the Authorization header.
const JOB_ENDS = ["succeeded", "failed", "canceled"];

function jobPath(id, tail = "") { return `v1/jobs/${encodeURIComponent(id)}${tail}`; }

// The job's events ({event, data}) as they come; returns when the stream ends.
async function* jobEvents(id, signal) {
  const headers = {Accept: "text/event-stream"};
  if (state.key) headers.Authorization = "Bearer " + state.key;
  const resp = await fetch(new URL(jobPath(id, "/events"), BASE), {headers, signal});
  if (!resp.ok) {
    let error = {code: "http_" + resp.status, message: `HTTP ${resp.status}`};
    try { error = (await resp.json()).error || error; } catch (_) { /* not JSON */ }
    throw new ApiError(resp.status, error);
  }
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = {event: "message", data: ""};
      for (const line of block.split("\n")) {
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") event.event = text;
        else if (field === "data") event.data += (event.data ? "\n" : "") + text;
      }
      yield {event: event.event, data: event.data ? JSON.parse(event.data) : null};
    }
  }
}

function jobOutcome(job) {
  if (job.status === "succeeded") return job.result;
  if (job.status === "canceled") throw new DOMException("Cancelled", "AbortError");
  throw new ApiError(0, job.error || {message: "The job failed."});
}

const runners = {
  async generate(body, {signal, onProgress}) {  // one response: progress is indeterminate
    onProgress(null, "Generating…");
    return api("v1/generate", {method: "POST", body, signal});
  },
  async job(body, {signal, onProgress}) {
    onProgress(null, "Queued…");
    let job;
    try {
      job = await api("v1/jobs", {method: "POST", body, signal});
    } catch (err) {
      // a result too large to keep as a job (jobs.max_result_bytes, no output bucket): one direct call instead
      if (err.code === "result_too_large") return runners.generate(body, {signal, onProgress});
      throw err;
    }
    state.jobId = job.id;
    try {
      for (;;) {  // a stream cut short (a proxy's idle timeout, a replica restart) is opened again
        for await (const {event, data} of jobEvents(job.id, signal)) {
          if (event === "error") throw new ApiError(0, (data && data.error) || {message: "The job is gone."});
          if (event === "done") return jobOutcome(data);
          const p = data.progress;
          if (data.status === "running" && p && p.total) onProgress(p.step / p.total, `Step ${p.step} of ${p.total}`);
          else onProgress(null, data.status === "running" ? "Starting…" : "Queued…");
        }
        const now = await api(jobPath(job.id), {signal});
        if (JOB_ENDS.includes(now.status)) return jobOutcome(now);
      }
    } catch (err) {
      // Cancel: the job is cancelled on the server too (never just forgotten there), then the page says so
      if (err.name === "AbortError") await api(jobPath(job.id, "/cancel"), {method: "POST"}).catch(() => null);
      throw err;
    } finally {
      state.jobId = null;
    }
  },
};
const runner = runners.job;

// -- errors beside their fields -----------------------------------------------------------------------
const FRIENDLY = {
  no_face: "No face found in this photo.",
  invalid_image: "Not a readable JPEG, PNG or WebP image.",
  image_too_large: "This image is too large for the server.",
  unauthorized: "This server needs a valid API key.",
  rate_limited: "Too many requests for this key; wait a moment.",
};

// What the user reads: a plain sentence for errors about a photo as a whole, else the API's message.
function messageFor(err, item = err, where = null) {
  return ((where || err.code === "no_face") && FRIENDLY[err.code]) || item.message;
}

function slotFor(field, where) {
  if (where) return where;
  if (!field) return "request";
  const photo = /^face_images\[(\d+)\]/.exec(field);
  if (photo) return $("err-face-" + photo[1]) ? "face-" + photo[1] : "face_images";
  if (field === "pose_image" && $("err-pose")) return "pose";
  if (field === "init_image" && $("err-init")) return "init";
  if (field.startsWith("face_images")) return "face_images";
  if (field.startsWith("loras")) return "loras";
  if ((field === "width" || field === "height") && $("size").value !== "custom") return "size";
  return $("err-" + field) ? field : "request";
}

function showError(err, where) {
  if (err.name === "AbortError") return;
  if (!(err instanceof ApiError)) err = new ApiError(0, {code: "client", message: String(err.message || err)});
  if (err.code === "unauthorized") where = "api_key";
  const items = err.details.length && !where ? err.details : [{field: err.field, message: err.message}];
  for (const item of items) {
    const slot = $("err-" + slotFor(item.field, where));
    const text = messageFor(err, item, where);
    slot.textContent = slot.textContent ? slot.textContent + " " + text : text;
    const input = document.querySelector(`[aria-describedby~="${slot.id}"]`);
    if (input) input.setAttribute("aria-invalid", "true");
  }
  const first = $("err-" + slotFor(items[0].field, where));
  const target = document.querySelector(`[aria-describedby~="${first.id}"]`) || first;
  if (target.focus && where !== "api_key") target.focus({preventScroll: false});
  if (err.code === "unauthorized") $("api-key").focus();
}

function clearErrors(scope = document) {
  scope.querySelectorAll(".error").forEach((p) => { p.textContent = ""; });
  scope.querySelectorAll("[aria-invalid]").forEach((el) => el.removeAttribute("aria-invalid"));
}

// -- photos and their faces ---------------------------------------------------------------------------
function readPhoto(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onerror = () => reject(new Error("cannot read " + file.name));
    reader.onload = () => {
      const img = new Image();
      img.onload = () => resolve({name: file.name, dataUrl: reader.result, width: img.naturalWidth, height: img.naturalHeight});
      img.onerror = () => resolve({name: file.name, dataUrl: reader.result, width: 0, height: 0});
      img.src = reader.result;
    };
    reader.readAsDataURL(file);
  });
}

async function analyze(photo) {
  try {
    const result = await api("v1/faces:analyze", {method: "POST", body: {face_images: [photo.dataUrl]}});
    photo.face = result.faces[0];
    photo.error = null;
  } catch (err) {
    photo.face = null;
    photo.error = err;
  }
}

const SVG = "http://www.w3.org/2000/svg";
function svgEl(name, attrs) {
  const el = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
}

// A photo with its detected face box and five keypoints drawn over it (coordinates in the photo's pixels).
function photoCard(photo, label, errId, onRemove) {
  const li = document.createElement("li");
  li.className = "photo";
  const frame = document.createElement("div");
  frame.className = "frame";
  const img = document.createElement("img");
  img.src = photo.dataUrl;
  img.alt = label;
  frame.append(img);
  if (photo.face) {
    const [w, h] = photo.face.image_size;
    const svg = svgEl("svg", {viewBox: `0 0 ${w} ${h}`, class: "overlay", "aria-hidden": "true", preserveAspectRatio: "none"});
    const [x1, y1, x2, y2] = photo.face.bbox;
    const stroke = Math.max(2, w / 200);
    svg.append(svgEl("rect", {x: x1, y: y1, width: x2 - x1, height: y2 - y1, class: "box", "stroke-width": stroke}));
    photo.face.kps.forEach(([x, y], i) => svg.append(svgEl("circle", {cx: x, cy: y, r: stroke * 1.6, class: "kp kp" + i})));
    frame.append(svg);
  }
  li.append(frame);
  const caption = document.createElement("p");
  caption.className = "caption";
  caption.textContent = photo.face ? `face ${(photo.face.score * 100).toFixed(0)}%` : photo.error ? "" : photo.note || "analysing…";
  li.append(caption);
  const err = document.createElement("p");
  err.className = "error";
  err.id = "err-" + errId;
  err.setAttribute("role", "alert");
  li.append(err);
  const remove = document.createElement("button");
  remove.type = "button";
  remove.textContent = "Remove";
  remove.setAttribute("aria-label", "Remove " + label);
  remove.setAttribute("aria-describedby", err.id);
  remove.addEventListener("click", onRemove);
  li.append(remove);
  if (photo.error) {  // the card is not in the page yet: write its error slot directly
    err.textContent = messageFor(photo.error, photo.error, errId);
    li.classList.add("invalid");
  }
  return li;
}

function renderPhotos() {
  const list = $("face-list");
  $("save-identity").hidden = !state.faces.length;
  list.replaceChildren(...state.faces.map((photo, i) => photoCard(photo, `Face photo ${i + 1}`, "face-" + i, () => {
    state.faces.splice(i, 1);
    renderPhotos();
    updateSize();
  })));
  $("pose-list").replaceChildren(...(state.pose ? [photoCard(state.pose, "Pose photo", "pose", () => {
    state.pose = null;
    $("pose-input").value = "";
    renderPhotos();
    updateSize();
  })] : []));
  $("init-list").replaceChildren(...(state.init ? [photoCard(state.init, "Picture to restyle", "init", () => {
    state.init = null;
    $("init-input").value = "";
    renderPhotos();
  })] : []));
}

async function addFaces(files) {
  $("err-face_images").textContent = "";
  const room = state.maxFaces - state.faces.length;
  const picked = [...files].slice(0, Math.max(0, room));
  if (files.length > room) showError(new ApiError(0, {message: `At most ${state.maxFaces} face photos.`}), "face_images");
  const photos = await Promise.all(picked.map(readPhoto));
  state.faces.push(...photos);
  renderPhotos();
  updateSize();
  await Promise.all(photos.map(analyze));
  renderPhotos();
}

async function setPose(file) {
  if (!file) return;
  state.pose = await readPhoto(file);
  renderPhotos();
  updateSize();
  await analyze(state.pose);
  renderPhotos();
}

// img2img: not analysed (any picture will do); the server checks it and resizes it to the output size.
async function setInit(file) {
  if (!file) return;
  state.init = {...await readPhoto(file), note: "restyled at the output size"};
  renderPhotos();
}

// -- identities -----------------------------------------------------------------------------------------
async function loadIdentities(select) {
  const list = await api("v1/identities?limit=100");
  const sel = $("identity");
  sel.replaceChildren(new Option("— choose —", ""),
    ...list.identities.map((it) => new Option(`${it.identity_id.slice(0, 11)}… ${it.created_at || ""}`, it.identity_id)));
  if (select) sel.value = select;
  await showIdentity();
}

// POST /v1/identities with the photos picked, then generate from it: the photos need not be sent again.
async function saveIdentity() {
  clearErrors($("photos-panel"));
  try {
    const created = await api("v1/identities", {method: "POST", body: {face_images: state.faces.map((p) => p.dataUrl)}});
    document.querySelector('input[name="source"][value="identity"]').click();
    await loadIdentities(created.identity_id);
    $("status").textContent = `Saved as ${created.identity_id}.`;
  } catch (err) {
    showError(err, err.field && /^face_images\[\d+\]/.test(err.field) ? null : "face_images");
  }
}

async function showIdentity() {
  const id = $("identity").value;
  state.identity = null;
  $("identity-face").replaceChildren();
  if (!id) return;
  try {
    state.identity = await api("v1/identities/" + encodeURIComponent(id));
    const thumb = state.identity.thumbnail ? "data:image/jpeg;base64," + state.identity.thumbnail : "";
    const li = document.createElement("li");
    li.className = "photo";
    li.innerHTML = '<div class="frame"><img alt="Identity thumbnail"></div><p class="caption"></p>';
    li.querySelector("img").src = thumb;
    li.querySelector(".caption").textContent = `${state.identity.num_photos} photo(s)`;
    $("identity-face").append(li);
  } catch (err) {
    showError(err, "identity_id");
  }
  updateSize();
}

// -- the form -------------------------------------------------------------------------------------------
function prop(name) {
  const p = state.schema[name] || {};
  const variant = (p.anyOf || []).find((v) => v.type && v.type !== "null") || {};
  return {...variant, ...p};
}

function applySchema(schema) {
  state.schema = schema;
  const setRange = (id, name) => {
    const p = prop(name), el = $(id);
    if (p.minimum !== undefined) el.min = p.minimum;
    if (p.maximum !== undefined) el.max = p.maximum;
    if (p.default !== undefined && p.default !== null) el.value = p.default;
  };
  ["ip_adapter_scale", "controlnet_conditioning_scale", "guidance_scale", "steps", "num_images", "strength"].forEach((n) => setRange(n, n));
  ["width", "height"].forEach((n) => setRange(n, n));
  if (prop("seed").maximum !== undefined) $("seed").max = prop("seed").maximum;
  state.maxFaces = prop("face_images").maxItems || 4;
  document.querySelectorAll(".max-faces").forEach((el) => { el.textContent = state.maxFaces; });
  const maxSide = prop("width").maximum || 2048;
  for (const opt of $("size").options) {
    const m = /^(\d+)x(\d+)$/.exec(opt.value);
    opt.disabled = Boolean(m && Math.max(+m[1], +m[2]) > maxSide);
  }
  if (prop("prompt").maxLength) { $("prompt").maxLength = prop("prompt").maxLength; $("negative_prompt").maxLength = prop("prompt").maxLength; }
  document.querySelectorAll(".slider input").forEach(showValue);
}

function showValue(input) {
  input.parentElement.querySelector("output").textContent = input.value;
}

// [value, label] of the style chips: "none" sends no style (the prompts as typed); the demo's "(No style)" preset
// would be a second "no style" (it differs only in sending an empty negative prompt), so it is left out here
function styleChoices(styles) {
  return [["", "none"], ...styles.filter((s) => s !== "(No style)").map((s) => [s, s])];
}

function applyModels(models) {
  state.models = models;
  $("tiny-notice").hidden = models.profile !== "tiny";
  const chips = styleChoices(models.styles).map(([value, text]) => {
    const label = document.createElement("label");
    label.className = "chip";
    const radio = document.createElement("input");
    radio.type = "radio";
    radio.name = "style";
    radio.value = value;
    radio.checked = value === "";
    label.append(radio, " " + text);
    return label;
  });
  $("styles").replaceChildren(...chips);
  $("base_model").replaceChildren(...models.models.map((m) => new Option(m.name + (m.default ? " (default)" : ""), m.name, m.default, m.default)));
  $("scheduler").replaceChildren(...models.schedulers.map((s) => new Option(s, s)));
  $("output_format").replaceChildren(...models.output_formats.map((f) => new Option(f, f)));
  renderLoras();
}

function renderLoras() {
  const model = (state.models.models.find((m) => m.name === $("base_model").value) || {loras: []});
  $("loras").replaceChildren(...model.loras.map((name, i) => {
    const div = document.createElement("div");
    div.className = "lora";
    div.innerHTML = '<label><input type="checkbox"> <span></span></label><label class="sr"></label><input type="range" min="-2" max="2" step="0.05" value="0.8"><output></output>';
    const [check, range] = div.querySelectorAll("input");
    check.dataset.lora = name;
    check.id = "lora-" + i;
    range.id = "lora-scale-" + i;
    div.querySelector("span").textContent = "LoRA " + name;
    const scaleLabel = div.querySelector("label.sr");
    scaleLabel.htmlFor = range.id;
    scaleLabel.textContent = `LoRA ${name} scale`;
    range.addEventListener("input", () => { div.querySelector("output").textContent = range.value; });
    div.querySelector("output").textContent = range.value;
    return div;
  }));
}

// [width, height], or null for "as photo": the server then sizes the output from the pose photo (the picture
// to restyle with img2img), as the official demo does (docs/api.md), so the page need not know how.
function chosenSize() {
  const v = $("size").value;
  if (v === "custom") return [Number($("width").value), Number($("height").value)];
  if (v === "photo") return null;
  return v.split("x").map(Number);
}

function updateSize() {
  $("custom-size").hidden = $("size").value !== "custom";
}

function buildRequest() {
  const body = {
    prompt: $("prompt").value,
    steps: Number($("steps").value),
    guidance_scale: Number($("guidance_scale").value),
    ip_adapter_scale: Number($("ip_adapter_scale").value),
    controlnet_conditioning_scale: Number($("controlnet_conditioning_scale").value),
    num_images: Number($("num_images").value),
    scheduler: $("scheduler").value || "default",
    output_format: $("output_format").value || "png",
  };
  const size = chosenSize();
  if (size) [body.width, body.height] = size;
  if ($("negative_prompt").value) body.negative_prompt = $("negative_prompt").value;
  const style = document.querySelector('input[name="style"]:checked');
  if (style && style.value) body.style = style.value;
  if ($("base_model").value) body.base_model = $("base_model").value;
  body.loras = {};
  document.querySelectorAll("#loras .lora").forEach((div) => {
    const [check, range] = div.querySelectorAll("input");
    if (check.checked) body.loras[check.dataset.lora] = Number(range.value);
  });
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if (source() === "identity") body.identity_id = $("identity").value || undefined;
  else body.face_images = state.faces.map((p) => p.dataUrl);
  if (state.pose) body.pose_image = state.pose.dataUrl;
  OPTIONS.forEach((option) => option.add(body));
  return body;
}

function source() {
  return document.querySelector('input[name="source"]:checked').value;
}

async function onGenerate(event) {
  event.preventDefault();
  if (state.running) return;
  clearErrors($("gen-form"));
  if (source() === "photos" && !state.faces.length) {
    return showError(new ApiError(0, {message: "Add at least one face photo."}), "face_images");
  }
  if (source() === "identity" && !$("identity").value) {
    return showError(new ApiError(0, {message: "Choose a stored identity."}), "identity_id");
  }
  const body = buildRequest();
  const reference = source() === "identity"
    ? (state.identity && state.identity.thumbnail ? "data:image/jpeg;base64," + state.identity.thumbnail : "")
    : state.faces[0].dataUrl;
  const controller = new AbortController();
  const started = performance.now();
  const progress = $("progress");
  let phase = "Generating…";
  const tick = () => { $("status").textContent = `${phase} ${Math.round((performance.now() - started) / 1000)} s`; };
  tick();
  const timer = setInterval(tick, 1000);
  state.running = {cancel: () => controller.abort()};
  $("generate").disabled = true;
  $("cancel").hidden = false;
  progress.hidden = false;
  try {
    const result = await runner(body, {
      signal: controller.signal,
      onProgress: (fraction, what) => {
        if (fraction === null) progress.removeAttribute("value");
        else { progress.max = 1; progress.value = fraction; }
        if (what && what !== phase) { phase = what; tick(); }
      },
    });
    addResult(body, result, reference);
    $("results").firstElementChild.scrollIntoView({block: "nearest", behavior: "smooth"});
    $("status").textContent = `Done in ${result.timings.total_s.toFixed(1)} s (seed ${result.seed}).`;
  } catch (err) {
    $("status").textContent = err.name === "AbortError" ? "Cancelled." : "Failed.";
    showError(err);
  } finally {
    clearInterval(timer);
    state.running = null;
    $("generate").disabled = false;
    $("cancel").hidden = true;
    progress.hidden = true;
  }
}

// -- results --------------------------------------------------------------------------------------------
function loadResults() {
  try { return JSON.parse(sessionStorage.getItem(RESULTS_STORE) || "[]"); } catch (_) { return []; }
}

function saveResults() {
  // newest first; the oldest go when the tab's storage is full (images are kept as data URLs)
  for (let keep = state.results.length; keep >= 0; keep--) {
    try {
      sessionStorage.setItem(RESULTS_STORE, JSON.stringify(state.results.slice(0, keep)));
      return;
    } catch (_) { /* quota: keep fewer */ }
  }
}

function addResult(body, result, reference) {
  const mime = {png: "image/png", jpeg: "image/jpeg", webp: "image/webp"}[result.format] || "image/png";
  const images = result.images ? result.images.map((b) => `data:${mime};base64,${b}`) : result.urls;
  const settings = [`${result.width}×${result.height}`, `${body.steps} steps`, `guidance ${body.guidance_scale}`,
    `identity ${body.ip_adapter_scale}`, `IdentityNet ${body.controlnet_conditioning_scale}`, result.model,
    body.style || "", Object.entries(result.loras || {}).map(([k, v]) => `${k} ${v}`).join(", ")].filter(Boolean);
  if (body.init_image) settings.push(`restyled, strength ${body.strength}`);
  if (body.prompt_weighting === "none") settings.push("plain CLIP prompt");
  if (body.enhance_face_region === false) settings.push("whole-image identity");
  const pose = result.pose_image ? "data:image/png;base64," + result.pose_image : null;
  state.results.unshift({seed: result.seed, format: result.format, images, settings, reference, pose,
    prompt: body.prompt, at: new Date().toISOString()});
  state.results = state.results.slice(0, MAX_RESULTS);
  saveResults();
  renderResults();
}

function renderResults() {
  $("no-results").hidden = state.results.length > 0;
  const cards = [];
  state.results.forEach((r) => {
    r.images.forEach((src, i) => {
      const li = document.createElement("li");
      li.className = "result";
      const label = `image ${i + 1} of seed ${r.seed}`;
      li.innerHTML = '<button type="button" class="thumb"><img></button><p class="meta"></p><p class="settings"></p>' +
        '<div class="result-actions"><a class="button" download>Download</a><button type="button" class="use-seed">Use this seed</button></div>';
      const thumb = li.querySelector(".thumb");
      thumb.setAttribute("aria-label", `Enlarge ${label} next to the reference photo`);
      const img = li.querySelector("img");
      img.src = src;
      img.alt = `Generated ${label}: ${r.prompt || "(no prompt)"}`;
      li.querySelector(".meta").textContent = `seed ${r.seed}` + (r.images.length > 1 ? ` · #${i + 1}` : "");
      li.querySelector(".settings").textContent = r.settings.join(" · ");
      const link = li.querySelector("a");
      link.href = src;
      link.download = `instantid-${r.seed}-${i + 1}.${r.format}`;
      link.setAttribute("aria-label", "Download " + label);
      const use = li.querySelector(".use-seed");
      use.setAttribute("aria-label", `Use seed ${r.seed}`);
      use.addEventListener("click", () => { $("seed").value = r.seed; $("seed").focus(); });
      thumb.addEventListener("click", () => openViewer(r, src, i));
      cards.push(li);
    });
    if (r.pose) cards.push(poseCard(r));
  });
  $("results").replaceChildren(...cards);
}

// The keypoint image IdentityNet got (return_pose_image), shown after that request's images.
function poseCard(r) {
  const li = document.createElement("li");
  li.className = "result pose-result";
  li.innerHTML = '<img><p class="meta"></p><p class="settings">The keypoints IdentityNet got</p>' +
    '<div class="result-actions"><a class="button" download>Download</a></div>';
  const img = li.querySelector("img");
  img.src = r.pose;
  img.alt = `Pose image of seed ${r.seed}: the face keypoints IdentityNet got`;
  li.querySelector(".meta").textContent = `pose · seed ${r.seed}`;
  const link = li.querySelector("a");
  link.href = r.pose;
  link.download = `instantid-${r.seed}-pose.png`;
  link.setAttribute("aria-label", `Download the pose image of seed ${r.seed}`);
  return li;
}

function openViewer(r, src, i) {
  $("viewer-img").src = src;
  $("viewer-ref").src = r.reference || "";
  $("viewer-ref").parentElement.hidden = !r.reference;
  $("viewer-caption").textContent = `seed ${r.seed} · ${r.settings.join(" · ")}`;
  $("viewer-download").href = src;
  $("viewer-download").download = `instantid-${r.seed}-${i + 1}.${r.format}`;
  $("viewer").showModal();
}

// -- start ----------------------------------------------------------------------------------------------
async function loadServer() {
  $("err-api_key").textContent = "";
  $("page-error").textContent = "";
  try {
    const resp = await fetch(new URL("openapi.json", BASE));
    const doc = await resp.json();
    applySchema(doc.components.schemas.GenerateRequest.properties);
  } catch (_) { /* the form keeps its built-in bounds; the server still validates */ }
  try {
    applyModels(await api("v1/models"));
    await loadIdentities();
  } catch (err) {
    if (err.code === "unauthorized") showError(err, "api_key");
    else { $("page-error").textContent = err.message; }
  }
  updateSize();
}

function init() {
  $("api-key").value = state.key;
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.key = $("api-key").value.trim();
    if (state.key) sessionStorage.setItem(KEY_STORE, state.key); else sessionStorage.removeItem(KEY_STORE);
    loadServer();
  });
  $("key-forget").addEventListener("click", () => {
    state.key = "";
    $("api-key").value = "";
    sessionStorage.removeItem(KEY_STORE);
  });
  document.querySelectorAll('input[name="source"]').forEach((r) => r.addEventListener("change", () => {
    $("photos-panel").hidden = source() !== "photos";
    $("identity-panel").hidden = source() !== "identity";
    updateSize();
  }));
  $("identity").addEventListener("change", showIdentity);
  $("save-identity").addEventListener("click", saveIdentity);
  $("face-input").addEventListener("change", (e) => { addFaces(e.target.files).then(() => { e.target.value = ""; }); });
  $("pose-input").addEventListener("change", (e) => setPose(e.target.files[0]));
  $("init-input").addEventListener("change", (e) => setInit(e.target.files[0]));
  const drop = $("face-drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); addFaces(e.dataTransfer.files); });
  document.querySelectorAll(".slider input").forEach((el) => el.addEventListener("input", () => showValue(el)));
  $("base_model").addEventListener("change", renderLoras);
  $("size").addEventListener("change", updateSize);
  $("dice").addEventListener("click", () => {
    const max = Number($("seed").max) || 4294967295;
    $("seed").value = crypto.getRandomValues(new Uint32Array(1))[0] % (max + 1);
  });
  $("gen-form").addEventListener("submit", onGenerate);
  $("cancel").addEventListener("click", () => state.running && state.running.cancel());
  $("viewer-close").addEventListener("click", () => $("viewer").close());
  document.querySelectorAll(".slider input").forEach(showValue);
  renderResults();
  loadServer();
}

init();
