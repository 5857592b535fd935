// medgem web page: chat with streamed answers, an image or DICOM with a de-identified preview.
// Vanilla JS, no build step. Model text is only ever inserted as textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, history: [], image: null, controller: null, modeChosen: false };

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
  if (completion) detach();
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
  state.image = { url: `data:${body.media_type};base64,${payload}`, window: $("window").value || null, thumb: body.image };
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
  $("file").value = "";
  $("preview").hidden = true;
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
  const content = state.image && !completion
    ? [{ type: "image_url", image_url: { url: state.image.url, window: state.image.window } }, { type: "text", text }]
    : text;
  addMessage("user", text, state.image?.thumb);
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
  try {
    // Completion mode sends the text as it is (no chat turns, no history): what a base model continues well.
    const response = await fetch(completion ? "/v1/completions" : "/v1/chat/completions", {
      method: "POST", headers: headers(), signal: state.controller.signal,
      body: JSON.stringify(completion ? { ...settings, prompt: text }
                                      : { ...settings, messages: [...state.history, userMessage] }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    setStatus("answering…");
    for await (const chunk of sseEvents(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = completion ? chunk.choices[0]?.text : chunk.choices[0]?.delta?.content;
      if (delta) {
        answer.textContent += delta;
        $("log").scrollTop = $("log").scrollHeight;
      }
    }
    if (!completion) state.history.push(userMessage, { role: "assistant", content: answer.textContent });
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
  $("file").addEventListener("change", preview);
  $("window").addEventListener("change", preview);
  $("detach").addEventListener("click", detach);
  $("api-key").addEventListener("change", loadModel);
  $("mode").addEventListener("change", () => { state.modeChosen = true; showMode(); });
  loadModel();
});
