// facesphere web page: identify the faces of a photo against the gallery, enrol a face, list identities.
"use strict";

const $ = (id) => document.getElementById(id);
const keyInput = $("api-key");
const COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"];
let currentFile = null;

keyInput.value = localStorage.getItem("facesphere-api-key") || "";
keyInput.addEventListener("change", () => {
  localStorage.setItem("facesphere-api-key", keyInput.value);
  refresh();
});

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function call(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { "X-API-Key": keyInput.value, ...(options.headers || {}) } });
  if (response.status === 204) return null;
  const body = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function drawFaces(image, faces) {
  const canvas = $("canvas");
  const scale = Math.min(900 / image.width, 600 / image.height);  // fit 900 x 600, enlarging small photos
  canvas.dataset.scale = String(scale);
  canvas.width = Math.round(image.width * scale);
  canvas.height = Math.round(image.height * scale);
  const ctx = canvas.getContext("2d");
  ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
  ctx.lineWidth = 2;
  ctx.font = "bold 14px system-ui, sans-serif";
  faces.forEach((face, i) => {
    const colour = COLOURS[i % COLOURS.length];
    const [x1, y1, x2, y2] = face.box.map((v) => Math.round(v * scale));  // whole pixels: crisp lines
    ctx.strokeStyle = colour;
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
    ctx.fillStyle = colour;
    for (const [x, y] of face.landmarks) {
      ctx.beginPath();
      ctx.arc(x * scale, y * scale, 2.5, 0, 2 * Math.PI);
      ctx.fill();
    }
    const best = face.matches[0];
    const label = `${i + 1}` + (best && best.known ? ` ${best.name} ${best.score.toFixed(2)}` : "");
    ctx.fillRect(x1, Math.max(0, y1 - 18), ctx.measureText(label).width + 8, 18);
    ctx.fillStyle = "#fff";
    ctx.fillText(label, x1 + 4, Math.max(13, y1 - 5));
  });
}

function listFaces(faces) {
  const list = $("faces");
  list.replaceChildren();
  faces.forEach((face, i) => {
    const item = $("face-template").content.firstElementChild.cloneNode(true);
    item.dataset.face = String(i);
    const age = face.age === null || face.age === undefined ? "" : `, age ${Math.round(face.age)} (${face.age_source})`;
    const gender = face.gender ? `, ${face.gender}` : "";
    item.querySelector(".face-title").textContent =
      `Face ${i + 1} (detection score ${face.score.toFixed(3)}${age}${gender})`;
    const body = item.querySelector("tbody");
    if (!face.matches.length) body.insertRow().insertCell().textContent = "gallery is empty";
    for (const match of face.matches) {
      const row = body.insertRow();
      row.className = match.known ? "known match" : "unknown match";
      row.insertCell().textContent = match.name;
      row.insertCell().textContent = match.score.toFixed(4);
      row.insertCell().textContent = match.known ? "match" : "below threshold";
    }
    item.querySelector("form").addEventListener("submit", (event) => {
      event.preventDefault();
      enrol(i, item.querySelector(".enrol-name").value.trim());
    });
    list.append(item);
  });
}

async function identify() {
  currentFile = $("photo").files[0];
  if (!currentFile) return setStatus("choose a photo first", true);
  setStatus("analysing…");
  try {
    const form = new FormData();
    form.append("image", currentFile);
    const result = await call("/v1/identify", { method: "POST", body: form });
    const image = await createImageBitmap(currentFile);
    drawFaces(image, result.faces);
    listFaces(result.faces);
    setStatus(`${result.faces.length} face(s) found`);
  } catch (error) {
    setStatus(error.message, true);
  }
}

async function enrol(faceIndex, name) {
  if (!name) return setStatus("give the face a name", true);
  setStatus(`enrolling ${name}…`);
  try {
    const form = new FormData();
    form.append("name", name);
    form.append("face", String(faceIndex));
    form.append("images", currentFile);
    const identity = await call("/v1/identities", { method: "POST", body: form });
    setStatus(`enrolled ${identity.name} (${identity.templates} template(s))`);
    await refresh();
    await identify();
  } catch (error) {
    setStatus(error.message, true);
  }
}

async function remove(name) {
  try {
    await call(`/v1/identities/${encodeURIComponent(name)}`, { method: "DELETE" });
    setStatus(`removed ${name}`);
    await refresh();
  } catch (error) {
    setStatus(error.message, true);
  }
}

async function refresh() {
  if (!keyInput.value) return setStatus("enter an API key");
  try {
    const info = await call("/v1/info");
    $("info").textContent = `model ${info.model} · ${info.embedding_size}-d · index ${info.index}` +
      (info.threshold === null ? "" : ` · threshold ${info.threshold}`);
    const identities = await call("/v1/identities");
    $("count").textContent = `(${identities.length})`;
    $("identities").replaceChildren(...identities.map((identity) => {
      const item = document.createElement("li");
      item.className = "identity";
      item.dataset.name = identity.name;
      item.textContent = `${identity.name} — ${identity.templates} template(s) `;
      const button = document.createElement("button");
      button.textContent = "delete";
      button.addEventListener("click", () => remove(identity.name));
      item.append(button);
      return item;
    }));
  } catch (error) {
    setStatus(error.message, true);
  }
}

$("identify").addEventListener("click", identify);
refresh();
