// lamina's chat page: a client of /v1/chat/completions like any other, in plain JavaScript (no build step, nothing
// loaded from another site). Model output is never inserted as HTML: the Markdown below builds DOM nodes and sets
// text with textContent only, and the page's Content-Security-Policy forbids inline scripts besides.
"use strict";

const KEYS = { conversation: "lamina.conversation", settings: "lamina.settings", apiKey: "lamina.apiKey" };
const $ = (id) => document.getElementById(id);

const state = {
  messages: [],      // {role: "user" | "assistant", content, stats?}
  model: null,       // the served model's id, from /v1/models
  controller: null,  // the running request's AbortController
  modelRequests: 0,  // /v1/models requests sent: only the latest one's answer counts (a key tried mid-request)
};

// ---------------------------------------------------------------------------------------------------------------
// Storage

function load(key, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(key));
    return value === null ? fallback : value;
  } catch (e) {
    return fallback;
  }
}

function save() {
  localStorage.setItem(KEYS.conversation, JSON.stringify(state.messages));
}

const SETTINGS = { system: "system", temperature: "temperature", top_p: "top-p", max_tokens: "max-tokens", seed: "seed" };

function saveSettings() {
  const settings = {};
  for (const [name, id] of Object.entries(SETTINGS)) settings[name] = $(id).value;
  localStorage.setItem(KEYS.settings, JSON.stringify(settings));
}

function restoreSettings() {
  const settings = load(KEYS.settings, {});
  for (const [name, id] of Object.entries(SETTINGS)) {
    if (typeof settings[name] === "string") $(id).value = settings[name];
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Markdown, as DOM nodes: fenced code blocks, headings, lists, block quotes, rules, paragraphs; inline code, bold,
// italic and http(s) links. Every piece of the text goes in through createTextNode / textContent.

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// Each pattern runs in time linear in its line (model output can be any text: no nested or overlapping repeats).
const FENCE = /^ {0,3}(`{3,}|~{3,})[ \t]*([^\s`]*)[ \t]*$/;
const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*))?$/;
const QUOTE = /^ {0,3}>[ \t]?(.*)$/;
const ITEM = /^([ \t]*)([-*+]|\d{1,9}[.)])[ \t]+(.*)$/;
const MAX_QUOTE_DEPTH = 8;

function isRule(line) {
  const compact = line.replace(/\s+/g, "");
  return /^ {0,3}\S/.test(line) && compact.length >= 3 && /^(?:-+|\*+|_+)$/.test(compact);
}

function headingText(text) {
  // "## Title ##" -> "Title"; "# Learn C#" keeps its "#": a closing run counts only after a space.
  let end = (text || "").trimEnd();
  let cut = end.length;
  while (cut > 0 && end[cut - 1] === "#") cut--;
  if (cut === 0 || /\s/.test(end[cut - 1])) end = end.slice(0, cut).trimEnd();
  return end;
}

