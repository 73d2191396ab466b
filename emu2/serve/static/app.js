// The Emu2 web page: talks to this server's OpenAI-style API only (no external scripts, no build step).
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = [];   // OpenAI messages sent so far (images as data URLs, answers with their image parts)
let health = {};

// Official demo frontend: images whose sides are both >= 448 are resized to a short side of 448.
const SHORT_SIDE = 448;
// Grounding coordinates are <patch_index_k> tokens, k = 0..224 across the image (tokens past 224 clamp).
const COORD_BINS = 224;
const MARKER = /\[image (\d+)\]/g;

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function image(url, alt, className) {
  const img = el("img", className);
  img.src = url;
  img.alt = alt;
  img.onload = () => { if (img.naturalWidth < 128) img.classList.add("small"); };  // tiny test models
  return img;
}

function readImage(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onerror = () => reject(new Error(`could not read ${file.name}`));
    reader.onload = () => {
      const img = new Image();
      img.onerror = () => reject(new Error(`${file.name} is not an image the browser can open`));
      img.onload = () => {
        const short = Math.min(img.naturalWidth, img.naturalHeight);
        if (short < SHORT_SIDE) { resolve(reader.result); return; }
        const scale = SHORT_SIDE / short;
        const canvas = document.createElement("canvas");
        canvas.width = Math.round(img.naturalWidth * scale);
        canvas.height = Math.round(img.naturalHeight * scale);
        canvas.getContext("2d").drawImage(img, 0, 0, canvas.width, canvas.height);
        resolve(canvas.toDataURL("image/png"));
      };
      img.src = reader.result;
    };
    reader.readAsDataURL(file);
  });
}

// ------------------------------------------------------------------------------------------ attachments
// Images added one by one (choosing files adds, never replaces) and removed one by one. With a textarea, each
// image gets a marker "[image N]" inserted at the caret: the message puts the image where its marker is.
function attachments(container, input, textarea) {
  const items = [];
  let next = 1;
  function render() {
    container.replaceChildren(...items.map((item) => {
      const thumb = el("figure", "thumb");
      thumb.append(image(item.url, `attached image ${item.id}`));
      if (textarea) thumb.append(el("figcaption", "", `image ${item.id}`));
      const remove = el("button", "remove", "×");
      remove.type = "button";
      remove.title = remove.ariaLabel = `remove image ${item.id}`;
      remove.addEventListener("click", () => drop(item.id));
      thumb.append(remove);
      return thumb;
    }));
  }
  function drop(id) {
    items.splice(items.findIndex((item) => item.id === id), 1);
    if (textarea) {
      textarea.value = textarea.value.replace(`[image ${id}]`, "");
      textarea.selectionStart = textarea.selectionEnd = textarea.value.length;
    }
    render();
  }
  input.addEventListener("change", async () => {
    try {
      const urls = await Promise.all([...input.files].map(readImage));
      for (const url of urls) {
        const item = { id: next++, url };
        items.push(item);
        if (textarea) insertAtCaret(textarea, `[image ${item.id}]`);
      }
    } catch (error) {
      alert(error.message);
    }
    input.value = "";  // the same file can be added again
    render();
  });
  return {
    items,
    clear() { items.length = 0; next = 1; render(); },
  };
}

function insertAtCaret(textarea, text) {
  const start = textarea.selectionStart ?? textarea.value.length;
  const end = textarea.selectionEnd ?? start;
  textarea.value = textarea.value.slice(0, start) + text + textarea.value.slice(end);
  textarea.selectionStart = textarea.selectionEnd = start + text.length;
}

// The typed text and the attachments -> ordered items: images at their markers; images without a marker first.
function compose(text, items) {
  const byId = new Map(items.map((item) => [String(item.id), item.url]));
  const placed = new Set([...text.matchAll(MARKER)].map((m) => m[1]).filter((id) => byId.has(id)));
  const parts = items.filter((item) => !placed.has(String(item.id))).map((item) => ({ image: item.url }));
  let last = 0;
  for (const match of text.matchAll(MARKER)) {
    if (!placed.has(match[1])) continue;
    if (match.index > last) parts.push({ text: text.slice(last, match.index) });
    parts.push({ image: byId.get(match[1]) });
    last = match.index + match[0].length;
  }
  if (last < text.length) parts.push({ text: text.slice(last) });
  return parts;
}

