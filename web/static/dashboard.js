// cake-swarm dashboard: draws the node's state (pushed over /ws/state, never polled) and streams chats
// over /ws/chat. Plain DOM, no build step; every piece of text goes in through textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const PALETTE = ["#38bdf8", "#a78bfa", "#34d399", "#fbbf24", "#f472b6", "#fb923c", "#2dd4bf", "#e879f9"];
const CHAT_HINT = "Ask the swarm something. A model without a chat template (like the demo) continues your text.";
const STATE_PILL = { loaded: "pill-ok", fetching: "pill-info", loading: "pill-warn", failed: "pill-bad", idle: "pill-grey" };

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "style") for (const [p, x] of Object.entries(v)) el.style.setProperty(p, x);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined && c !== false) el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

const fmt = {
  bytes(n) {
    n = Number(n) || 0;
    for (const [unit, scale] of [["GiB", 2 ** 30], ["MiB", 2 ** 20], ["KiB", 2 ** 10]]) {
      if (n >= scale) return (n / scale).toFixed(n / scale >= 100 ? 0 : n / scale >= 10 ? 1 : 2) + " " + unit;
    }
    return n + " B";
  },
  ms(s) { return s === null || s === undefined || !(s > 0) ? "–" : s < 1 ? Math.round(s * 1000) + " ms" : s.toFixed(2) + " s"; },
  rate(tps) { return tps > 0 ? tps.toFixed(tps >= 100 ? 0 : 1) : "–"; },
  layers(start, end) { return end - start === 1 ? `${start}` : `${start}–${end - 1}`; },
};

// --- the state feed ---------------------------------------------------------------------------------

let state = JSON.parse($("initial-state").textContent);

function wsUrl(path) {
  return (location.protocol === "https:" ? "wss://" : "ws://") + location.host + path;
}

function connectState(delay = 500) {
  const ws = new WebSocket(wsUrl("/ws/state"));
  ws.onopen = () => { $("link-pill").hidden = true; delay = 500; };
  ws.onmessage = (e) => { state = JSON.parse(e.data); render(state); };
  ws.onclose = () => {
    $("link-pill").hidden = false;
    setTimeout(() => connectState(Math.min(delay * 2, 8000)), delay);
  };
}

function colors(s) {
  const ids = [...s.plan.map((st) => st.node_id), ...s.nodes.map((n) => n.id)];
  const out = {};
  for (const id of ids) if (!(id in out)) out[id] = PALETTE[Object.keys(out).length % PALETTE.length];
  return out;
}

function render(s) {
  const color = colors(s);
  renderHeader(s);
  renderBanners(s);
  renderStats(s);
  renderPipeline(s, color);
  renderNodes(s, color);
  renderDownloads(s, color);
  renderTopology(s);
}

function setPill(el, text, kind) {
  el.textContent = text;
  el.className = "pill " + kind;
}

function renderHeader(s) {
  const model = s.web.model || "";
  $("model-id").textContent = model ? "model " + (model.length > 16 ? model.slice(0, 12) + "…" : model) : "no model yet";
  $("model-id").title = model;
  setPill($("ready-pill"), s.ready ? `ready · epoch ${s.epoch}` : "not ready", s.ready ? "pill-ok" : "pill-warn");
  if (s.cluster.open) setPill($("cluster-pill"), "OPEN swarm · no cluster key", "pill-bad");
  else setPill($("cluster-pill"), `closed swarm · ${s.cluster.id}`, "pill-ok");
}

