// vsearch shopper page: vanilla JS, no build step, no external requests.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  file: null,        // Blob of the shopper's photo
  imageUrl: null,    // or a link to one
  productId: null,   // or "more like this" product
  productTitle: "",
  text: "",          // the shopper's words: alone a keyword search, beside a photo fused with it
  crop: null,        // {x, y, w, h} in fractions, applied when searching a region
  selected: new Set(),
  tree: [],
  facetFields: [],   // attributes with few values, shown as chips with their counts
  picked: {},        // attribute -> Set of chosen values (OR within one attribute, AND across)
  requestId: 0,
};

// ---------------------------------------------------------------- query input
function setFile(file) {
  if (!file || !file.type.startsWith("image/")) { showError("That file is not an image."); return; }
  reset();
  state.file = file;
  showPreview(URL.createObjectURL(file), `${file.name || "pasted image"} · ${(file.size / 1024).toFixed(0)} KB`);
  search({ reveal: true });
}

function setProduct(productId, title, thumbnail) {
  reset();
  state.productId = productId;
  state.productTitle = title;
  showPreview(thumbnail, `More like: ${title}`);
  $("crop-toggle").hidden = true;
  search({ reveal: true });
}

function reset() {
  state.file = state.imageUrl = state.productId = null;
  state.crop = null;
  $("crop").hidden = true;
  $("crop-apply").hidden = true;
  $("crop-toggle").hidden = false;
  $("crop-toggle").textContent = "Search a region";
}

function showPreview(src, label) {
  $("preview-img").src = src;
  $("preview-label").textContent = label;
  $("drop-empty").hidden = true;
  $("preview").hidden = false;
}

function clearQuery() {
  reset();
  state.text = "";
  $("words").value = "";
  $("preview").hidden = true;
  $("drop-empty").hidden = false;
  $("results").replaceChildren();
  $("suggested").hidden = true;
  $("empty").hidden = false;
  $("status").textContent = "";
  hideError();
  $("file").value = "";
  $("file").focus();
}

$("file").addEventListener("change", (e) => e.target.files[0] && setFile(e.target.files[0]));
$("camera").addEventListener("change", (e) => e.target.files[0] && setFile(e.target.files[0]));
$("clear").addEventListener("click", clearQuery);

const drop = $("drop");
["dragenter", "dragover"].forEach((type) => drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach((type) => drop.addEventListener(type, () => drop.classList.remove("over")));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  const file = [...e.dataTransfer.files].find((f) => f.type.startsWith("image/"));
  if (file) setFile(file);
  else showError("Drop an image file (JPEG, PNG, WebP…).");
});
document.addEventListener("paste", (e) => {
  const item = [...(e.clipboardData?.items || [])].find((i) => i.type.startsWith("image/"));
  if (item) { e.preventDefault(); setFile(item.getAsFile()); }
});
$("text-form").addEventListener("submit", (e) => {
  e.preventDefault();
  state.text = $("words").value.trim();
  if (hasQuery()) search({ reveal: true });
  else clearQuery();
});
$("url-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const url = $("url").value.trim();
  if (!url) return;
  reset();
  state.imageUrl = url;
  $("preview-img").removeAttribute("src");  // the page never loads third-party images itself
  showPreview("", `Searching by link: ${url}`);
  $("crop-toggle").hidden = true;
  search();
});

// ---------------------------------------------------------------- crop box
const crop = $("crop");
const stage = $("stage");
function drawCrop() {
  const c = state.crop;
  crop.style.left = `${c.x * 100}%`; crop.style.top = `${c.y * 100}%`;
  crop.style.width = `${c.w * 100}%`; crop.style.height = `${c.h * 100}%`;
  crop.setAttribute("aria-valuetext", `region at ${Math.round(c.x * 100)}%, ${Math.round(c.y * 100)}%, ${Math.round(c.w * 100)}% by ${Math.round(c.h * 100)}%`);
}
const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));
function moveCrop(dx, dy, resize) {
  const c = state.crop;
  if (resize) { c.w = clamp(c.w + dx, 0.05, 1 - c.x); c.h = clamp(c.h + dy, 0.05, 1 - c.y); }
  else { c.x = clamp(c.x + dx, 0, 1 - c.w); c.y = clamp(c.y + dy, 0, 1 - c.h); }
  drawCrop();
}
$("crop-toggle").addEventListener("click", () => {
  if (state.crop) {  // turn the region off and search the whole photo again
    state.crop = null;
    crop.hidden = true; $("crop-apply").hidden = true;
    $("crop-toggle").textContent = "Search a region";
    search(); return;
  }
  state.crop = { x: 0.2, y: 0.2, w: 0.6, h: 0.6 };
  crop.hidden = false; $("crop-apply").hidden = false;
  $("crop-toggle").textContent = "Whole photo";
  drawCrop(); crop.focus();
});
$("crop-apply").addEventListener("click", () => search());
crop.addEventListener("pointerdown", (e) => {
  e.preventDefault();
  crop.setPointerCapture(e.pointerId);
  const rect = stage.getBoundingClientRect();
  const resize = e.target.dataset.handle === "se";
  let last = { x: e.clientX, y: e.clientY };
  const onMove = (ev) => {
    moveCrop((ev.clientX - last.x) / rect.width, (ev.clientY - last.y) / rect.height, resize);
    last = { x: ev.clientX, y: ev.clientY };
  };
  const onUp = () => { crop.removeEventListener("pointermove", onMove); crop.removeEventListener("pointerup", onUp); };
  crop.addEventListener("pointermove", onMove);
  crop.addEventListener("pointerup", onUp);
});
crop.addEventListener("keydown", (e) => {
  const step = 0.02;
  const moves = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] };
  if (moves[e.key]) { e.preventDefault(); moveCrop(...moves[e.key], e.shiftKey); }
  if (e.key === "Enter") { e.preventDefault(); search(); }
});