// ---------------------------------------------------------------------------------------------- messages
function scrollDown() { $("messages").scrollTop = $("messages").scrollHeight; }

function addUserMessage(parts) {
  const div = el("div", "message user");
  for (const part of parts) {
    div.append(part.image ? image(part.image, "image", "inline") : el("span", "text", part.text));
  }
  $("messages").append(div);
  scrollDown();
}

function addAnswer(question) {
  const div = el("div", "message assistant pending");
  const status = el("p", "status");
  const parts = el("div", "parts");
  div.append(status, parts);
  $("messages").append(div);
  scrollDown();
  return { div, status, parts, question, images: 0, text: "" };
}

function appendText(answer, delta) {
  answer.text += delta;
  let span = answer.parts.lastElementChild;
  if (!span || !span.classList.contains("text")) {
    span = el("span", "text");
    answer.parts.append(span);
  }
  span.textContent += delta;
  scrollDown();
}

// A generated image, framed (a white picture must not melt into the white panel) with what it was made for.
function framedImage(url, caption) {
  const figure = el("figure", "generated");
  const link = el("a");
  link.href = url;
  link.download = "emu2.png";
  link.append(image(url, caption));
  figure.append(link, el("figcaption", "", caption));
  return figure;
}

function appendImage(answer, url) {
  answer.images += 1;
  answer.parts.append(framedImage(url, `image ${answer.images} for: ${answer.question}`));
  scrollDown();
}

// A status from the server (the "emu2" object of stream events: queued, running, drawing) -> ``node``.
function showProgress(node, status, running) {
  node.replaceChildren();
  if (status.status === "queued") {
    node.textContent = status.ahead > 0 ? `queued: ${status.ahead} request(s) ahead` : "starting…";
  } else if (status.status === "running") {
    node.textContent = running;
  } else if (status.status === "drawing") {
    const bar = el("progress");
    bar.max = status.steps;
    bar.value = status.step;
    node.append(`drawing image ${status.image}: step ${status.step} / ${status.steps} `, bar);
  } else if (status.waiting) {
    node.textContent = status.waiting;
  }
}

function showStatus(answer, status) { showProgress(answer.status, status, "writing…"); }

// ---------------------------------------------------------------------------------------------- grounding
const GROUNDED = /<phrase>(.*?)<\/phrase>\s*<object>((?:\s*(?:<patch_index_\d{4}>|<\/delimiter_of_multi_objects\/>))+)\s*<\/object>/gs;

function coordinate(k) { return Math.min(Number(k), COORD_BINS) / COORD_BINS; }

// "<phrase>a dog</phrase><object><patch_index_k> x4</object>" -> [{phrase, box: [x1, y1, x2, y2] fractions}].
function parseBoxes(text) {
  const found = [];
  for (const match of text.matchAll(GROUNDED)) {
    for (const part of match[2].split("</delimiter_of_multi_objects/>")) {
      const ks = [...part.matchAll(/<patch_index_(\d{4})>/g)].map((m) => coordinate(m[1]));
      if (ks.length === 4) found.push({ phrase: match[1].trim(), box: ks });
    }
  }
  if (!found.length) {  // an answer that is just a box
    const ks = [...text.matchAll(/<patch_index_(\d{4})>/g)].slice(0, 4).map((m) => coordinate(m[1]));
    if (ks.length === 4) found.push({ phrase: "", box: ks });
  }
  return found;
}

function readableGrounding(text) {
  return text.replace(GROUNDED, "$1").replace(/<\/?(?:phrase|object|grounding)>|<patch_index_\d{4}>/g, "");
}

function groundedImage(url, boxes) {
  const figure = el("figure", "grounded");
  const frame = el("div", "frame");
  frame.append(image(url, "the image with the answer's boxes"));
  for (const { phrase, box: [x1, y1, x2, y2] } of boxes) {
    const box = el("div", "box");
    box.style.left = `${x1 * 100}%`;
    box.style.top = `${y1 * 100}%`;
    box.style.width = `${(x2 - x1) * 100}%`;
    box.style.height = `${(y2 - y1) * 100}%`;
    if (phrase) box.append(el("span", "label", phrase));
    frame.append(box);
  }
  figure.append(frame);
  return figure;
}

