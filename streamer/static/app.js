// emostream dashboard: subscribe to live sessions, show utterances + emotions, capture the microphone.
// No external scripts: works offline. Protocol v1 (docs/protocol.md).
"use strict";

const COLOURS = { neutral: "#a7b0bc", joy: "#ffd23f", surprise: "#2ec4e8", anger: "#ff3b3b",
  sadness: "#3f7fff", disgust: "#7cb518", fear: "#a663cc", boredom: "#6c757d" };
const LABELS = ["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"];
const wsBase = (location.protocol === "https:" ? "wss://" : "ws://") + location.host;
const params = new URLSearchParams(location.search);
const token = params.get("token");
const withToken = (url) => token ? url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token) : url;

const $ = (id) => document.getElementById(id);
const state = { utterances: new Map(), order: [], sessions: new Set(["*"]), sub: null, mic: null, events: 0, calls: new Map(),
  watching: "*", lastSeq: new Map(), partials: 0 };
window.emostream = state; // for tests and the curious

function colour(label) { return COLOURS[label] || "#d0d0d0"; }
function setStatus(text, cls) { const s = $("status"); s.textContent = text; s.className = "status " + (cls || ""); }

// interim results (transcript.partial / emotion.partial while someone speaks): asked for by the
// microphone's start message and by the watcher subscription while the checkbox is ticked
const interimOn = () => $("interim").checked;
// speakers within the microphone's one channel: asked for by its start message while "Speakers" is ticked;
// any session's `speaker` (named channels or diarized S1, S2, ...) is shown with its utterances
const diarizeOn = () => $("diarize").checked;

// ---- subscription -------------------------------------------------------------------------
function subscribe(session, resume) {
  if (state.sub) { state.sub.onclose = null; state.sub.close(); }
  let url = wsBase + "/v1/subscribe?session=" + encodeURIComponent(session) + (interimOn() ? "&interim=1" : "");
  // re-subscribing to the same session (the checkbox changed): continue after the last event seen
  if (resume && session !== "*" && state.lastSeq.has(session)) url += "&after_seq=" + state.lastSeq.get(session);
  const ws = new WebSocket(withToken(url));
  state.sub = ws; state.watching = session;
  ws.onopen = () => setStatus("connected · watching " + (session === "*" ? "all sessions" : session), "ok");
  ws.onmessage = (m) => handle(JSON.parse(m.data));
  ws.onclose = () => { setStatus("disconnected — retrying", "bad"); setTimeout(() => { if (state.sub === ws) subscribe(session); }, 1500); };
}

function addSession(id) {
  if (!id || state.sessions.has(id)) return;
  state.sessions.add(id);
  const opt = document.createElement("option");
  opt.value = id; opt.textContent = id;
  $("session").appendChild(opt);
}

function utteranceEl(ev) {
  const key = ev.session_id + "/" + ev.utterance_id;
  let u = state.utterances.get(key);
  if (!u) {
    const li = document.createElement("li");
    li.className = "utt";
    li.innerHTML = '<div><div class="label">…</div><div class="provisional"></div><div class="meta"></div></div>' +
      '<div><div class="text pending">listening…</div><div class="weights"></div><div class="revised"></div></div>' +
      '<div class="bars"></div>';
    $("utterances").prepend(li);
    $("empty").style.display = "none";
    u = { key, li, session: ev.session_id, label: null, start: null, speaker: ev.speaker || null, final: false,
      span: null, was: null };
    state.utterances.set(key, u);
    state.order.push(u);
    $("count").textContent = state.order.length;
  }
  return u;
}

