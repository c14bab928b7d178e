// facesphere review page: confirm or reject the images a cleaning flagged (facesphere serve --review DIR).
"use strict";

const $ = (id) => document.getElementById(id);
const keyInput = $("api-key");
const thumbnails = new Map();  // image index -> object URL (fetched once, with the key)
const PAGE = 50;  // items per page
let offset = 0;

keyInput.value = localStorage.getItem("facesphere-api-key") || "";
let listedWith = null;  // the key the list was fetched with: a change event without a new key keeps the page as it is
keyInput.addEventListener("change", () => {
  if (keyInput.value === listedWith) return;
  localStorage.setItem("facesphere-api-key", keyInput.value);
  thumbnails.clear();
  refresh();
});
$("pending-only").addEventListener("change", () => { offset = 0; refresh(); });
$("previous").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); refresh(); });
$("next").addEventListener("click", () => { offset += PAGE; refresh(); });

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function call(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { "X-API-Key": keyInput.value, ...(options.headers || {}) } });
  const body = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

async function thumbnail(index) {
  if (!thumbnails.has(index)) {
    const response = await fetch(`/v1/review/images/${index}`, { headers: { "X-API-Key": keyInput.value } });
    if (!response.ok) throw new Error((await response.json().catch(() => ({}))).error || response.statusText);
    thumbnails.set(index, URL.createObjectURL(await response.blob()));
  }
  return thumbnails.get(index);
}

function addImages(row, indices, title) {
  for (const index of indices) {
    const image = document.createElement("img");
    image.alt = `${title} (image ${index})`;
    image.title = image.alt;
    image.dataset.index = String(index);
    row.append(image);
    thumbnail(index).then((url) => { image.src = url; }).catch(() => { image.alt = `image ${index} unreadable`; });
  }
}

const cosine = (value) => (value === null ? "n/a" : value.toFixed(3));

function describe(item) {
  const parts = [`${item.path}`, `filed as ${item.identity} (label ${item.label}), cosine ${cosine(item.own_cosine)}`];
  if (item.kind === "flip") parts.push(`suggested ${item.suggested_identity} (label ${item.suggested_label}), cosine ${cosine(item.other_cosine)}`);
  if (item.kind === "duplicate") parts.push(`repeats ${item.duplicate_path}`);
  return parts.join(" · ");
}

function showDecision(element, item) {
  element.dataset.decision = item.decision;
  element.querySelector(".decision").textContent = item.decision;
}

function render(items) {
  const list = $("items");
  list.replaceChildren();
  list.start = offset + 1;
  for (const item of items) {
    const element = $("item-template").content.firstElementChild.cloneNode(true);
    element.dataset.index = String(item.index);
    element.dataset.kind = item.kind;
    element.classList.add(item.kind);
    element.querySelector(".item-title").textContent = `${item.kind} · image ${item.index}`;
    element.querySelector(".item-info").textContent = describe(item);
    const flagged = [item.index, ...(item.duplicate_of === null ? [] : [item.duplicate_of])];
    addImages(element.querySelector(".flagged .row"), flagged, "flagged");
    element.querySelector(".own-caption").textContent = `typical of ${item.identity}`;
    addImages(element.querySelector(".own .row"), item.typical, item.identity);
    if (item.kind === "flip") {
      element.querySelector(".other-caption").textContent = `typical of ${item.suggested_identity}`;
      addImages(element.querySelector(".other .row"), item.suggested_typical, item.suggested_identity);
    } else {
      element.querySelector(".other").remove();
    }
    element.querySelector(".confirm").textContent = item.kind === "flip" ? `Confirm: relabel to ${item.suggested_identity}` : "Confirm: drop it";
    element.querySelector(".reject").textContent = `Reject: keep under ${item.identity}`;
    element.querySelector(".confirm").addEventListener("click", () => decide(element, item, "confirm"));
    element.querySelector(".reject").addEventListener("click", () => decide(element, item, "reject"));
    showDecision(element, item);
    list.append(element);
  }
}

async function decide(element, item, decision) {
  try {
    const decided = await call(`/v1/review/items/${item.index}`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ decision }),
    });
    showDecision(element, decided);
    setStatus(`image ${decided.index} ${decided.decision}`);
  } catch (error) {
    setStatus(error.message, true);
  }
}

async function refresh() {
  if (!keyInput.value) return setStatus("enter an API key");
  listedWith = keyInput.value;
  try {
    let review = await call(`/v1/review/items?pending=${$("pending-only").checked}&offset=${offset}&limit=${PAGE}`);
    if (!review.items.length && offset > 0) {  // decided past the end: back to the last page
      offset = Math.max(0, Math.floor((review.total - 1) / PAGE) * PAGE);
      review = await call(`/v1/review/items?pending=${$("pending-only").checked}&offset=${offset}&limit=${PAGE}`);
    }
    $("folder").textContent = review.folder;
    const shown = review.items.length ? `${offset + 1}–${offset + review.items.length}` : "0";
    $("counts").textContent = `${shown} of ${review.total}`;
    $("previous").disabled = offset === 0;
    $("next").disabled = offset + review.items.length >= review.total;
    render(review.items);
    setStatus(`${review.total} flagged image(s)`);
  } catch (error) {
    setStatus(error.message, true);
  }
}

refresh();