// ---------------------------------------------------------------- categories
async function loadCategories() {
  try {
    const response = await fetch("/v1/categories");
    if (!response.ok) throw await apiError(response);
    state.tree = await response.json();
    drawCategories();
  } catch (err) { showError(`Categories unavailable: ${err.message}`); }
}

function chip(label, path, extra = "") {
  const button = document.createElement("button");
  button.type = "button";
  button.className = `chip ${extra}`;
  button.textContent = label;
  button.dataset.category = path;
  button.setAttribute("aria-pressed", String(state.selected.has(path)));
  button.addEventListener("click", () => toggleCategory(path));
  return button;
}

function drawCategories() {
  const box = $("categories");
  box.replaceChildren();
  if (!state.tree.length) return;
  const all = chip("All", "");
  all.setAttribute("aria-pressed", String(state.selected.size === 0));
  box.append(all);
  for (const node of state.tree) {
    box.append(chip(`${node.name} (${node.products})`, node.path));
    const open = [...state.selected].some((s) => s === node.path || s.startsWith(node.path + "/"));
    if (open) for (const child of node.children) box.append(chip(`${child.name} (${child.products})`, child.path, "child"));
  }
}

function toggleCategory(path) {
  if (path === "") state.selected.clear();
  else if (state.selected.has(path)) state.selected.delete(path);
  else {
    // a category and its own ancestor together would be redundant: keep the newest
    for (const s of [...state.selected]) if (s.startsWith(path + "/") || path.startsWith(s + "/")) state.selected.delete(s);
    state.selected.add(path);
  }
  drawCategories();
  if (hasQuery()) search();
}

function drawSuggested(suggested) {
  const box = $("suggested");
  box.replaceChildren();
  const useful = suggested.filter((s) => !state.selected.has(s.category));
  box.hidden = useful.length === 0;
  if (box.hidden) return;
  const label = document.createElement("span");
  label.className = "label";
  label.textContent = "Looks like:";
  box.append(label);
  for (const s of useful) {
    const button = chip(s.category, s.category);
    const share = document.createElement("span");
    share.className = "share";
    share.textContent = `${Math.round(s.share * 100)}%`;
    button.append(share);
    box.append(button);
  }
}

// ---------------------------------------------------------------- attribute facets
const FACET_FIELDS = 4;  // at most this many attributes get chips
const FACET_MAX_VALUES = 12;  // an attribute with more values (a SKU, a title) is no chip row

async function loadAttributes() {
  try {
    const response = await fetch("/v1/attributes");
    if (!response.ok) throw await apiError(response);
    const names = await response.json();
    state.facetFields = names.filter((a) => a.values >= 2 && a.values <= FACET_MAX_VALUES).slice(0, FACET_FIELDS).map((a) => a.name);
  } catch (err) { showError(`Attributes unavailable: ${err.message}`); }
}

function filterJson() {
  const filter = {};
  for (const [field, values] of Object.entries(state.picked)) if (values.size) filter[field] = { in: [...values].map((k) => JSON.parse(k)) };
  return Object.keys(filter).length ? JSON.stringify(filter) : "";
}

function valueKey(value) { return JSON.stringify(value); }

function drawFacets(facets) {
  const box = $("facets");
  box.replaceChildren();
  for (const field of state.facetFields) {
    const counts = facets[field]?.all || [];
    const picked = state.picked[field] || new Set();
    if (!counts.length && !picked.size) continue;
    const row = document.createElement("div");
    row.className = "chips";
    row.setAttribute("role", "group");
    row.setAttribute("aria-label", `Filter by ${field}`);
    row.dataset.field = field;
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = `${field.replaceAll("_", " ")}:`;
    row.append(label);
    const shown = new Set(counts.map((c) => valueKey(c.value)));
    const entries = [...counts, ...[...picked].filter((k) => !shown.has(k)).map((k) => ({ value: JSON.parse(k), count: 0 }))];
    for (const { value, count } of entries) {
      const key = valueKey(value);
      const button = document.createElement("button");
      button.type = "button";
      button.className = "chip facet";
      button.textContent = `${value} (${count})`;
      button.dataset.value = key;
      button.setAttribute("aria-pressed", String(picked.has(key)));
      button.addEventListener("click", () => toggleFacet(field, key));
      row.append(button);
    }
    box.append(row);
  }
}