// the utterance still being spoken: its text so far in grey italics, and a provisional emotion chip;
// the final transcript / emotion replace them (a partial never follows its utterance's final)
function showPartial(u, ev) {
  if (u.final) return;
  state.partials++;
  if (ev.text) {
    const t = u.li.querySelector(".text");
    t.textContent = ev.text;
    t.classList.remove("pending"); t.classList.add("interim");
  }
  if (u.start == null && ev.audio_s != null) {
    u.li.querySelector(".meta").textContent =
      `${ev.session_id}${ev.speaker ? " · " + ev.speaker : ""} · speaking · ${ev.audio_s.toFixed(1)} s`;
  }
  if (ev.type === "emotion.partial" && !u.label) {
    const chip = document.createElement("span");
    chip.className = "chip provisional"; chip.style.setProperty("--c", colour(ev.label));
    chip.title = "provisional: from the speech so far"; chip.textContent = ev.label + "?";
    u.li.querySelector(".provisional").replaceChildren(chip);
  }
}

// the utterance's session, speaker and time span; a diarized speaker arrives with the transcript
// (after utterance.ended) and may be revised later (speaker.revised)
function showMeta(u) {
  if (u.span == null) return;
  const who = u.speaker ? " · " + u.speaker + (u.was ? ` (was ${u.was})` : "") : "";
  u.li.querySelector(".meta").textContent = `${u.session}${who} · ${u.span}`;
}

function setSpeaker(u, ev) {
  if (ev.speaker && ev.speaker !== u.speaker) { u.speaker = ev.speaker; showMeta(u); }
}

function showScores(u, ev) {
  const label = ev.label;
  u.label = label;
  u.li.querySelector(".provisional").replaceChildren();
  u.li.style.setProperty("--c", colour(label));
  const el = u.li.querySelector(".label"), low = ev.confidence === "low";  // absent from older servers: not low
  el.textContent = label;
  el.classList.toggle("low", low);  // greyed, with a "?" (style.css)
  el.title = !low ? "" : ev.familiar_voice === false
    ? "low confidence: the voice is unlike the speech the model learned from, and the prediction leaned on it"
    : `low confidence: top score ${ev.scores[label].toFixed(2)} is below the service's threshold`;
  const bars = u.li.querySelector(".bars");
  bars.innerHTML = "";
  const labels = Object.keys(ev.scores).sort((a, b) => ev.scores[b] - ev.scores[a]);
  for (const l of labels) {
    const p = ev.scores[l];
    bars.insertAdjacentHTML("beforeend",
      `<span>${l}</span><div class="bar"><i style="width:${(100 * p).toFixed(1)}%;--c:${colour(l)}"></i></div><span>${p.toFixed(2)}</span>`);
  }
  const w = ev.modality_weights || {};
  u.li.querySelector(".weights").textContent =
    `speech ${(w.speech ?? 0).toFixed(2)} · text ${(w.text ?? 0).toFixed(2)}` + (ev.latency_ms != null ? ` · ${Math.round(ev.latency_ms)} ms` : "")
    + (ev.sentiment ? ` · ${ev.sentiment} ${ev.sentiment_score >= 0 ? "+" : ""}${ev.sentiment_score.toFixed(2)}` : "");  // absent: no sentiment head
  drawTimeline();
}

// ---- live calls: each side's current emotion, alerts highlighted -----------------------------
function callRow(id) {
  let c = state.calls.get(id);
  if (!c) {
    const tr = document.createElement("tr");
    tr.innerHTML = `<td>${id}</td><td class="side" data-speaker="customer">—</td><td class="side" data-speaker="agent">—</td><td class="alerts">0</td>`;
    document.querySelector("#calls tbody").prepend(tr);
    $("calls-panel").hidden = false;
    c = { tr, alerts: [] };
    state.calls.set(id, c);
  }
  return c;
}