function renderMarkdown(text, container, depth = 0) {
  container.replaceChildren();
  const lines = text.split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if ((m = line.match(FENCE))) {
      const fence = m[1], code = [];
      i++;
      while (i < lines.length && !(lines[i].trim().startsWith(fence[0].repeat(fence.length)) &&
                                   lines[i].trim().replace(/[`~]/g, "") === "")) {
        code.push(lines[i++]);
      }
      i++; // the closing fence (or the end of a reply still streaming)
      container.append(codeBlock(code.join("\n"), m[2]));
    } else if (!line.trim()) {
      i++;
    } else if ((m = line.match(HEADING))) {
      const h = el("h" + m[1].length);
      inline(headingText(m[2]), h);
      container.append(h);
      i++;
    } else if (isRule(line)) {
      container.append(el("hr"));
      i++;
    } else if (QUOTE.test(line) && depth < MAX_QUOTE_DEPTH) {
      const quoted = [];
      while (i < lines.length && (m = lines[i].match(QUOTE))) {
        quoted.push(m[1]);
        i++;
      }
      const q = el("blockquote");
      renderMarkdown(quoted.join("\n"), q, depth + 1);
      container.append(q);
    } else if ((m = line.match(ITEM))) {
      i = list(lines, i, container);
    } else {
      const para = [];
      para.push(lines[i++]); // a line no block claims (a quote past the depth limit too) starts a paragraph
      while (i < lines.length && lines[i].trim() && !startsBlock(lines[i])) para.push(lines[i++]);
      const p = el("p");
      para.forEach((l, k) => {
        if (k) p.append(el("br"));
        inline(l, p);
      });
      container.append(p);
    }
  }
}

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || isRule(line) || QUOTE.test(line) || ITEM.test(line);
}

function list(lines, i, container) {
  const first = lines[i].match(ITEM);
  const ordered = /\d/.test(first[2]);
  const node = el(ordered ? "ol" : "ul");
  if (ordered && parseInt(first[2], 10) !== 1) node.start = parseInt(first[2], 10);
  const indent = first[1].length;
  let item = null;
  while (i < lines.length) {
    const m = lines[i].match(ITEM);
    if (m && m[1].length <= indent + 1 && /\d/.test(m[2]) === ordered) {
      item = el("li");
      inline(m[3], item);
      node.append(item);
      i++;
    } else if (m && m[1].length > indent + 1 && item) {
      i = list(lines, i, item); // a nested list
    } else if (item && lines[i].trim() && /^\s+/.test(lines[i]) && !FENCE.test(lines[i])) {
      item.append(el("br"));
      inline(lines[i].trim(), item);
      i++;
    } else {
      break;
    }
  }
  container.append(node);
  return i;
}

function codeBlock(code, language) {
  const block = el("div", "codeblock");
  const bar = el("div", "bar");
  const copy = el("button", "copy", "Copy");
  copy.type = "button";
  copy.addEventListener("click", () => {
    if (!navigator.clipboard) { // browsers allow it on https and localhost only
      copy.textContent = "Copy needs https or localhost";
      return;
    }
    navigator.clipboard.writeText(code).then(
      () => { copy.textContent = "Copied"; },
      () => { copy.textContent = "Copy failed"; },
    );
  });
  bar.append(el("span", "language", language || "code"), copy);
  const pre = el("pre");
  pre.append(el("code", language ? "language-" + language : "", code));
  block.append(bar, pre);
  return block;
}

// Spans are bounded (at most ~1,000 characters between delimiters), so a line full of unmatched openers costs a
// bounded scan per opener, not one to the end of the line.
const INLINE = /(`{1,8})([^`]|[^`][^]{0,1000}?[^`])\1(?!`)|\*\*(?=\S)([^]{0,1000}?\S)\*\*|__(?=\S)([^]{0,1000}?\S)__|\*(?=[^\s*])([^*]{0,1000}?[^\s*])\*|\[([^\]]{1,1000})\]\(([^)\s]{1,2000})\)/g;

function inline(text, parent) {
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) parent.append(document.createTextNode(text.slice(last, m.index)));
    if (m[1]) {
      parent.append(el("code", "", m[2]));
    } else if (m[3] !== undefined || m[4] !== undefined) {
      const strong = el("strong");
      inline(m[3] ?? m[4], strong);
      parent.append(strong);
    } else if (m[5] !== undefined) {
      const em = el("em");
      inline(m[5], em);
      parent.append(em);
    } else if (/^https?:\/\//i.test(m[7])) {
      const a = el("a");
      a.href = m[7];
      a.target = "_blank";
      a.rel = "noopener noreferrer";
      inline(m[6], a);
      parent.append(a);
    } else {
      parent.append(document.createTextNode(m[0])); // not a web link: shown as written
    }
    last = m.index + m[0].length;
  }
  if (last < text.length) parent.append(document.createTextNode(text.slice(last)));
}

// ---------------------------------------------------------------------------------------------------------------
// The conversation on the page

function statsText(stats) {
  if (!stats || typeof stats !== "object") return "";
  const num = (v) => typeof v === "number" && Number.isFinite(v);
  const parts = [];
  if (num(stats.completion_tokens)) parts.push(`${stats.completion_tokens} tokens`);
  if (num(stats.tokens_per_s)) parts.push(`${stats.tokens_per_s.toFixed(1)} tokens/s`);
  if (num(stats.ttft_ms)) parts.push(`first token ${Math.round(stats.ttft_ms)} ms`);
  if (num(stats.prompt_tokens)) parts.push(`prompt ${stats.prompt_tokens} tokens`);
  if (stats.finish_reason === "length") parts.push("cut at max tokens");
  else if (stats.ended_early) parts.push(`ended early (${stats.finish_reason || "the connection closed"})`);
  return parts.join(" · ");
}

function messageNode(message) {
  const node = el("div", `message ${message.role}`);
  node.append(el("div", "role", message.role));
  const body = el("div", "body");
  node.append(body);
  node.append(el("div", "stats"));
  fill(node, message);
  return node;
}

function fill(node, message) {
  const body = node.querySelector(".body");
  if (message.role === "assistant") renderMarkdown(message.content, body);
  else body.textContent = message.content;
  const stats = node.querySelector(".stats");
  stats.textContent = statsText(message.stats);
  if (message.stats && message.stats.stopped) stats.append(el("span", "stopped", " · stopped"));
  node.classList.toggle("pending", !!message.pending);
}

function renderAll() {
  const box = $("messages");
  box.replaceChildren();
  if (!state.messages.length) box.append(el("p", "empty", "Send a message to start. Enter sends; Shift+Enter starts a new line."));
  for (const message of state.messages) box.append(messageNode(message));
  box.scrollTop = box.scrollHeight;
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

// ---------------------------------------------------------------------------------------------------------------
// Talking to the server

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = localStorage.getItem(KEYS.apiKey);
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function errorText(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = `${response.status}: ${body.error.message}`;
  } catch (e) { /* not JSON: the status says it */ }
  if (response.status === 401) askForKey();
  return `The server refused the request (${message})`;
}

function askForKey() {
  $("key-form").hidden = false;
  $("api-key").focus();
}

async function loadModel() {
  const mine = ++state.modelRequests;
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (mine !== state.modelRequests) return;
    if (!response.ok) {
      showError(await errorText(response));
      return;
    }
    const models = await response.json();
    state.model = models.data[0].id;
    $("model-name").textContent = state.model;
    $("key-form").hidden = true;
    showError("");
  } catch (e) {
    if (mine === state.modelRequests) showError(`Cannot reach the server: ${e.message}`);
  }
}

function number(id, parse) {
  const name = $(id).labels[0] ? $(id).labels[0].firstChild.textContent.trim() : id;
  if ($(id).validity.badInput) throw new Error(`${name} must be a number`);
  const text = $(id).value.trim();
  if (text === "") return undefined;
  const value = parse(text);
  if (!Number.isFinite(value)) throw new Error(`${name} must be a number, not "${text}"`);
  return value;
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  for (const m of state.messages) if (!m.pending) messages.push({ role: m.role, content: m.content });
  const body = { messages, stream: true, stream_options: { include_usage: true } };
  if (state.model) body.model = state.model;
  const settings = { temperature: number("temperature", parseFloat), top_p: number("top-p", parseFloat),
                     max_tokens: number("max-tokens", Number), seed: number("seed", Number) };
  for (const [name, value] of Object.entries(settings)) if (value !== undefined) body[name] = value;
  return body;
}

async function send() {
  const text = $("input").value;
  if (!text.trim() || state.controller) return;
  let body;
  state.messages.push({ role: "user", content: text });
  try {
    body = requestBody();
  } catch (e) {
    state.messages.pop();
    showError(e.message);
    return;
  }
  $("input").value = "";
  showError("");
  const reply = { role: "assistant", content: "", pending: true };
  state.messages.push(reply);
  renderAll();
  save(); // a reload mid-reply finds the exchange (the reply as far as it got, marked stopped)
  let saved = performance.now();
  const node = $("messages").lastElementChild;
  const controller = (state.controller = new AbortController());
  setBusy(true);
  const started = performance.now();
  let first = null, last = null, tokens = 0, usage = null, finish = null, done = false;
  const update = () => {
    const count = usage ? usage.completion_tokens : tokens;
    const perSecond = count > 1 && last > first ? (count - 1) / ((last - first) / 1000) : null;
    reply.stats = { completion_tokens: count, tokens_per_s: perSecond,
                    ttft_ms: first === null ? null : first - started, prompt_tokens: usage ? usage.prompt_tokens : null,
                    finish_reason: finish, stopped: reply.stats ? reply.stats.stopped : false,
                    ended_early: reply.stats ? reply.stats.ended_early : false };
    fill(node, reply);
    if (performance.now() - saved > 1000) {
      save();
      saved = performance.now();
    }
    const box = $("messages");
    if (box.scrollHeight - box.scrollTop - box.clientHeight < 120) box.scrollTop = box.scrollHeight;
  };
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) {
      const message = await errorText(response);
      takeBack(reply, text);  // the exchange did not happen: the text back to edit or resend
      showError(message);
      return;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const read = await reader.read();  // not destructured: `done` above is the stream's [DONE]
      if (read.done) break;
      const value = read.value;
      buffer += decoder.decode(value, { stream: true });
      const events = buffer.split("\n");
      buffer = events.pop();
      for (const line of events) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6).trim();
        if (data === "[DONE]") {
          done = true;
          continue;
        }
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;
        const delta = choice.delta || {};
        if (delta.content) {
          const now = performance.now();
          if (first === null) first = now;
          last = now;
          tokens += 1;
          reply.content += delta.content;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
        update();
      }
    }
    if (!done) reply.stats = { ...(reply.stats || {}), ended_early: true, finish_reason: finish };
    else if (finish && !["stop", "length", "tool_calls"].includes(finish)) reply.stats.ended_early = true;
  } catch (e) {
    if (e.name !== "AbortError") showError(`The reply failed: ${e.message}`);
    if (!reply.content) { // nothing came: as if not sent, the text back
      takeBack(reply, text);
    } else if (e.name === "AbortError") {
      reply.stats = { ...(reply.stats || {}), stopped: true };
    }
  } finally {
    controller.abort(); // whatever ended the loop, the server stops generating (a no-op after [DONE])
    if (state.controller === controller) state.controller = null;
    setBusy(false);
    if (state.messages.includes(reply)) {
      delete reply.pending;
      update();
      save();
    }
  }
}