function toggleFacet(field, key) {
  const picked = (state.picked[field] ||= new Set());
  if (picked.has(key)) picked.delete(key); else picked.add(key);
  if (hasQuery()) search();
}

// ---------------------------------------------------------------- search
const hasPicture = () => Boolean(state.file || state.imageUrl || state.productId);
const hasQuery = () => hasPicture() || Boolean(state.text);

async function apiError(response) {
  try {
    const body = await response.json();
    return new Error(body.error?.message || `HTTP ${response.status}`);
  } catch { return new Error(`HTTP ${response.status}`); }
}

// On a phone the results sit below the photo: bring them into view for a new photo.
const narrow = window.matchMedia("(max-width: 760px)");

async function search({ reveal = false } = {}) {
  if (!hasQuery()) return;
  const id = ++state.requestId;
  // one card per variant group (products whose pictures are near-duplicates), its best product
  const params = new URLSearchParams({ k: "12", collapse: "variant_group" });
  for (const c of state.selected) params.append("category", c);
  for (const f of state.facetFields) params.append("facets", f);
  const filter = filterJson();
  if (filter) params.append("filter", filter);
  const form = new FormData();
  if (state.file) form.append("image", state.file, state.file.name || "photo");
  if (state.imageUrl) form.append("image_url", state.imageUrl);
  if (state.productId) form.append("product_id", state.productId);
  if (state.text) form.append("text", state.text);
  // what a result's score means: a cosine, a keyword match relative to the best, or a fused rank score
  const scoring = !state.text ? "photo" : hasPicture() ? "fused" : "words";
  if (state.crop && state.file) {
    const c = state.crop;
    form.append("crop", [c.x, c.y, c.w, c.h].map((v) => v.toFixed(4)).join(","));
  }
  hideError();
  $("results").setAttribute("aria-busy", "true");
  $("status").textContent = "Searching…";
  try {
    const response = await fetch(`/v1/search?${params}`, { method: "POST", body: form });
    if (!response.ok) throw await apiError(response);
    const data = await response.json();
    if (id !== state.requestId) return;  // a newer search has started
    drawResults(data.results, scoring);
    drawSuggested(data.suggested_categories);
    drawFacets(data.facets || {});
    const ms = Math.round(data.timing_ms.total || 0);
    $("status").textContent = `${data.results.length} products · ${ms} ms`;
    if (reveal && narrow.matches) $("status").scrollIntoView({ behavior: "smooth", block: "start" });
  } catch (err) {
    if (id !== state.requestId) return;
    $("status").textContent = "";
    showError(err.message);
  } finally {
    if (id === state.requestId) $("results").setAttribute("aria-busy", "false");
  }
}

function drawResults(results, scoring) {
  const list = $("results");
  list.replaceChildren();
  $("empty").hidden = results.length > 0;
  if (!results.length) $("empty").textContent = "No products match. Try other words or removing a filter.";
  for (const r of results) {
    const item = document.createElement("li");
    item.className = "card";
    item.dataset.productId = r.product_id;
    const thumb = document.createElement("div");
    thumb.className = "thumb";
    const img = document.createElement("img");
    img.src = r.thumbnail_url; img.alt = r.title || r.product_id; img.loading = "lazy";
    thumb.append(img);
    const body = document.createElement("div");
    body.className = "body";
    const title = document.createElement("div");
    title.className = "title"; title.textContent = r.title || r.product_id;
    const category = document.createElement("div");
    category.className = "category"; category.textContent = r.category;
    const score = document.createElement("div");
    score.className = "score";
    if (scoring === "fused") score.textContent = "photo + words";  // a rank score: no percentage to show
    else {
      score.innerHTML = scoring === "words" ? "words match <b></b>" : "match <b></b>";
      score.querySelector("b").textContent = `${Math.round(Math.max(0, r.score) * 100)}%`;
    }
    body.append(title, category, score);
    if (r.variant_count > 1) {
      const variants = document.createElement("div");
      variants.className = "variants";
      variants.textContent = `${r.variant_count} variants`;
      variants.title = r.variants.join(", ");
      body.append(variants);
    }
    const more = document.createElement("button");
    more.type = "button"; more.className = "button more";
    more.textContent = "More like this";
    more.setAttribute("aria-label", `More like ${r.title || r.product_id}`);
    more.addEventListener("click", () => setProduct(r.product_id, r.title || r.product_id, r.thumbnail_url));
    item.append(thumb, body, more);
    list.append(item);
  }
}

function showError(message) { $("error").textContent = message; $("error").hidden = false; }
function hideError() { $("error").hidden = true; $("error").textContent = ""; }

loadCategories();
loadAttributes();