function renderBanners(s) {
  const banners = [];
  const banner = (kind, title, detail) => h("div", { class: "banner banner-" + kind, role: "alert" },
    h("strong", {}, title), h("span", { class: "detail" }, detail));
  if (s.cluster.open) {
    banners.push(banner("warn", "Open swarm.", "No cluster key: any machine on this network can join the swarm and " +
      "download its shards. Start every node with --cluster-key (or $CAKE_SWARM_KEY) to close it."));
  }
  if (!s.source_present) {
    banners.push(banner("bad", "No model source.", "No node holding the model is reachable. Start a node with " +
      "--model, or bring the model's node back."));
  }
  if (s.plan_error) banners.push(banner("bad", "No plan.", s.plan_error));
  if (s.topology_error) banners.push(banner("warn", "Topology file edit refused.", s.topology_error));
  if (s.topology && s.topology.message) banners.push(banner("warn", "Pinned topology not in force.", s.topology.message));
  const leaving = s.nodes.filter((n) => n.leaving).map((n) => n.name);
  if (leaving.length) banners.push(banner("info", "Leaving.", `${leaving.join(", ")} hand${leaving.length > 1 ? "" : "s"} ` +
    "their layers and sessions over, then go."));
  $("banners").replaceChildren(...banners);
}

function renderStats(s) {
  const live = s.web.live, stats = s.stats;
  const tps = $("stat-tps");
  if (live.tps > 0) {
    tps.textContent = fmt.rate(live.tps);
    tps.className = "value live";
    $("stat-tps-sub").textContent = live.active ? `live · ${live.active} generating here` : "live";
  } else {
    tps.textContent = fmt.rate(live.last_tps ?? stats.last_tps);
    tps.className = "value";
    $("stat-tps-sub").textContent = (live.last_tps ?? stats.last_tps) > 0 ? "last request (decode)" : "no request yet";
  }
  const ttft = live.last_ttft_s ?? stats.last_ttft_s;
  $("stat-ttft").textContent = fmt.ms(ttft);
  $("stat-ttft-sub").textContent = ttft > 0 ? "last request" : "";
  $("stat-sessions").textContent = `${s.sessions} / ${s.web.max_batch}`;
  const onStages = s.nodes.filter((n) => n.sessions).map((n) => `${n.name} ${n.sessions} (batch ${n.batch})`);
  const waiting = s.waiting ? `${s.waiting} waiting (queue ${s.web.max_queue}) · ` : "";
  $("stat-sessions-sub").textContent = waiting + (onStages.length ? "on stages: " + onStages.join(" · ") : "through this node");
  $("stat-served").textContent = String(stats.requests);
  $("stat-served-sub").textContent = `requests · ${stats.tokens} tokens`;
}

function renderPipeline(s, color) {
  const stages = s.plan;
  if (!stages.length) {
    $("pipeline-bar").replaceChildren();
    $("pipeline").replaceChildren(h("li", { class: "muted empty" }, "No plan yet."));
    $("pipeline-sub").textContent = "";
    return;
  }
  const total = stages[stages.length - 1].end;
  const nodes = Object.fromEntries(s.nodes.map((n) => [n.id, n]));
  $("pipeline-sub").textContent = `${total} layers on ${stages.length} node${stages.length > 1 ? "s" : ""} · epoch ${s.epoch}`;
  $("pipeline-bar").replaceChildren(...stages.map((st) => h("span", {
    title: `${st.name}: layers ${fmt.layers(st.start, st.end)}`,
    style: { width: `${(100 * (st.end - st.start)) / total}%`, background: color[st.node_id] },
  })));
  const items = [];
  stages.forEach((st, i) => {
    if (i) items.push(h("li", { class: "arrow", "aria-hidden": "true" }, "→"));
    const n = nodes[st.node_id];
    items.push(h("li", { class: "stage" + (n ? "" : " gone"), style: { "--c": color[st.node_id] }, "data-node": st.name },
      h("div", { class: "name" }, h("span", { class: "dot", style: { "--c": color[st.node_id] } }), st.name,
        st.first && h("span", { class: "tag" }, "embedding"), st.last && h("span", { class: "tag" }, "head")),
      h("div", { class: "layers" }, `layers ${fmt.layers(st.start, st.end)}`),
      h("div", { class: "meta" }, `${fmt.bytes(st.bytes)} planned · ${n ? n.state : "left the swarm"}`)));
  });
  $("pipeline").replaceChildren(...items);
}

