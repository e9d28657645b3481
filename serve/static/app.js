// The ragraph chat page: plain JavaScript, no framework, nothing loaded from elsewhere.
// The API key (auth on) is kept in this tab's sessionStorage and sent as `Authorization: Bearer`;
// it never goes in a URL. The open conversation's id is in the URL's fragment (#c=...), so a reload reopens it.
"use strict";

const KEY = "ragraph.key";
const HISTORY_TURNS = 2; // earlier question/answer pairs sent with a new question
const state = { model: "ragraph", conversation: null, turns: [], busy: false, authNeeded: false };
const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.code = err.code || null;
  }
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = sessionStorage.getItem(KEY);
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(method, path, body) {
  const res = await fetch(path, { method, headers: headers(body !== undefined),
                                  body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await res.json().catch(() => null);
  if (!res.ok) throw new ApiError(res.status, data);
  return data;
}

// --- errors and the key dialog -------------------------------------------------------------------

function showError(message) {
  const el = $("error");
  el.textContent = message;
  el.hidden = !message;
}

function askForKey(message) {
  state.authNeeded = true;
  $("change-key").hidden = false;
  const err = $("key-error");
  err.textContent = message || "";
  err.hidden = !message;
  const dialog = $("key-dialog");
  if (!dialog.open) dialog.showModal();
  $("key").focus();
}

// An answer of 401 means the key is missing or wrong: ask for one (and say why when one was sent).
function handle(error) {
  if (error instanceof ApiError && error.status === 401) {
    const had = sessionStorage.getItem(KEY);
    sessionStorage.removeItem(KEY);
    askForKey(had ? error.message : "");
    return;
  }
  showError(error.message || String(error));
}

$("key-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const value = $("key").value.trim();
  if (!value) return;
  sessionStorage.setItem(KEY, value);
  try {
    await start();
    $("key").value = "";
    $("key-error").hidden = true;
    $("key-dialog").close();
    $("question").focus();
  } catch (e) {
    sessionStorage.removeItem(KEY);
    const err = $("key-error");
    err.textContent = e.message || String(e);
    err.hidden = false;
    $("key").select();
  }
});

$("key-dialog").addEventListener("cancel", (ev) => { if (!sessionStorage.getItem(KEY)) ev.preventDefault(); });
$("change-key").addEventListener("click", () => askForKey(""));

// --- conversations -------------------------------------------------------------------------------

async function loadConversations() {
  const list = await api("GET", "/v1/conversations");
  const ul = $("conversations");
  ul.replaceChildren();
  for (const c of list.data) {
    const li = document.createElement("li");
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    open.textContent = c.title || "(untitled)";
    open.title = `${c.title || "(untitled)"}: ${c.turns} turn(s), ${new Date(c.updated * 1000).toLocaleString()}`;
    open.dataset.id = c.id;
    open.setAttribute("aria-current", String(c.id === state.conversation));
    open.addEventListener("click", () => openConversation(c.id).catch(handle));
    const del = document.createElement("button");
    del.type = "button";
    del.className = "delete";
    del.textContent = "\u2715";
    del.setAttribute("aria-label", `Delete conversation ${c.title || c.id}`);
    del.addEventListener("click", () => deleteConversation(c.id).catch(handle));
    li.append(open, del);
    ul.append(li);
  }
  $("conversations-empty").hidden = list.data.length > 0;
}

function setConversation(id) {
  state.conversation = id;
  history.replaceState(null, "", id ? "#c=" + encodeURIComponent(id) : location.pathname);
  for (const b of document.querySelectorAll("#conversations .open")) {
    b.setAttribute("aria-current", String(b.dataset.id === id));
  }
}

async function openConversation(id) {
  let conv;
  try {
    conv = await api("GET", "/v1/conversations/" + encodeURIComponent(id));
  } catch (e) {
    if (e instanceof ApiError && e.status === 404) { newConversation(); return; } // deleted or expired
    throw e;
  }
  setConversation(conv.id);
  state.turns = [];
  $("log").replaceChildren();
  for (const t of conv.turns) {
    const view = addTurn(t.question);
    view.answer.textContent = t.answer;
    finishTurn(view, t.rag, null, null);
    if (t.feedback) markFeedback(view, t.feedback.score, t.feedback.comment);
    state.turns.push({ question: t.question, answer: t.answer });
  }
  showError("");
}

async function deleteConversation(id) {
  await api("DELETE", "/v1/conversations/" + encodeURIComponent(id));
  if (id === state.conversation) newConversation();
  await loadConversations();
}

function newConversation() {
  setConversation(null);
  state.turns = [];
  $("log").replaceChildren();
  $("question").focus();
}

$("new-conversation").addEventListener("click", newConversation);

// --- one turn on the page ------------------------------------------------------------------------

function addTurn(question) {
  const node = $("turn-template").content.firstElementChild.cloneNode(true);
  node.querySelector(".question .text").textContent = question;
  $("log").append(node);
  return { node, answer: node.querySelector(".answer .text"), requestId: null };
}

function ms(v) { return v >= 1000 ? (v / 1000).toFixed(2) + " s" : Math.round(v) + " ms"; }

function finishTurn(view, rag, ttft, total) {
  const { node } = view;
  view.answer.removeAttribute("aria-busy");
  const meta = (rag && rag.metadata) || {};
  view.requestId = meta.request_id || null;
  node.dataset.requestId = view.requestId || "";
  const status = node.querySelector(".status");
  if (meta.status === "degraded") {
    status.textContent = "Degraded answer: made without " + ((meta.degraded || []).join(", ") || "a stage");
    status.hidden = false;
  } else if (meta.status === "sources_only") {
    status.textContent = "Sources only: the generator is unavailable, here is what was found";
    status.hidden = false;
  }
  const times = [];
  if (ttft !== null) times.push("first token " + ms(ttft));
  if (total !== null) times.push("total " + ms(total));
  if (meta.timings_ms && meta.timings_ms.total !== undefined) times.push("server " + ms(meta.timings_ms.total));
  if (meta.cached) times.push("cached");
  node.querySelector(".timings").textContent = times.join(" \u00b7 ");
  const sources = (rag && rag.sources) || [];
  const ol = node.querySelector(".source-list");
  ol.replaceChildren();
  for (const s of sources) {
    const li = document.createElement("li");
    li.value = s.index || ol.children.length + 1;
    const details = document.createElement("details");
    const summary = document.createElement("summary");
    const title = document.createElement("span");
    title.className = "title";
    title.textContent = s.title || s.document_id || "untitled";
    summary.append(title);
    if (s.heading_path && s.heading_path !== s.title) {
      const h = document.createElement("span");
      h.className = "heading";
      h.textContent = " \u2014 " + s.heading_path;
      summary.append(h);
    }
    if (s.cited) {
      const c = document.createElement("span");
      c.className = "cited";
      c.textContent = " (cited)";
      summary.append(c);
      li.classList.add("is-cited");
    }
    const quote = document.createElement("blockquote");
    quote.textContent = s.excerpt || "";
    details.append(summary, quote);
    li.append(details);
    ol.append(li);
  }
  node.querySelector(".sources").hidden = sources.length === 0;
  if (view.requestId) wireFeedback(view);
}

function markFeedback(view, score, comment) {
  const fb = view.node.querySelector(".feedback");
  fb.querySelector(".up").setAttribute("aria-pressed", String(score === 1));
  fb.querySelector(".down").setAttribute("aria-pressed", String(score === -1));
  fb.querySelector(".send-comment").disabled = !score;
  if (comment !== undefined && comment !== null) fb.querySelector(".comment").value = comment;
  view.score = score;
}

function wireFeedback(view) {
  const fb = view.node.querySelector(".feedback");
  fb.hidden = false;
  const say = fb.querySelector(".feedback-status");
  const send = async (score) => {
    say.textContent = "Sending\u2026";
    try {
      await api("POST", "/v1/feedback", { request_id: view.requestId, score,
                                          comment: fb.querySelector(".comment").value.trim() || null });
      markFeedback(view, score);
      say.textContent = "Thank you: feedback saved.";
    } catch (e) {
      say.textContent = "";
      handle(e);
    }
  };
  fb.querySelector(".up").addEventListener("click", () => send(1));
  fb.querySelector(".down").addEventListener("click", () => send(-1));
  fb.querySelector(".send-comment").addEventListener("click", () => { if (view.score) send(view.score); });
}

// --- asking: the answer streams in (SSE over fetch) ----------------------------------------------

async function* sseData(response) {
  const reader = response.body.getReader();
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
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (data) yield data;
    }
  }
}

