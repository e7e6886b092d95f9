// The triomail web view. Every value from a message goes into the DOM through
// textContent or an attribute, never as HTML; the HTML part is only ever the src of
// a sandboxed iframe that the server serves with its own Content-Security-Policy.
"use strict";

const PAGE = 50;
const state = { start: 0, query: "", selected: null, remote: false, tab: "html", total: 0 };
const $ = (id) => document.getElementById(id);

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function api(path) {
  return "api/" + path;
}

function messageUrl(id, rest) {
  return api("messages/" + encodeURIComponent(id) + (rest || ""));
}

function size(octets) {
  if (octets < 1024) return octets + " B";
  if (octets < 1024 * 1024) return (octets / 1024).toFixed(1) + " kB";
  return (octets / 1024 / 1024).toFixed(1) + " MB";
}

function when(seconds) {
  const date = new Date(seconds * 1000);
  const today = date.toDateString() === new Date().toDateString();
  return today ? date.toLocaleTimeString() : date.toLocaleString();
}

function envelopeOr(value, header) {
  return value === null || value === undefined ? header : value;
}

async function loadList() {
  const params = new URLSearchParams({ q: state.query, start: state.start, limit: PAGE });
  const response = await fetch(api("messages?" + params));
  if (!response.ok) return;
  const page = await response.json();
  state.total = page.total;
  const body = $("list").tBodies[0];
  body.replaceChildren(...page.messages.map(row));
  const shown = page.messages.length;
  const total = page.total === null ? "more" : page.total;
  $("count").textContent = shown ? `${state.start + 1}–${state.start + shown} of ${total}` : "no messages";
  $("newer").disabled = state.start === 0;
  $("older").disabled = page.total !== null && state.start + shown >= page.total;
}

function row(message) {
  // Three cells, two lines each, as a mail client's list: who, what, when.
  const tr = el("tr");
  tr.dataset.id = message.id;
  if (message.id === state.selected) tr.classList.add("selected");
  const who = el("td");
  who.append(el("div", message.sender || "(no From)", "from"));
  const envelope = message.mail_from === null
    ? "To: " + message.to
    : `${message.mail_from || "<>"} → ${message.rcpt_to.join(", ")}`;
  who.append(el("div", envelope, "envelope"));
  const what = el("td");
  what.append(el("div", message.subject || "(no subject)", "subject"));
  const markers = el("div", null, "markers");
  if (message.attachments) markers.append(el("span", "📎 " + message.attachments, "marker attach"));
  for (const code of message.problems) markers.append(el("span", code, "marker problem"));
  what.append(markers);
  const when_ = el("td", null, "when");
  when_.append(el("div", when(message.time)), el("div", size(message.size), "size"));
  tr.append(who, what, when_);
  tr.addEventListener("click", () => openMessage(message.id));
  return tr;
}