function renderNodes(s, color) {
  $("nodes-sub").textContent = `${s.nodes.length} in the swarm`;
  const order = Object.fromEntries(s.plan.map((st, i) => [st.node_id, i]));
  const nodes = [...s.nodes].sort((x, y) => (order[x.id] ?? 1e9) - (order[y.id] ?? 1e9) || x.name.localeCompare(y.name));
  const rows = nodes.map((n) => {
    const used = Number(n.used) || 0, budget = Number(n.budget) || 0;
    const pct = budget ? Math.min(100, (100 * used) / budget) : 0;
    const tags = [n.id === s.node.id && "this node", n.model && "model source", n.coordinator && "coordinator"].filter(Boolean);
    return h("tr", { "data-node": n.name },
      h("td", { class: "first-cell" }, h("div", { class: "who" }, h("span", { class: "dot", style: { "--c": color[n.id] } }),
        n.name, ...tags.map((t) => h("span", { class: "tag" }, t)))),
      h("td", { "data-label": "Address", class: "addr" }, `${n.addr}:${n.port}`),
      h("td", { "data-label": "Backend", title: (n.kernels && n.kernels.why) || "" }, n.backend,
        n.kernels && n.kernels.linear ? h("div", { class: "muted small" }, n.kernels.linear) : null),
      h("td", { "data-label": "Memory", class: "mem" }, h("div", {}, `${fmt.bytes(used)} / ${fmt.bytes(budget)}`,
        h("div", { class: "bar" }, h("span", { style: { width: pct + "%", background: color[n.id] } })))),
      h("td", { "data-label": "Layers" }, n.layers && n.layers.length ? fmt.layers(n.layers[0], n.layers[1]) : "–"),
      h("td", { "data-label": "State" }, h("span", { class: "pill state " + (STATE_PILL[n.state] || "pill-grey") }, n.state || "?")),
      h("td", { "data-label": "Speed" }, `${Number(n.speed).toFixed(2)} GB/s`),
      h("td", { "data-label": "Sessions" }, String(n.sessions ?? 0) + (n.batch > 1 ? ` · batch ${n.batch}` : "")));
  });
  $("nodes").replaceChildren(...rows);
  const refused = Object.entries(s.refused || {});
  $("refused").replaceChildren(...refused.map(([who, why]) => h("div", {}, `refused ${who}: ${JSON.stringify(why)}`)));
}

function renderDownloads(s, color) {
  const rows = [];
  for (const n of s.nodes) {
    for (const [shard, d] of Object.entries(n.downloads || {})) {
      const [a, b] = shard.split("-").map(Number);
      const pct = d.total ? (100 * d.done) / d.total : 0;
      const done = d.total && d.done >= d.total;
      rows.push(h("div", { class: "download" + (done ? " done" : "") },
        h("div", { class: "what" }, h("span", { class: "dot", style: { "--c": color[n.id] } }), " ",
          `${n.name} · layers ${Number.isFinite(b) ? fmt.layers(a, b) : shard}`),
        h("div", { class: "bar big" }, h("span", { style: { width: pct.toFixed(1) + "%" } })),
        h("div", { class: "numbers" }, `${fmt.bytes(d.done)} / ${fmt.bytes(d.total)} · ` +
          (done ? "done" : `${pct.toFixed(0)}% · ${fmt.bytes(d.rate)}/s`))));
    }
  }
  $("downloads").replaceChildren(...(rows.length ? rows : [h("p", { class: "muted empty" }, "No shard downloads: every stage is loaded from the model's own files.")]));
}

// --- topology ---------------------------------------------------------------------------------------

let topologyShown = null;

function renderTopology(s) {
  const area = $("topology");
  const edited = topologyShown !== null && area.value !== topologyShown;
  if (!edited && document.activeElement !== area) {
    area.value = s.web.topology;
    area.rows = Math.max(6, s.web.topology.split("\n").length);
    topologyShown = s.web.topology;
  }
}

$("topo-reset").onclick = () => {
  $("topology").value = state.web.topology;
  topologyShown = state.web.topology;
  $("topo-errors").replaceChildren();
  $("topo-status").textContent = "";
};

