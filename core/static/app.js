// nanorun chat page: conversations in localStorage, streaming answers over SSE, a stop button,
// and a small markdown renderer (no CDN, no network beyond this server).
"use strict";

const STORE_KEY = "nanorun.chat.v1";
const SETTINGS_KEY = "nanorun.chat.settings.v1";
const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------------------------------------
// Markdown: everything is HTML-escaped first; only the constructs below become markup.

const TOOL = { pyStart: "\uE000", pyEnd: "\uE001", outStart: "\uE002", outEnd: "\uE003" };

function escapeHtml(s) {
  return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
          .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
}

function emphasis(escaped) {
  return escaped
    .replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g,
             '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>')
    .replace(/\*\*(?=\S)([^\n]*?\S)\*\*/g, "<strong>$1</strong>")
    .replace(/__(?=\S)([^\n]*?\S)__/g, "<strong>$1</strong>")
    .replace(/(^|[^*\w])\*(?=[^\s*])([^*\n]*?[^\s*])\*(?![*\w])/g, "$1<em>$2</em>")
    .replace(/(^|[^_\w])_(?=[^\s_])([^_\n]*?[^\s_])_(?![_\w])/g, "$1<em>$2</em>");
}

// Inline: code spans and tool calls are protected from emphasis; the rest gets emphasis/links.
function renderInline(text) {
  const re = /(`+)([\s\S]*?)\1|\uE000([^\uE001]*)(?:\uE001|$)|\uE002([^\uE003]*)(?:\uE003|$)/g;
  let out = "", last = 0, m;
  while ((m = re.exec(text)) !== null) {
    out += emphasis(escapeHtml(text.slice(last, m.index)));
    if (m[1] !== undefined) out += "<code>" + escapeHtml(m[2]) + "</code>";
    else if (m[3] !== undefined)
      out += '<span class="tool" title="calculator call"><span class="label">calc</span>' + escapeHtml(m[3]) + "</span>";
    else out += '<span class="tool output" title="calculator result"><span class="label">=</span>' + escapeHtml(m[4]) + "</span>";
    last = re.lastIndex;
    if (m[0] === "") re.lastIndex++;
  }
  return out + emphasis(escapeHtml(text.slice(last)));
}

function renderMarkdown(src) {
  src = src.split("<|python_start|>").join(TOOL.pyStart).split("<|python_end|>").join(TOOL.pyEnd)
           .split("<|output_start|>").join(TOOL.outStart).split("<|output_end|>").join(TOOL.outEnd);
  const lines = src.replace(/\r\n?/g, "\n").split("\n");
  const html = [];
  const isBlockStart = (l) => /^(```|~~~)|^#{1,6}\s|^>\s?|^\s*([-*+]|\d+[.)])\s+|^(\*\*\*|---|___)\s*$/.test(l);
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if ((m = line.match(/^(```|~~~)\s*([\w+#.-]*)\s*$/))) {          // fenced code (may be unterminated while streaming)
      const fence = m[1], lang = m[2], body = [];
      i++;
      while (i < lines.length && !lines[i].startsWith(fence)) body.push(lines[i++]);
      i++;
      html.push('<div class="codeblock"><div class="code-head"><span>' + escapeHtml(lang || "code") +
                '</span><button class="copy" type="button">Copy</button></div><pre><code>' +
                escapeHtml(body.join("\n")) + "</code></pre></div>");
    } else if ((m = line.match(/^(#{1,6})\s+(.*)$/))) {
      const n = m[1].length;
      html.push(`<h${n}>` + renderInline(m[2]) + `</h${n}>`);
      i++;
    } else if (/^(\*\*\*|---|___)\s*$/.test(line)) {
      html.push("<hr>");
      i++;
    } else if (/^>\s?/.test(line)) {
      const body = [];
      while (i < lines.length && /^>\s?/.test(lines[i])) body.push(lines[i++].replace(/^>\s?/, ""));
      html.push("<blockquote>" + renderMarkdown(body.join("\n")) + "</blockquote>");
    } else if (/^\s*([-*+]|\d+[.)])\s+/.test(line)) {
      const ordered = /^\s*\d+[.)]\s+/.test(line), items = [];
      const itemRe = ordered ? /^\s*\d+[.)]\s+/ : /^\s*[-*+]\s+/;
      while (i < lines.length && lines[i].trim() !== "") {
        if (itemRe.test(lines[i])) items.push(lines[i].replace(itemRe, ""));
        else if (isBlockStart(lines[i]) && !/^\s+/.test(lines[i])) break;
        else items[items.length - 1] += "\n" + lines[i].trim();
        i++;
      }
      const tag = ordered ? "ol" : "ul";
      const start = ordered ? parseInt(line.trim(), 10) : 1;
      html.push(`<${tag}${ordered && start !== 1 ? ` start="${start}"` : ""}>` +
                items.map((it) => "<li>" + renderInline(it).replace(/\n/g, "<br>") + "</li>").join("") + `</${tag}>`);
    } else if (line.trim() === "") {
      i++;
    } else {
      const para = [];
      while (i < lines.length && lines[i].trim() !== "" && !isBlockStart(lines[i])) para.push(lines[i++]);
      html.push("<p>" + renderInline(para.join("\n")).replace(/\n/g, "<br>") + "</p>");
    }
  }
  return html.join("");
}

// ---------------------------------------------------------------------------------------------
// State: conversations in localStorage

let store = loadStore();
let active = null;          // {controller, chatId} while a reply streams

function loadStore() {
  try {
    const s = JSON.parse(localStorage.getItem(STORE_KEY));
    if (s && Array.isArray(s.chats)) return s;
  } catch (e) { /* corrupt or absent: start fresh */ }
  return { chats: [], current: null };
}
function save() {
  try { localStorage.setItem(STORE_KEY, JSON.stringify(store)); }
  catch (e) { console.warn("could not save conversations:", e); }
}
function currentChat() { return store.chats.find((c) => c.id === store.current) || null; }
function newChat() {
  const chat = { id: Date.now().toString(36) + Math.random().toString(36).slice(2, 7),
                 title: "New chat", messages: [], updated: Date.now() };
  store.chats.unshift(chat);
  store.current = chat.id;
  save();
  return chat;
}

function settings() {
  const num = (id, lo, hi, dflt, int) => {
    let v = Number($(id).value);
    if (!Number.isFinite(v)) v = dflt;
    v = Math.min(hi, Math.max(lo, v));
    return int ? Math.round(v) : v;
  };
  return { temperature: num("temperature", 0, 2, 0.8, false), top_k: num("top-k", 0, 200, 50, true),
           max_tokens: num("max-tokens", 1, 4096, 512, true) };
}

// ---------------------------------------------------------------------------------------------
// Rendering

function renderList() {
  const list = $("chat-list");
  list.replaceChildren();
  for (const chat of store.chats) {
    const item = document.createElement("div");
    item.className = "chat-item" + (chat.id === store.current ? " active" : "");
    item.dataset.id = chat.id;
    const title = document.createElement("span");
    title.className = "title";
    title.textContent = chat.title;
    const del = document.createElement("button");
    del.className = "delete";
    del.type = "button";
    del.title = "Delete this conversation";
    del.textContent = "✕";
    del.addEventListener("click", (e) => { e.stopPropagation(); deleteChat(chat.id); });
    item.append(title, del);
    item.addEventListener("click", () => selectChat(chat.id));
    list.append(item);
  }
}

function messageNode(msg, streaming) {
  const row = document.createElement("div");
  row.className = "msg " + msg.role;
  const bubble = document.createElement("div");
  bubble.className = "bubble";
  if (msg.role === "user") bubble.textContent = msg.content;
  else {
    bubble.innerHTML = renderMarkdown(msg.content);
    if (msg.error) {
      const err = document.createElement("p");
      err.className = "error";
      err.textContent = msg.error;
      bubble.append(err);
    }
    if (msg.stopped) {
      const note = document.createElement("p");
      note.className = "note";
      note.textContent = "stopped";
      bubble.append(note);
    }
    if (streaming) bubble.classList.add("cursor");
  }
  row.append(bubble);
  return row;
}

function renderMessages() {
  const box = $("messages");
  const chat = currentChat();
  box.replaceChildren();
  if (!chat || chat.messages.length === 0) {
    const empty = document.createElement("div");
    empty.className = "empty";
    empty.id = "empty";
    empty.innerHTML = "<h1></h1><p>A small model trained with nanorun. It makes things up — check what matters.</p>";
    empty.querySelector("h1").textContent = $("model-name").textContent;
    box.append(empty);
    return;
  }
  chat.messages.forEach((msg, i) => {
    const streaming = active && active.chatId === chat.id && i === chat.messages.length - 1;
    box.append(messageNode(msg, streaming));
  });
  const last = chat.messages[chat.messages.length - 1];
  if (!active && last.role === "assistant") {
    const actions = document.createElement("div");
    actions.className = "actions";
    const regen = document.createElement("button");
    regen.type = "button";
    regen.className = "regenerate";
    regen.textContent = "↻ Regenerate";
    regen.addEventListener("click", regenerate);
    actions.append(regen);
    box.append(actions);
  }
  box.scrollTop = box.scrollHeight;
}

let pendingFrame = 0;
function renderStreaming() {       // at most one re-render per animation frame while tokens arrive
  if (pendingFrame) return;
  pendingFrame = requestAnimationFrame(() => {
    pendingFrame = 0;
    const box = $("messages");
    const chat = currentChat();
    if (!chat || !active || active.chatId !== chat.id) return;
    const nearBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
    const last = box.querySelector(".msg:last-of-type");
    const node = messageNode(chat.messages[chat.messages.length - 1], true);
    if (last) last.replaceWith(node); else box.append(node);
    if (nearBottom) box.scrollTop = box.scrollHeight;
  });
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("status-dot").className = "dot " + (busy ? "busy" : "ok");
}

function render() { renderList(); renderMessages(); }

// ---------------------------------------------------------------------------------------------
// Talking to the server

async function send(text) {
  let chat = currentChat() || newChat();
  if (text !== null) {
    chat.messages.push({ role: "user", content: text });
    if (chat.title === "New chat") chat.title = text.replace(/\s+/g, " ").slice(0, 48);
  }
  // The server takes non-empty turns only: failed or empty replies are not resent.
  const history = chat.messages.filter((m) => m.content).map((m) => ({ role: m.role, content: m.content }));
  const reply = { role: "assistant", content: "" };
  chat.messages.push(reply);
  chat.updated = Date.now();
  store.chats = [chat, ...store.chats.filter((c) => c.id !== chat.id)];
  save();
  const controller = new AbortController();
  active = { controller, chatId: chat.id };
  setBusy(true);
  render();
  try {
    const res = await fetch("/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, signal: controller.signal,
      body: JSON.stringify({ messages: history, ...settings() }),
    });
    if (!res.ok) {
      let detail = res.status + " " + res.statusText;
      try { const body = await res.json(); if (body.detail) detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail); }
      catch (e) { /* not JSON */ }
      reply.error = "Error: " + detail;
      return;
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = JSON.parse(line.slice(5).trim());
          if (data.token !== undefined) { reply.content += data.token; renderStreaming(); }
          if (data.error) reply.error = "Error: " + data.error;
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") reply.stopped = true;
    else reply.error = "Error: " + e.message;
  } finally {
    active = null;
    if (!reply.content && !reply.error && !reply.stopped) reply.error = "The model returned nothing.";
    chat.updated = Date.now();
    save();
    setBusy(false);
    if (store.current === chat.id) render(); else renderList();
  }
}

function stop() { if (active) active.controller.abort(); }

function regenerate() {
  const chat = currentChat();
  if (!chat || active) return;
  while (chat.messages.length && chat.messages[chat.messages.length - 1].role === "assistant") chat.messages.pop();
  if (chat.messages.length) send(null);
}

function selectChat(id) {
  stop();
  store.current = id;
  save();
  render();
  $("input").focus();
}

function deleteChat(id) {
  if (active && active.chatId === id) stop();
  store.chats = store.chats.filter((c) => c.id !== id);
  if (store.current === id) store.current = store.chats.length ? store.chats[0].id : null;
  save();
  render();
}

function startNewChat() {
  stop();
  const chat = currentChat();
  if (!chat || chat.messages.length) newChat();   // reuse an empty chat rather than piling them up
  render();
  $("input").focus();
}

async function checkHealth() {
  try {
    const h = await (await fetch("/health")).json();
    if (!active) $("status-dot").className = "dot " + (h.ready ? "ok" : "down");
    $("status-dot").title = h.ready ? `ready · ${h.workers} worker(s) on ${[...new Set(h.devices)].join(", ")} · ${h.queued} queued` : (h.error || "loading…");
  } catch (e) {
    $("status-dot").className = "dot down";
    $("status-dot").title = "server unreachable";
  }
}

// ---------------------------------------------------------------------------------------------
// Wiring

function autosize() {
  const input = $("input");
  input.style.height = "auto";
  input.style.height = Math.min(200, input.scrollHeight) + "px";
}

document.addEventListener("DOMContentLoaded", () => {
  const input = $("input");
  try {
    const saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}");
    for (const [id, key] of [["temperature", "temperature"], ["top-k", "top_k"], ["max-tokens", "max_tokens"]])
      if (saved[key] !== undefined) $(id).value = saved[key];
  } catch (e) { /* ignore */ }
  for (const id of ["temperature", "top-k", "max-tokens"])
    $(id).addEventListener("change", () => localStorage.setItem(SETTINGS_KEY, JSON.stringify(settings())));

  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = input.value.trim();
    if (!text || active) return;
    input.value = "";
    autosize();
    send(text);
  });
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  input.addEventListener("input", autosize);
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", startNewChat);
  $("toggle-sidebar").addEventListener("click", () => {
    const app = $("app");
    if (window.matchMedia("(max-width: 720px)").matches) app.classList.toggle("sidebar-open");
    else app.classList.toggle("sidebar-hidden");
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && active) stop();
    if ((e.ctrlKey || e.metaKey) && e.shiftKey && e.key.toLowerCase() === "o") { e.preventDefault(); startNewChat(); }
  });
  $("messages").addEventListener("click", async (e) => {
    const button = e.target.closest(".copy");
    if (!button) return;
    const code = button.closest(".codeblock").querySelector("code").textContent;
    try { await navigator.clipboard.writeText(code); button.textContent = "Copied"; }
    catch (err) { button.textContent = "Copy failed"; }
    setTimeout(() => { button.textContent = "Copy"; }, 1200);
  });
  render();
  checkHealth();
  setInterval(checkHealth, 15000);
  input.focus();
});
