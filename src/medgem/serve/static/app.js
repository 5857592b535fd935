// medgem web page: chat with streamed answers, an image or DICOM with a de-identified preview, and
// MedGemma 1.5's recipes (a CT/MR series, a whole-slide image, two X-rays, localization boxes drawn
// over the image). Vanilla JS, no build step. Model text is only ever inserted as textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, history: [], image: null, files: [], controller: null, modeChosen: false };
// What each recipe uploads: several files (a series, a DICOM slide's levels, two X-rays) or one image.
const RECIPES = {
  ct: { many: true, accept: ".dcm,.dicom,.zip,application/dicom,application/zip",
        hint: "Choose the series' DICOM files, or one zip of them (up to 85 slices are sent)." },
  mri: { many: true, accept: ".dcm,.dicom,.zip,application/dicom,application/zip",
         hint: "Choose the series' DICOM files, or one zip of them (up to 85 slices are sent)." },
  wsi: { many: true, accept: ".svs,.tif,.tiff,.ndpi,.zip,.dcm",
         hint: "Choose one slide (.svs, .tiff, .ndpi) or a DICOM slide as a zip or its level files; say the tissue and the procedure." },
  longitudinal: { many: true, accept: ".dcm,.dicom,application/dicom,image/png,image/jpeg",
                  hint: "Choose two chest X-rays, the prior first (DICOM dates decide when both have them)." },
  localize: { many: false, accept: ".dcm,.dicom,application/dicom,image/png,image/jpeg",
              hint: "Choose one image and write what to find (e.g. right clavicle); the boxes are drawn over it." },
};

