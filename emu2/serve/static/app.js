// The Emu2 web page: talks to this server's OpenAI-style API only (no external scripts, no build step).
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = [];   // OpenAI messages sent so far (user turns carry their images as data URLs)
let chatImages = [];       // data URLs attached to the next chat message
let editImages = [];       // data URLs given to the image generator

// Official demo frontend: images whose sides are both >= 448 are resized to a short side of 448.
const SHORT_SIDE = 448;

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

function thumbnails(container, urls) {
  container.replaceChildren(...urls.map((url) => {
    const img = document.createElement("img");
    img.src = url;
    img.alt = "attached image";
    return img;
  }));
}

function addMessage(role, text, images = []) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  for (const url of images) {
    const img = document.createElement("img");
    img.src = url;
    img.alt = "image";
    div.append(img);
  }
  const span = document.createElement("span");
  span.className = "text";
  span.textContent = text;
  div.append(span);
  $("messages").append(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return span;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message : JSON.stringify(body);
  } catch (e) {
    return `HTTP ${response.status}`;
  }
}

// Reads an OpenAI server-sent-events stream, calling onDelta with each piece of the answer.
async function readStream(response, onDelta) {
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
        for (const choice of chunk.choices || []) {
          if (choice.delta && choice.delta.content) onDelta(choice.delta.content);
        }
      }
    }
  }
}

async function sendChat(event) {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text) return;
  const images = chatImages;
  const content = [...images.map((url) => ({ type: "image_url", image_url: { url } })), { type: "text", text }];
  conversation.push({ role: "user", content });
  addMessage("user", text, images);
  $("chat-input").value = "";
  chatImages = [];
  $("chat-images").value = "";
  thumbnails($("chat-attachments"), []);
  const answer = addMessage("assistant", "");
  answer.parentElement.classList.add("pending");
  $("chat-send").disabled = true;
  try {
    const body = {
      messages: conversation, stream: true,  // no model field: the server answers with the one it serves
      max_tokens: Number($("chat-max-tokens").value) || 256,
      temperature: Number($("chat-temperature").value) || 0,
    };
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    if (!response.ok) throw new Error(await errorText(response));
    await readStream(response, (delta) => {
      answer.textContent += delta;
      $("messages").scrollTop = $("messages").scrollHeight;
    });
    conversation.push({ role: "assistant", content: answer.textContent });
  } catch (error) {
    conversation.pop();  // the question was not answered: do not keep it in the history
    answer.parentElement.classList.add("error");
    answer.textContent = `error: ${error.message}`;
  } finally {
    answer.parentElement.classList.remove("pending");
    answer.parentElement.classList.add("done");
    $("chat-send").disabled = false;
  }
}

async function generateImage(event) {
  event.preventDefault();
  const prompt = $("image-prompt").value;
  const body = { prompt, images: editImages, response_format: "b64_json" };
  if ($("image-steps").value) body.num_inference_steps = Number($("image-steps").value);
  if ($("image-guidance").value) body.guidance_scale = Number($("image-guidance").value);
  if ($("image-seed").value !== "") body.seed = Number($("image-seed").value);
  $("image-generate").disabled = true;
  $("image-status").className = "";
  $("image-status").textContent = "generating…";
  const started = performance.now();
  try {
    const response = await fetch("v1/images/generations", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    if (!response.ok) throw new Error(await errorText(response));
    const result = await response.json();
    for (const item of result.data) {
      const link = document.createElement("a");
      link.href = `data:image/png;base64,${item.b64_json}`;
      link.download = "emu2.png";
      const img = document.createElement("img");
      img.src = link.href;
      img.alt = prompt || "generated image";
      img.className = "generated";
      img.onload = () => { if (img.naturalWidth < 256) img.classList.add("small"); };  // tiny test models
      link.append(img);
      $("image-results").prepend(link);
    }
    $("image-status").textContent = `${result.size} in ${((performance.now() - started) / 1000).toFixed(1)} s`;
  } catch (error) {
    $("image-status").className = "error";
    $("image-status").textContent = `error: ${error.message}`;
  } finally {
    $("image-generate").disabled = false;
  }
}

async function attach(input, show) {
  try {
    const urls = await Promise.all([...input.files].map(readImage));
    show(urls);
    return urls;
  } catch (error) {
    alert(error.message);
    return [];
  }
}

async function checkServer() {
  try {
    const health = await (await fetch("healthz")).json();
    const parts = [];
    if (health.chat_model) parts.push(`chat: ${health.chat_model}`);
    if (health.image_model) parts.push(`images: ${health.image_model}`);
    $("server-status").textContent = parts.join(" · ");
    if (!health.chat_model) $("chat-panel").hidden = true;
    if (!health.image_model) $("image-panel").hidden = true;
  } catch (error) {
    $("server-status").textContent = "server unreachable";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("chat-form").addEventListener("submit", sendChat);
  $("chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("chat-form").requestSubmit(); }
  });
  $("chat-reset").addEventListener("click", () => {
    conversation.length = 0;
    $("messages").replaceChildren();
  });
  $("chat-images").addEventListener("change", async (event) => {
    chatImages = await attach(event.target, (urls) => thumbnails($("chat-attachments"), urls));
  });
  $("image-inputs").addEventListener("change", async (event) => {
    editImages = await attach(event.target, (urls) => thumbnails($("image-attachments"), urls));
  });
  $("image-form").addEventListener("submit", generateImage);
  checkServer();
});
