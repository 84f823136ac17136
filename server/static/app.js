// The playground: streams from /v1/chat/completions (chat) or /generate (completion) with fetch, since
// EventSource cannot POST. Everything it loads comes from this server.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { history: [], controller: null, model: null, apiKey: "" };

function show(error) {
  $("error").textContent = error;
  $("error").hidden = !error;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value || state.apiKey;
  if (key) h["Authorization"] = "Bearer " + key;  // kept in memory only, never stored
  return h;
}

async function loadInfo() {
  try {
    const info = await (await fetch("/info")).json();
    if (info.error) throw new Error(info.error.message);
    state.model = info.model;
    $("model").textContent = `${info.model} · context ${info.slot_ctx} tokens per request · ${info.parallel} slots`;
    $("key_row").hidden = !info.auth_required;
  } catch (err) {
    $("model").textContent = "model not ready: " + err.message;
  }
}

function addMessage(who, text) {
  const div = document.createElement("div");
  div.className = "msg " + who;
  div.innerHTML = `<span class="who">${who}</span><span class="text"></span>`;
  div.querySelector(".text").textContent = text;
  $("transcript").appendChild(div);
  return div.querySelector(".text");
}

function errorText(status, body) {
  const message = body && body.error ? body.error.message : "";
  if (status === 401) { $("key_row").hidden = false; return "This server needs an API key: enter it above."; }
  if (status === 429) return "The server is busy (all slots taken). Try again in a moment.";
  if (status === 503) return "The server is not ready: " + message;
  return `The server answered ${status}: ${message}`;
}

async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart());
      if (data.length) yield data.join("\n");
    }
  }
}

function request(mode, prompt) {
  const common = { temperature: Number($("temperature").value), top_p: Number($("top_p").value), stream: true };
  if ($("seed").value !== "") common.seed = Number($("seed").value);
  const maxTokens = Number($("max_tokens").value);
  if (mode === "chat") {
    const system = $("system").value.trim();
    return ["/v1/chat/completions", { ...common, model: state.model, max_tokens: maxTokens,
      messages: [...(system ? [{ role: "system", content: system }] : []), ...state.history,
        { role: "user", content: prompt }] }];
  }
  return ["/generate", { ...common, prompt, max_length: maxTokens }];
}

function tokenText(mode, payload) {
  if (mode === "chat") {
    if (payload.error) throw new Error(payload.error.message);
    const choice = (payload.choices || [])[0];
    return choice && choice.delta ? choice.delta.content || "" : "";
  }
  if (payload.type === "error") throw new Error(payload.error.message);
  return payload.type === "token" ? payload.text : "";
}

async function send(event) {
  event.preventDefault();
  const prompt = $("prompt").value;
  if (!prompt.trim()) return;
  const mode = document.querySelector("input[name=mode]:checked").value;
  show("");
  addMessage("user", prompt);
  const out = addMessage("assistant", "");
  const [path, body] = request(mode, prompt);
  state.controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  const start = performance.now();
  let first = 0, last = 0, tokens = 0, text = "";
  const stats = () => {
    const tps = tokens > 1 && last > first ? ((tokens - 1) * 1000 / (last - first)).toFixed(1) : "–";
    $("stats").textContent = `TTFT ${first ? Math.round(first - start) + " ms" : "–"} · ${tps} tok/s · ${tokens} tokens`;
  };
  try {
    const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body),
      signal: state.controller.signal });
    if (!response.ok) {
      let payload = null;
      try { payload = await response.json(); } catch (_) { /* not JSON */ }
      throw new Error(errorText(response.status, payload));
    }
    for await (const data of sseData(response)) {
      if (data === "[DONE]") break;
      const piece = tokenText(mode, JSON.parse(data));
      if (!piece) continue;
      const now = performance.now();
      if (!first) first = now;
      last = now;
      tokens += 1;
      text += piece;
      out.textContent = text;
      stats();
    }
    if (mode === "chat") state.history.push({ role: "user", content: prompt }, { role: "assistant", content: text });
    $("prompt").value = "";
  } catch (err) {
    if (err.name === "AbortError") out.textContent = text + " [stopped]";
    else show(err.message);
  } finally {
    state.controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
    out.dataset.done = "true";
    stats();
  }
}

$("form").addEventListener("submit", send);
// Enter sends, Shift+Enter starts a new line (as in chat apps); not while an input method composes a character.
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    if (!$("send").disabled) $("form").requestSubmit();
  }
});
// The system prompt applies to chat only.
const syncMode = () => {
  $("system_row").hidden = document.querySelector("input[name=mode]:checked").value !== "chat";
};
document.querySelectorAll("input[name=mode]").forEach((radio) => radio.addEventListener("change", syncMode));
syncMode();
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("clear").addEventListener("click", () => { state.history = []; $("transcript").textContent = ""; show(""); });
loadInfo();