function lastUserImage() {
  for (let i = conversation.length - 1; i >= 0; i--) {
    const message = conversation[i];
    if (message.role !== "user" || !Array.isArray(message.content)) continue;
    const images = message.content.filter((p) => p.type === "image_url");
    if (images.length) return images[images.length - 1].image_url.url;
  }
  return null;
}

// ---------------------------------------------------------------------------------------------- requests
async function errorText(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message : JSON.stringify(body);
  } catch (e) {
    return `HTTP ${response.status}`;
  }
}

// Reads an OpenAI server-sent-events stream, calling onChunk with each parsed chunk.
async function readStream(response, onChunk) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        onChunk(chunk);
      }
    }
  }
}

// Content from the API (a string, or a list of text and image_url parts) -> the answer bubble.
function showContent(answer, content) {
  if (typeof content === "string") { appendText(answer, content); return; }
  for (const part of content || []) {
    if (part.type === "text") appendText(answer, part.text);
    else if (part.type === "image_url") appendImage(answer, part.image_url.url);
  }
}

// While nothing has come back, say whether the model is busy with other requests.
function watchQueue(answer, isWaiting) {
  const timer = setInterval(async () => {
    if (!isWaiting()) { clearInterval(timer); return; }
    try {
      const h = await (await fetch("healthz")).json();
      if (isWaiting()) {
        showStatus(answer, { waiting: h.model_busy ? `waiting for the model: busy, ${h.queued} request(s) queued`
          : "waiting for the model…" });
      }
    } catch (e) { /* the answer's own request reports errors */ }
  }, 1000);
  return timer;
}

let chatAttachments, editAttachments, chatAbort = null, imageAbort = null;

async function sendChat(event) {
  event.preventDefault();
  const typed = $("chat-input").value;
  const parts = compose(typed, chatAttachments.items);
  if (!parts.some((p) => p.text && p.text.trim())) return;
  const content = parts.map((p) => p.image ? { type: "image_url", image_url: { url: p.image } }
    : { type: "text", text: p.text });
  const question = parts.filter((p) => p.text).map((p) => p.text).join("").trim();
  conversation.push({ role: "user", content });
  addUserMessage(parts);
  $("chat-input").value = "";
  chatAttachments.clear();
  const answer = addAnswer(question);
  showStatus(answer, { waiting: "waiting for the model…" });
  const beams = Number($("chat-beams").value) || 1;
  const grounding = $("chat-grounding").checked;
  const drawing = !$("chat-image-controls").hidden && $("chat-draw").checked;
  const body = {
    messages: [...conversation], stream: beams === 1,  // beam search knows its answer only at the end
    max_tokens: Number($("chat-max-tokens").value) || 256,
    temperature: Number($("chat-temperature").value) || 0,
  };
  const system = $("chat-system").value.trim();
  if (system) body.messages.unshift({ role: "system", content: system });
  if (beams > 1) body.num_beams = beams;
  if (grounding) body.grounding = true;
  if (drawing) {
    body.modalities = ["text", "image"];
    body.num_inference_steps = Number($("chat-steps").value) || 50;
    if ($("chat-draw-first").checked) body.image_at = [0];
  }
  chatAbort = new AbortController();
  $("chat-send").disabled = true;
  $("chat-cancel").hidden = false;
  let heard = false;
  const timer = watchQueue(answer, () => !heard);
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      signal: chatAbort.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    if (body.stream) {
      await readStream(response, (chunk) => {
        if (chunk.emu2) { heard = true; showStatus(answer, chunk.emu2); }
        for (const choice of chunk.choices || []) {
          const delta = choice.delta && choice.delta.content;
          if (!delta) continue;
          if (!heard || answer.status.textContent.startsWith("waiting")) showStatus(answer, { waiting: "" });
          heard = true;
          showContent(answer, delta);
        }
      });
    } else {
      const result = await response.json();
      heard = true;
      showContent(answer, result.choices[0].message.content);
    }
    const reply = [...answer.parts.children].map((node) => node.classList.contains("text")
      ? { type: "text", text: node.textContent }
      : { type: "image_url", image_url: { url: node.querySelector("img").src } });
    conversation.push({ role: "assistant", content: answer.images ? reply : answer.text });
    if (grounding) showGrounding(answer);
  } catch (error) {
    conversation.pop();  // the question was not answered: do not keep it in the history
    answer.div.classList.add("error");
    answer.parts.replaceChildren(el("span", "text", error.name === "AbortError" ? "cancelled"
      : `error: ${error.message}`));
  } finally {
    heard = true;
    clearInterval(timer);
    answer.status.replaceChildren();
    answer.div.classList.remove("pending");
    answer.div.classList.add("done");
    $("chat-send").disabled = false;
    $("chat-cancel").hidden = true;
    chatAbort = null;
  }
}