$("topo-apply").onclick = async () => {
  const status = $("topo-status"), errors = $("topo-errors");
  status.textContent = "applying…";
  errors.replaceChildren();
  try {
    const r = await fetch("/api/topology", { method: "PUT", headers: { "Content-Type": "application/yaml" }, body: $("topology").value });
    const body = await r.json();
    if (r.ok) {
      status.textContent = `applied: epoch ${body.epoch}`;
      $("topology").value = body.yaml;
      topologyShown = body.yaml;
    } else {
      status.textContent = `not applied (${r.status})`;
      const items = body.errors || [{ line: null, message: body.error ? body.error.message : r.statusText }];
      errors.replaceChildren(...items.map((e) => h("li", {}, e.line ? h("code", {}, `line ${e.line}`) : "", e.line ? ": " : "", e.message)));
    }
  } catch (e) {
    status.textContent = "not applied: " + e;
  }
};

// --- chat -------------------------------------------------------------------------------------------

const chat = { ws: null, history: [], bubble: null };

function openChat() {
  if (chat.ws && chat.ws.readyState === WebSocket.OPEN) return Promise.resolve(chat.ws);
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(wsUrl("/ws/chat"));
    ws.onopen = () => { chat.ws = ws; resolve(ws); };
    ws.onerror = () => reject(new Error("cannot reach /ws/chat"));
    ws.onmessage = (e) => onChatFrame(JSON.parse(e.data));
    ws.onclose = () => { if (chat.ws === ws) chat.ws = null; if (chat.bubble) finishBubble(null, "stopped"); };
  });
}

function addBubble(role, text) {
  $("chat-empty")?.remove();
  const body = h("div", { class: "text" }, text);
  const bubble = h("div", { class: "msg " + role }, body);
  $("messages").append(bubble);
  $("messages").scrollTop = $("messages").scrollHeight;
  return bubble;
}

function finishBubble(done, note, failed = false) {
  const bubble = chat.bubble;
  chat.bubble = null;
  bubble.classList.remove("streaming");
  if (failed) bubble.classList.add("error");
  let meta = note;
  if (done) {
    const t = done.timings || {};
    meta = `${done.usage.completion_tokens} tokens · ${fmt.rate(t.decode_tps)} tok/s · first token ${fmt.ms(t.ttft_s)} · ${done.finish_reason}`;
    chat.history.push({ role: "assistant", content: bubble.querySelector(".text").textContent });
  }
  bubble.append(h("div", { class: "meta" }, meta));
  setSending(false);
}

function onChatFrame(frame) {
  if (!chat.bubble) return;
  if (frame.type === "token") {
    chat.bubble.querySelector(".text").append(frame.text);
    $("messages").scrollTop = $("messages").scrollHeight;
  } else if (frame.type === "done") {
    finishBubble(frame);
  } else if (frame.type === "error") {
    finishBubble(null, "error: " + frame.message, true);
  }
}

function setSending(on) {
  const send = $("chat-send");
  send.textContent = on ? "Stop" : "Send";
  send.className = on ? "danger" : "";
}

$("chat-form").onsubmit = async (e) => {
  e.preventDefault();
  if (chat.bubble) {  // Stop: closing the socket cancels the generation on every stage
    chat.ws?.close();
    return;
  }
  const text = $("chat-input").value.trim();
  if (!text) return;
  $("chat-input").value = "";
  chat.history.push({ role: "user", content: text });
  addBubble("user", text);
  chat.bubble = addBubble("assistant", "");
  chat.bubble.classList.add("streaming");
  setSending(true);
  try {
    const ws = await openChat();
    ws.send(JSON.stringify({
      messages: chat.history,
      max_tokens: Number($("max-tokens").value) || 128,
      temperature: Number($("temperature").value) || 0,
    }));
  } catch (err) {
    finishBubble(null, String(err), true);
  }
};

$("chat-input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("chat-form").requestSubmit();
  }
});

$("chat-clear").onclick = () => {
  chat.ws?.close();
  chat.history = [];
  $("messages").replaceChildren(h("p", { class: "muted empty", id: "chat-empty" }, CHAT_HINT));
};

render(state);
connectState();