function takeBack(reply, text) {
  const at = state.messages.indexOf(reply);
  if (at < 1) return;
  state.messages.splice(at - 1, 2);
  if (!$("input").value) $("input").value = text; // not over what was typed meanwhile
  renderAll();
  save();
}

function stop() {
  if (state.controller) state.controller.abort(); // closes the connection: the server cancels the request
}

function newChat() {
  stop();
  state.controller = null; // the old reply's own ending no longer matters: a new message may go at once
  state.messages = [];
  save();
  renderAll();
  showError("");
  $("input").focus();
}

function restoreConversation() {
  const stored = load(KEYS.conversation, []);
  const messages = (Array.isArray(stored) ? stored : []).filter(
    (m) => m && typeof m === "object" && (m.role === "user" || m.role === "assistant") && typeof m.content === "string",
  );
  for (const m of messages) {
    if (m.stats !== undefined && (typeof m.stats !== "object" || m.stats === null)) delete m.stats;
    if (m.pending) { // the page was left mid-reply: keep what came
      delete m.pending;
      m.stats = { ...(m.stats || {}), stopped: true };
    }
  }
  state.messages = messages;
  try {
    renderAll();
  } catch (e) { // whatever is stored, the page stays usable
    state.messages = [];
    renderAll();
    showError(`The stored conversation could not be shown, so it was set aside: ${e.message}`);
  }
}

function main() {
  restoreSettings();
  restoreConversation();
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  for (const id of Object.values(SETTINGS)) $(id).addEventListener("input", saveSettings);
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    localStorage.setItem(KEYS.apiKey, $("api-key").value.trim());
    $("api-key").value = "";
    loadModel();
  });
  loadModel();
}

main();