function headers(json = true) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error?.message || `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

function setStatus(text) { $("status").textContent = text; }

function addMessage(role, text, imageSrc) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  if (imageSrc) {
    const img = document.createElement("img");
    img.src = imageSrc;
    img.alt = "attached image";
    div.appendChild(img);
  }
  const span = document.createElement("span");
  span.textContent = text;
  div.appendChild(span);
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return span;
}

async function loadModel() {
  const response = await fetch("/v1/models", { headers: headers(false) });
  if (!response.ok) {
    $("model").textContent = response.status === 401 ? "enter the API key" : await errorText(response);
    return;
  }
  const card = (await response.json()).data[0];
  state.model = card.id;
  $("model").textContent = state.model;
  if (card.base_model === null) {  // still loading: ask again, so a base model opens in completion mode
    setTimeout(loadModel, 2000);
  } else if (!state.modeChosen) {
    $("mode").value = card.base_model ? "completion" : "chat";
    showMode();
  }
  $("mode-hint").hidden = !card.base_model;
}

function showMode() {
  const completion = $("mode").value === "completion";
  $("question").placeholder = completion
    ? "Start a text for the model to continue (Enter sends, Shift+Enter for a new line)"
    : "Ask a question (Enter sends, Shift+Enter for a new line)";
  $("file").disabled = completion;  // images go in chat turns only
  $("recipe").disabled = completion;
  if (completion) {
    $("recipe").value = "";
    showRecipe();
  }
}

function showRecipe() {
  const recipe = RECIPES[$("recipe").value];
  $("file").multiple = Boolean(recipe?.many);
  $("file").accept = recipe?.accept || ".dcm,.dicom,application/dicom,image/png,image/jpeg";
  $("recipe-hint").textContent = recipe?.hint || "";
  $("recipe-hint").hidden = !recipe;
  $("wsi-fields").hidden = $("recipe").value !== "wsi";
  $("window-field").hidden = Boolean(recipe?.many);  // the series, slide and X-ray recipes set their own colours
  detach();
}

// -- images -------------------------------------------------------------------------------------
function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function mediaType(file) {
  const name = file.name.toLowerCase();
  if (name.endsWith(".zip") || /zip/.test(file.type)) return "application/zip";
  if (/\.(svs|tif|tiff|ndpi)$/.test(name)) return "image/tiff";
  if (file.type === "image/png" || file.type === "image/jpeg") return file.type;
  return "application/dicom";
}

async function chooseFiles() {
  const recipe = RECIPES[$("recipe").value];
  if (!recipe?.many) return preview();
  const files = [...$("file").files];
  $("image-error").hidden = true;
  state.files = [];
  for (const file of files) {
    const payload = (await readAsDataURL(file)).split(",")[1];
    state.files.push({ type: "image_url", image_url: { url: `data:${mediaType(file)};base64,${payload}` } });
  }
  const megabytes = files.reduce((sum, f) => sum + f.size, 0) / 2 ** 20;
  $("files").textContent = files.length ? `${files.length} file(s), ${megabytes.toFixed(1)} MB, for the ${$("recipe").value} recipe` : "";
  $("files").hidden = !files.length;
}

async function preview() {
  const file = $("file").files[0];
  $("image-error").hidden = true;
  if (!file) return;
  const windowParam = $("window").value ? `?window=${encodeURIComponent($("window").value)}` : "";
  setStatus("rendering preview…");
  const response = await fetch(`/v1/dicom/preview${windowParam}`, { method: "POST", headers: headers(false), body: file });
  setStatus("");
  if (!response.ok) {
    state.image = null;
    $("preview").hidden = true;
    $("image-error").textContent = await errorText(response);
    $("image-error").hidden = false;
    return;
  }
  const body = await response.json();
  const payload = (await readAsDataURL(file)).split(",")[1];
  // The original's size, which localization boxes are measured in (the preview is scaled down).
  const size = body.summary ? { width: body.summary.columns, height: body.summary.rows } : await createImageBitmap(file);
  state.image = { url: `data:${body.media_type};base64,${payload}`, window: $("window").value || null, thumb: body.image,
                  width: size.width, height: size.height };
  $("preview-img").src = body.image;
  showSummary(body);
  $("preview").hidden = false;
}

function showSummary(body) {
  const dl = $("summary");
  dl.replaceChildren();
  const s = body.summary || {};
  const rows = [
    ["type", body.media_type], ["size", `${s.columns ?? body.width} × ${s.rows ?? body.height}`],
    ["modality", s.modality], ["frames", s.frames], ["photometric", s.photometric], ["bits stored", s.bits_stored],
    ["body part", s.body_part], ["study", s.study_description], ["series", s.series_description],
    ["pixel spacing", s.pixel_spacing], ["burned-in text", s.burned_in_annotation],
    ["identity removed", s.patient_identity_removed],
  ];
  for (const [name, value] of rows) {
    if (value === undefined || value === null || value === "") continue;
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = Array.isArray(value) ? value.join(", ") : String(value);
    dl.append(dt, dd);
  }
}

function detach() {
  state.image = null;
  state.files = [];
  $("file").value = "";
  $("preview").hidden = true;
  $("files").hidden = true;
}

// Localization: the answer's boxes (message.boxes, in the original image's pixels) over the image.
function drawBoxes(div, image, boxes) {
  const figure = document.createElement("figure");
  figure.className = "overlay";
  const frame = document.createElement("div");  // the image's own box: the marks' percentages refer to it
  frame.className = "frame";
  const img = document.createElement("img");
  img.src = image.thumb;
  img.alt = "the image with the boxes from the answer";
  frame.appendChild(img);
  figure.appendChild(frame);
  for (const box of boxes) {
    const mark = document.createElement("div");
    mark.className = "box";
    mark.style.left = `${(100 * box.x0) / image.width}%`;
    mark.style.top = `${(100 * box.y0) / image.height}%`;
    mark.style.width = `${(100 * (box.x1 - box.x0)) / image.width}%`;
    mark.style.height = `${(100 * (box.y1 - box.y0)) / image.height}%`;
    const label = document.createElement("span");
    label.textContent = box.label || "";
    mark.appendChild(label);
    frame.appendChild(mark);
  }
  const caption = document.createElement("figcaption");
  caption.textContent = boxes.length ? `${boxes.length} box(es) from the answer` : "no boxes found in the answer";
  figure.appendChild(caption);
  div.insertBefore(figure, div.firstChild);
}

// -- chat ---------------------------------------------------------------------------------------
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

async function ask(event) {
  event.preventDefault();
  const text = $("question").value.trim();
  if (!text || state.controller) return;
  if (!state.model) await loadModel();
  const completion = $("mode").value === "completion";
  const recipe = completion ? "" : $("recipe").value;
  const image = state.image;
  const sources = recipe && RECIPES[recipe].many ? state.files
    : image ? [{ type: "image_url", image_url: { url: image.url, window: image.window } }] : [];
  if (recipe && !sources.length) {
    setStatus(`the ${recipe} recipe needs ${RECIPES[recipe].many ? "its files" : "an image"}`);
    return;
  }
  const content = sources.length && !completion ? [...sources, { type: "text", text }] : text;
  addMessage("user", recipe ? `[${recipe}: ${sources.length} file(s)] ${text}` : text, image?.thumb);
  const userMessage = { role: "user", content };
  const answer = addMessage("assistant", "");
  $("question").value = "";
  detach();
  state.controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  setStatus("thinking…");
  const settings = { model: state.model, stream: true, max_tokens: Number($("max-tokens").value) || 128,
                     temperature: Number($("temperature").value) || 0 };
  // A recipe lays out one user turn as MedGemma 1.5 was trained to read it: no history goes with it.
  const chat = recipe ? { ...settings, recipe, messages: [userMessage] } : { ...settings, messages: [...state.history, userMessage] };
  if (recipe === "wsi") Object.assign(chat, { tissue: $("tissue").value.trim(), procedure: $("procedure").value.trim() });
  let boxes = null;
  try {
    // Completion mode sends the text as it is (no chat turns, no history): what a base model continues well.
    const response = await fetch(completion ? "/v1/completions" : "/v1/chat/completions", {
      method: "POST", headers: headers(), signal: state.controller.signal,
      body: JSON.stringify(completion ? { ...settings, prompt: text } : chat),
    });
    if (!response.ok) throw new Error(await errorText(response));
    setStatus("answering…");
    for await (const chunk of sseEvents(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = completion ? chunk.choices[0]?.text : chunk.choices[0]?.delta?.content;
      if (!completion && chunk.choices[0]?.delta?.boxes) boxes = chunk.choices[0].delta.boxes;
      if (delta) {
        answer.textContent += delta;
        $("log").scrollTop = $("log").scrollHeight;
      }
    }
    if (boxes && image) drawBoxes(answer.parentElement, image, boxes);
    if (!completion && !recipe) state.history.push(userMessage, { role: "assistant", content: answer.textContent });
    setStatus("");
  } catch (err) {
    if (err.name === "AbortError") {
      setStatus("stopped");
    } else {
      answer.parentElement.classList.add("error");
      answer.textContent += (answer.textContent ? "\n" : "") + `Error: ${err.message}`;
      setStatus("");
    }
  } finally {
    state.controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("ask").addEventListener("submit", ask);
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      $("ask").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("clear").addEventListener("click", () => { state.history = []; $("log").replaceChildren(); });
  $("file").addEventListener("change", chooseFiles);
  $("recipe").addEventListener("change", showRecipe);
  $("window").addEventListener("change", preview);
  $("detach").addEventListener("click", detach);
  $("api-key").addEventListener("change", loadModel);
  $("mode").addEventListener("change", () => { state.modeChosen = true; showMode(); });
  loadModel();
});