async function ask(question) {
  showError("");
  if (!state.conversation) {
    const conv = await api("POST", "/v1/conversations", {});
    setConversation(conv.id);
  }
  const messages = [];
  for (const t of state.turns.slice(-HISTORY_TURNS)) {
    messages.push({ role: "user", content: t.question }, { role: "assistant", content: t.answer });
  }
  messages.push({ role: "user", content: question });
  const view = addTurn(question);
  view.node.scrollIntoView({ block: "end" });
  const t0 = performance.now();
  let ttft = null;
  let rag = null;
  let text = "";
  const res = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(true),
    body: JSON.stringify({ model: state.model, messages, stream: true, rag: { conversation_id: state.conversation } }),
  });
  if (!res.ok) {
    view.node.remove();
    throw new ApiError(res.status, await res.json().catch(() => null));
  }
  for await (const data of sseData(res)) {
    if (data === "[DONE]") break;
    let chunk;
    try { chunk = JSON.parse(data); } catch { continue; }
    if (chunk.error) throw new ApiError(500, chunk);
    const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
    if (delta && delta.content) {
      if (ttft === null) ttft = performance.now() - t0;
      text += delta.content;
      view.answer.textContent = text;
    }
    if (chunk.rag) rag = chunk.rag;
  }
  finishTurn(view, rag, ttft, performance.now() - t0);
  state.turns.push({ question, answer: text });
  view.node.scrollIntoView({ block: "end" });
  await loadConversations();
}

$("ask").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const box = $("question");
  const question = box.value.trim();
  if (!question || state.busy) return;
  state.busy = true;
  $("send").disabled = true;
  box.value = "";
  try {
    await ask(question);
  } catch (e) {
    if (!box.value) box.value = question; // not lost: try again
    handle(e);
  } finally {
    state.busy = false;
    $("send").disabled = false;
    box.focus();
  }
});

$("question").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    $("ask").requestSubmit();
  }
});

// --- start ---------------------------------------------------------------------------------------

async function start() {
  const [models] = await Promise.all([api("GET", "/v1/models"), loadConversations()]);
  $("change-key").hidden = !sessionStorage.getItem(KEY);
  if (models && models.data && models.data.length) state.model = models.data[0].id;
  const m = /^#c=(.+)$/.exec(location.hash);
  if (m && !state.conversation) await openConversation(decodeURIComponent(m[1]));
  document.body.dataset.ready = "true";
}

start().catch(handle);