function showGrounding(answer) {
  const boxes = parseBoxes(answer.text);
  const url = lastUserImage();
  answer.parts.replaceChildren(el("span", "text", readableGrounding(answer.text)));
  if (boxes.length && url) answer.parts.append(groundedImage(url, boxes));
}

// Streamed (stream: true), so the panel shows the queue and each denoising step, and Cancel closes the stream:
// the server stops drawing at its next step.
async function generateImage(event) {
  event.preventDefault();
  const prompt = $("image-prompt").value;
  const body = { prompt, images: editAttachments.items.map((item) => item.url), response_format: "b64_json",
    stream: true };
  if ($("image-steps").value) body.num_inference_steps = Number($("image-steps").value);
  if ($("image-guidance").value) body.guidance_scale = Number($("image-guidance").value);
  if ($("image-seed").value !== "") body.seed = Number($("image-seed").value);
  $("image-generate").disabled = true;
  $("image-cancel").hidden = false;
  const status = $("image-status");
  status.className = "";
  status.textContent = "waiting for the model…";
  const started = performance.now();
  const seconds = () => ((performance.now() - started) / 1000).toFixed(1);
  imageAbort = new AbortController();
  try {
    const response = await fetch("v1/images/generations", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      signal: imageAbort.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    let size = null;
    await readStream(response, (item) => {
      if (item.emu2) showProgress(status, item.emu2, "reading the prompt…");
      if (item.b64_json) {
        size = item.size;
        $("image-results").prepend(framedImage(`data:image/png;base64,${item.b64_json}`, prompt || "(no prompt)"));
      }
    });
    if (!size) throw new Error("the server sent no image");
    status.textContent = `${size} in ${seconds()} s`;
  } catch (error) {
    status.className = "error";
    status.textContent = error.name === "AbortError" ? "cancelled" : `error: ${error.message}`;
  } finally {
    $("image-generate").disabled = false;
    $("image-cancel").hidden = true;
    imageAbort = null;
  }
}

async function checkServer() {
  try {
    health = await (await fetch("healthz")).json();
    const parts = [];
    if (health.chat_model) parts.push(`chat: ${health.chat_model}`);
    if (health.image_model) parts.push(`images: ${health.image_model}`);
    $("server-status").textContent = parts.join(" · ");
    if (!health.chat_model) $("chat-panel").hidden = true;
    if (!health.image_model) $("image-panel").hidden = true;
    $("chat-image-controls").hidden = !health.chat_images;
  } catch (error) {
    $("server-status").textContent = "server unreachable";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  chatAttachments = attachments($("chat-attachments"), $("chat-images"), $("chat-input"));
  editAttachments = attachments($("image-attachments"), $("image-inputs"), null);
  $("chat-form").addEventListener("submit", sendChat);
  $("chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("chat-form").requestSubmit(); }
  });
  $("chat-cancel").addEventListener("click", () => chatAbort && chatAbort.abort());
  $("image-cancel").addEventListener("click", () => imageAbort && imageAbort.abort());
  $("chat-reset").addEventListener("click", () => {
    conversation.length = 0;
    $("messages").replaceChildren();
  });
  $("image-form").addEventListener("submit", generateImage);
  checkServer();
});