async function openMessage(id) {
  const response = await fetch(messageUrl(id));
  if (!response.ok) {
    closeMessage();
    return;
  }
  const message = await response.json();
  state.selected = id;
  state.remote = false;
  for (const tr of $("list").tBodies[0].rows) tr.classList.toggle("selected", tr.dataset.id === id);
  $("view").hidden = false;
  $("v-subject").textContent = message.subject || "(no subject)";
  const summary = $("v-summary");
  summary.replaceChildren();
  const facts = [
    ["From", message.sender],
    ["To", message.to],
    ["Envelope", message.envelope ? `${message.envelope.mail_from} → ${message.envelope.rcpt_to.join(", ")}` : "not recorded (file)"],
    ["Received", new Date(message.time * 1000).toLocaleString()],
    ["Size", size(message.size)],
  ];
  for (const [name, value] of facts) summary.append(el("dt", name), el("dd", value));

  $("v-html").hidden = !message.has_html;
  $("v-no-html").hidden = message.has_html;
  $("v-html").src = message.has_html ? messageUrl(id, "/html") : "about:blank";
  $("remote").disabled = !message.has_html;
  $("v-text").textContent = message.text === null ? "No text part." : message.text;
  table($("v-headers"), message.headers);
  const envelope = message.envelope;
  table($("v-session"), envelope ? [
    ["MAIL FROM", envelope.mail_from || "<>"],
    ["RCPT TO", envelope.rcpt_to.join(", ")],
    ["TLS", envelope.tls ? "yes" : "no"],
    ["AUTH", envelope.authenticated_as === null ? "no" : envelope.authenticated_as],
    ["Client", envelope.peer],
    ["EHLO", envelope.helo],
    ["Transfer", envelope.transfer],
  ] : [["Envelope", "not recorded: this message was read from a file"]]);
  const lint = $("v-lint");
  lint.replaceChildren(...message.findings.map((f) => {
    const item = el("li", `${f.code}: ${f.text}`, f.ok === true ? "ok" : f.ok === false ? "problem" : "info");
    return item;
  }));
  $("v-source").textContent = "";
  $("v-raw-link").href = messageUrl(id, "/raw");
  const parts = $("v-parts");
  parts.replaceChildren(...message.parts.map((part) => {
    const item = el("li");
    const link = el("a", part.filename);
    link.href = messageUrl(id, "/parts/" + part.index);
    link.setAttribute("download", part.filename);
    item.append(link, el("span", ` ${part.content_type}, ${size(part.size)}`));
    return item;
  }));
  showTab(state.tab);
}

function table(node, rows) {
  node.replaceChildren(...rows.map(([name, value]) => {
    const tr = el("tr");
    tr.append(el("td", name), el("td", value));
    return tr;
  }));
}

async function showTab(name) {
  state.tab = name;
  for (const button of document.querySelectorAll("#tabs button")) {
    button.classList.toggle("active", button.dataset.tab === name);
  }
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.id === "tab-" + name);
  if (name === "source" && state.selected !== null && !$("v-source").textContent) {
    const response = await fetch(messageUrl(state.selected, "/raw"));
    $("v-source").textContent = await response.text();
  }
}

function closeMessage() {
  state.selected = null;
  $("view").hidden = true;
  $("v-html").src = "about:blank";
}

async function remove(path) {
  await fetch(path, { method: "DELETE" });
}

function listen() {
  const events = new EventSource(api("events"));
  let pending = null;
  let connected = false;
  events.addEventListener("hello", () => {
    $("live").classList.add("on");
    // After a reconnect (the browser retries on its own) catch up on what was missed.
    if (connected) refresh();
    connected = true;
  });
  events.addEventListener("change", () => {
    // Many messages may arrive at once: one reload per burst.
    if (pending === null) pending = setTimeout(() => { pending = null; refresh(); }, 100);
  });
  events.addEventListener("error", () => $("live").classList.remove("on"));
}

async function refresh() {
  await loadList();
  // Was the open message deleted (elsewhere)? HEAD of its source is the cheap question.
  if (state.selected === null) return;
  const still = await fetch(messageUrl(state.selected, "/raw"), { method: "HEAD" });
  if (!still.ok) closeMessage();
}

function setup() {
  let typing = null;
  $("search").addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => { state.query = $("search").value.trim(); state.start = 0; loadList(); }, 200);
  });
  $("newer").addEventListener("click", () => { state.start = Math.max(0, state.start - PAGE); loadList(); });
  $("older").addEventListener("click", () => { state.start += PAGE; loadList(); });
  $("delete-all").addEventListener("click", async () => { await remove(api("messages")); closeMessage(); refresh(); });
  $("delete").addEventListener("click", async () => {
    if (state.selected === null) return;
    await remove(messageUrl(state.selected));
    closeMessage();
    refresh();
  });
  $("remote").addEventListener("click", () => {
    if (state.selected === null) return;
    state.remote = true;
    $("v-html").src = messageUrl(state.selected, "/html?remote=1");
    $("remote").disabled = true;
  });
  for (const button of document.querySelectorAll("#tabs button")) {
    button.addEventListener("click", () => showTab(button.dataset.tab));
  }
  loadList();
  listen();
}

document.addEventListener("DOMContentLoaded", setup);
