// nanoseek chat page: streams /v1/chat/completions (SSE over fetch), shows reasoning_content in a
// collapsible block apart from the answer, and tokens/s, prompt-cache hits and cost per answer.
// The conversation is kept here; earlier answers go back as content only, never with their
// reasoning (DeepSeek-R1's rule, which the server enforces). Model text is set with textContent,
// never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = [];            // [{role, content}] as sent back to the server
let model = null;
let busy = false;

for (const id of ["api-key", "temperature", "max-tokens"]) {     // settings survive a reload
  const saved = localStorage.getItem("nanoseek-" + id);
  if (saved !== null) $(id).value = saved;
  $(id).addEventListener("change", () => localStorage.setItem("nanoseek-" + id, $(id).value));
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function errorText(response) {
  try { return (await response.json()).error.message; } catch { return response.status + " " + response.statusText; }
}

async function loadModel() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) {
    $("model").textContent = response.status === 401 ? "API key needed (Settings)" : await errorText(response);
    if (response.status === 401) $("settings").open = true;
    return;
  }
  model = (await response.json()).data[0].id;
  $("model").textContent = model;
}

function element(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

function addTurn(role, text) {
  const turn = element("div", "turn " + role);
  if (role === "user") turn.textContent = text;
  $("messages").appendChild(turn);
  return turn;
}

function assistantTurn() {
  const turn = addTurn("assistant");
  const reasoning = element("details", "reasoning");
  reasoning.open = true;
  reasoning.hidden = true;
  reasoning.appendChild(element("summary", null, "Reasoning"));
  const reasoningText = element("div", "reasoning-text");
  reasoning.appendChild(reasoningText);
  const answer = element("div", "answer");
  const stats = element("div", "stats");
  turn.append(reasoning, answer, stats);
  return { turn, reasoning, reasoningText, answer, stats };
}

// Yields the JSON payload of each `data: ...` event of an SSE response body.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (!event.startsWith("data: ")) continue;
      const data = event.slice(6);
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

async function send(text) {
  if (model === null) await loadModel();
  conversation.push({ role: "user", content: text });
  addTurn("user", text);
  const view = assistantTurn();
  const body = {
    model, messages: conversation, stream: true, stream_options: { include_usage: true },
    temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
  };
  if (!$("thinking").checked) body.thinking = { type: "disabled" };
  const start = performance.now();
  let first = null, reasoning = "", answer = "", usage = null, finish = null;
  try {
    const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices) {
        const delta = choice.delta || {};
        if ((delta.reasoning_content || delta.content) && first === null) first = performance.now();
        if (delta.reasoning_content) {
          reasoning += delta.reasoning_content;
          view.reasoning.hidden = false;
          view.reasoningText.textContent = reasoning;
        }
        if (delta.content) {
          if (!answer && reasoning) view.reasoning.open = false;     // the answer begins: fold the thinking away
          answer += delta.content;
          view.answer.textContent = answer;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
        $("messages").scrollTop = $("messages").scrollHeight;
      }
    }
  } catch (error) {
    view.answer.appendChild(element("div", "error", String(error.message || error)));
    conversation.pop();             // the question goes again with the next try
    return;
  }
  if (!answer && reasoning) view.answer.appendChild(element("div", "muted", "(no answer after the reasoning)"));
  conversation.push({ role: "assistant", content: answer });
  view.stats.textContent = stats(usage, first, start, finish);
  view.turn.dataset.done = "true";
}

function stats(usage, first, start, finish) {
  if (!usage) return "finished: " + finish;
  const now = performance.now();
  const seconds = Math.max((now - (first ?? start)) / 1000, 1e-3);
  const parts = [
    usage.completion_tokens + " tokens",
    (usage.completion_tokens / seconds).toFixed(1) + " tok/s",
    "first token " + Math.round((first ?? now) - start) + " ms",
    "cache hits " + usage.prompt_cache_hit_tokens + "/" + usage.prompt_tokens + " prompt tokens",
    "$" + usage.cost.toFixed(6),
  ];
  if (finish && finish !== "stop") parts.push("finish: " + finish);
  return parts.join(" · ");
}

$("composer").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || busy) return;
  busy = true;
  $("send").disabled = true;
  $("prompt").value = "";
  try { await send(text); } finally { busy = false; $("send").disabled = false; $("prompt").focus(); }
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("composer").requestSubmit(); }
});
$("new-chat").addEventListener("click", () => { conversation.length = 0; $("messages").replaceChildren(); });
$("api-key").addEventListener("change", loadModel);
loadModel();