function callEvent(ev) {
  if (ev.type === "alert") {
    const c = callRow(ev.session_id);
    c.alerts.push(ev);
    c.tr.classList.add("alerting");
    c.tr.querySelector(".alerts").innerHTML = `${c.alerts.length} <div class="alert-msg">${ev.message || ev.rule}</div>`;
  } else if ((ev.type === "emotion" || ev.type === "emotion.revised") && ev.speaker && ev.channel !== undefined) {
    const c = callRow(ev.session_id);
    let cell = c.tr.querySelector(`[data-speaker="${ev.speaker}"]`);
    if (!cell) {
      cell = document.createElement("td"); cell.className = "side"; cell.dataset.speaker = ev.speaker;
      c.tr.insertBefore(cell, c.tr.querySelector(".alerts"));
    }
    const low = ev.confidence === "low";
    cell.innerHTML = `<span class="chip${low ? " low" : ""}" style="--c:${colour(ev.label)}"${low ? ' title="low confidence"' : ""}>` +
      `${ev.label}</span> ${ev.scores[ev.label].toFixed(2)}`;
  } else if (ev.type === "session.ended" && state.calls.has(ev.session_id)) {
    state.calls.get(ev.session_id).tr.classList.add("ended");
  }
}

function handle(ev) {
  state.events++;
  addSession(ev.session_id);
  if (ev.session_id && ev.seq >= 0) state.lastSeq.set(ev.session_id, ev.seq);
  callEvent(ev);
  switch (ev.type) {
    case "utterance.started": { utteranceEl(ev); break; }
    case "utterance.ended": {
      const u = utteranceEl(ev);
      u.start = ev.start_s;
      u.span = `${ev.start_s.toFixed(1)}–${ev.end_s.toFixed(1)} s`;
      if (ev.speaker) u.speaker = ev.speaker;
      showMeta(u);
      break;
    }
    case "transcript.partial":
    case "emotion.partial": showPartial(utteranceEl(ev), ev); break;
    case "transcript": {
      const u = utteranceEl(ev);
      u.final = true;
      setSpeaker(u, ev);
      const t = u.li.querySelector(".text");
      t.textContent = ev.text || "(no words)";
      t.classList.remove("pending", "interim");
      break;
    }
    case "emotion": { const u = utteranceEl(ev); setSpeaker(u, ev); showScores(u, ev); break; }
    case "speaker.revised": {
      const u = utteranceEl(ev);
      u.was = ev.previous_speaker; u.speaker = ev.speaker; showMeta(u);
      break;
    }
    case "emotion.revised": {
      const u = utteranceEl(ev);
      const before = u.label;
      setSpeaker(u, ev);
      showScores(u, ev);
      u.li.querySelector(".revised").textContent = before && before !== ev.label ? `revised from ${before}` : "";
      break;
    }
    case "error": setStatus(`error ${ev.code}: ${ev.message}`, "bad"); break;
  }
}

// ---- timeline chart (canvas, no library) ----------------------------------------------------
function drawTimeline() {
  const c = $("timeline"), g = c.getContext("2d");
  const W = c.width, H = c.height, left = 80, lane = (H - 20) / LABELS.length;
  g.clearRect(0, 0, W, H);
  g.font = "12px system-ui"; g.textBaseline = "middle";
  LABELS.forEach((l, i) => {
    const y = 10 + lane * (i + 0.5);
    g.fillStyle = "#8b95a3"; g.fillText(l, 8, y);
    g.strokeStyle = "#222a33"; g.beginPath(); g.moveTo(left, y); g.lineTo(W - 10, y); g.stroke();
  });
  const pts = state.order.filter((u) => u.label).slice(-60);
  const step = pts.length > 1 ? (W - left - 20) / (pts.length - 1) : 0;
  const bySession = new Map();
  pts.forEach((u, i) => {
    const x = left + 10 + i * step, li = LABELS.indexOf(u.label);
    const y = 10 + lane * ((li < 0 ? LABELS.length - 1 : li) + 0.5);
    if (!bySession.has(u.session)) bySession.set(u.session, []);
    bySession.get(u.session).push([x, y]);
    g.fillStyle = colour(u.label); g.beginPath(); g.arc(x, y, 6, 0, 2 * Math.PI); g.fill();
  });
  g.strokeStyle = "rgba(255,255,255,.25)";
  for (const line of bySession.values()) {
    g.beginPath(); line.forEach(([x, y], i) => (i ? g.lineTo(x, y) : g.moveTo(x, y))); g.stroke();
  }
}

// ---- microphone: getUserMedia + AudioWorklet -> 16 kHz PCM16 over /v1/stream ------------------
const WORKLET = `
class Capture extends AudioWorkletProcessor {
  process(inputs) { const ch = inputs[0][0]; if (ch) this.port.postMessage(ch.slice(0)); return true; }
}
registerProcessor("capture", Capture);`;

async function startMic() {
  const stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true } });
  let ctx;
  try { ctx = new AudioContext({ sampleRate: 16000 }); } catch (e) { ctx = new AudioContext(); }
  await ctx.audioWorklet.addModule(URL.createObjectURL(new Blob([WORKLET], { type: "application/javascript" })));
  const node = new AudioWorkletNode(ctx, "capture");
  ctx.createMediaStreamSource(stream).connect(node);
  const ws = new WebSocket(withToken(wsBase + "/v1/stream"));
  ws.binaryType = "arraybuffer";
  const chunk = Math.round(ctx.sampleRate / 10); // 100 ms
  let buf = new Float32Array(0), started = false;
  ws.onopen = () => ws.send(JSON.stringify({ type: "start", sample_rate: ctx.sampleRate, encoding: "pcm_s16le", channels: 1,
    metadata: { source: "dashboard" }, ...(interimOn() ? { interim: true } : {}), ...(diarizeOn() ? { diarize: true } : {}) }));
  ws.onmessage = (m) => {
    const ev = JSON.parse(m.data);
    if (ev.type === "session.started") {
      started = true; addSession(ev.session_id);
      $("session").value = ev.session_id; subscribe(ev.session_id);
    } else if (ev.type === "error") setStatus(`error ${ev.code}: ${ev.message}`, "bad");
    else if (ev.type === "session.ended") ws.close();
  };
  node.port.onmessage = (m) => {
    if (!started || ws.readyState !== WebSocket.OPEN) return;
    const merged = new Float32Array(buf.length + m.data.length);
    merged.set(buf); merged.set(m.data, buf.length); buf = merged;
    while (buf.length >= chunk) {
      const part = buf.subarray(0, chunk), pcm = new Int16Array(chunk);
      for (let i = 0; i < chunk; i++) pcm[i] = Math.max(-32768, Math.min(32767, Math.round(part[i] * 32767)));
      ws.send(pcm.buffer);
      buf = buf.slice(chunk);
    }
  };
  state.mic = { stream, ctx, ws };
  $("mic").textContent = "■ Stop microphone"; $("mic").classList.add("on");
}

function stopMic() {
  const m = state.mic; if (!m) return;
  m.stream.getTracks().forEach((t) => t.stop());
  m.ctx.close();
  if (m.ws.readyState === WebSocket.OPEN) m.ws.send(JSON.stringify({ type: "stop" })); // server finishes the last utterance
  state.mic = null;
  $("mic").textContent = "● Start microphone"; $("mic").classList.remove("on");
}

$("mic").onclick = () => (state.mic ? stopMic() : startMic().catch((e) => setStatus("microphone: " + e.message, "bad")));
$("session").onchange = (e) => subscribe(e.target.value);
$("interim").onchange = () => subscribe(state.watching, true);
if (params.get("interim") === "0") $("interim").checked = false;
if (params.get("diarize") === "1") $("diarize").checked = true;
$("legend").innerHTML = LABELS.map((l) => `<span style="--c:${colour(l)}">${l}</span>`).join("");
drawTimeline();
subscribe(params.get("session") || "*");
if (params.get("mic") === "1") startMic().catch((e) => setStatus("microphone: " + e.message, "bad"));
