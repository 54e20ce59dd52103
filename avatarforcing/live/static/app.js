// AvatarForcing live page: capture speech (microphone or a file played in real time), send it as
// pcm_f32le over /ws (docs/protocol.md), draw the returned frames and play their audio at their pts.
"use strict";

const $ = (id) => document.getElementById(id);
const JITTER_S = 0.1;          // playout buffer after the first frame; grows when frames come late
const CHUNK_S = 0.02;          // audio per message
const HEADER = 24;             // binary frame message: "AVF1" u32 index, f64 pts, u32 pcm bytes, u32 jpeg bytes

// A worklet that hands every 128-sample input block to the page.
const CAPTURE = `registerProcessor("capture", class extends AudioWorkletProcessor {
  process(inputs) { const ch = inputs[0] && inputs[0][0]; if (ch) this.port.postMessage(ch.slice(0)); return true; }
});`;

let s = null;   // the running stream's state

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function radio(name) {
  return document.querySelector(`input[name=${name}]:checked`).value;
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function start() {
  const ctx = new AudioContext();
  await ctx.resume();
  let image = "example";
  if (radio("image") === "file") {
    if (!$("image-file").files.length) return setStatus("choose an image file first", true);
    image = await readAsDataURL($("image-file").files[0]);
  }
  s = {ctx, ws: null, pending: [], pendingLen: 0, captureT0: null, sent: 0, playT0: null, queue: [],
       drawn: 0, received: 0, skipped: 0, delays: [], drawTimes: [], ended: false, stopCapture: null};
  await ctx.audioWorklet.addModule(URL.createObjectURL(new Blob([CAPTURE], {type: "text/javascript"})));
  const capture = new AudioWorkletNode(ctx, "capture");
  const mute = ctx.createGain();
  mute.gain.value = 0;
  capture.connect(mute).connect(ctx.destination);      // keeps the worklet running, plays nothing
  capture.port.onmessage = (e) => onCapture(e.data);

  if (radio("source") === "file") {
    if (!$("audio-file").files.length) return setStatus("choose an audio file first", true);
    const buffer = await ctx.decodeAudioData(await $("audio-file").files[0].arrayBuffer());
    const src = ctx.createBufferSource();
    src.buffer = buffer;
    src.connect(capture);
    src.onended = () => stop();
    s.stopCapture = () => { src.onended = null; try { src.stop(); } catch (e) { /* not started */ } };
    s.startCapture = () => src.start();
  } else {
    const media = await navigator.mediaDevices.getUserMedia({audio: {channelCount: 1, echoCancellation: false,
                                                                     noiseSuppression: false, autoGainControl: false}});
    const src = ctx.createMediaStreamSource(media);
    s.stopCapture = () => media.getTracks().forEach((t) => t.stop());
    s.startCapture = () => src.connect(capture);
  }

  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
  ws.binaryType = "arraybuffer";
  s.ws = ws;
  ws.onopen = () => ws.send(JSON.stringify({type: "start", image, prompt: $("prompt").value,
                                            seed: Number($("seed").value) || 0, sample_rate: ctx.sampleRate,
                                            format: "pcm_f32le", channels: 1}));
  ws.onmessage = (e) => (typeof e.data === "string" ? onMessage(JSON.parse(e.data)) : onFrame(e.data));
  ws.onclose = (e) => {
    if (s && s.ws === ws && e.code !== 1000 && !$("status").classList.contains("error")) setStatus(`closed (${e.code})`, true);
    finish();
  };
  $("start").disabled = true;
  $("stop").disabled = false;
  setStatus("connecting");
  requestAnimationFrame(draw);
}

function onMessage(msg) {
  if (msg.type === "ready") {
    setStatus(`streaming ${msg.width}x${msg.height} at ${msg.fps} fps (model look-ahead ${msg.algorithmic_latency_s} s)`);
    s.fps = msg.fps;
    s.startCapture();
  } else if (msg.type === "stats" || msg.type === "done") {
    $("dropped").textContent = msg.dropped;
    $("gen-fps").textContent = msg.fps.toFixed(1);
    $("behind").textContent = msg.behind_realtime ? "yes" : "no";
    $("behind").className = msg.behind_realtime ? "warn" : "";
    if (msg.type === "done") setStatus("done");
  } else if (msg.type === "error") {
    setStatus(`error: ${msg.message}`, true);
  }
}

function onCapture(samples) {
  if (!s || s.ended || !s.ws || s.ws.readyState !== WebSocket.OPEN) return;
  if (s.captureT0 === null) s.captureT0 = performance.now() - 1000 * samples.length / s.ctx.sampleRate;
  s.pending.push(samples);
  s.pendingLen += samples.length;
  if (s.pendingLen >= CHUNK_S * s.ctx.sampleRate) flush();
}

function flush() {
  const out = new Float32Array(s.pendingLen);
  let at = 0;
  for (const p of s.pending) { out.set(p, at); at += p.length; }
  s.pending = [];
  s.pendingLen = 0;
  if (out.length) s.ws.send(out.buffer);
  s.sent += out.length;
}

function stop() {
  if (!s || s.ended) return;
  s.stopCapture();
  if (s.ws.readyState === WebSocket.OPEN) {
    flush();
    s.ws.send(JSON.stringify({type: "end"}));
  }
  s.ended = true;
  $("stop").disabled = true;
  setStatus("draining");
}

function finish() {
  $("start").disabled = false;
  $("stop").disabled = true;
  if (s && !s.ended) { s.ended = true; s.stopCapture && s.stopCapture(); }
}

function onFrame(buf) {
  const dv = new DataView(buf);
  const index = dv.getUint32(4, true), pts = dv.getFloat64(8, true);
  const npcm = dv.getUint32(16, true), njpeg = dv.getUint32(20, true);
  const pcm = new Int16Array(buf, HEADER, npcm / 2);
  const jpeg = new Blob([new Uint8Array(buf, HEADER + npcm, njpeg)], {type: "image/jpeg"});
  s.received += 1;
  $("frames-received").textContent = s.received;
  const state = s;
  createImageBitmap(jpeg).then((bitmap) => state === s && schedule({index, pts, pcm, bitmap}));
}

// Frame 0 (the reference) is shown at once; the rest play at playT0 + pts on the audio clock, with
// their audio scheduled at the same instant.  A frame that comes after its time pushes playT0 back.
function schedule(f) {
  const now = s.ctx.currentTime;
  if (f.index === 0) return s.queue.push({...f, due: now});
  if (s.playT0 === null) s.playT0 = now + JITTER_S - f.pts;
  if (s.playT0 + f.pts < now) s.playT0 = now + JITTER_S - f.pts;
  const due = s.playT0 + f.pts;
  const audio = s.ctx.createBuffer(1, f.pcm.length, 16000);
  const ch = audio.getChannelData(0);
  for (let i = 0; i < f.pcm.length; i++) ch[i] = f.pcm[i] / 32768;
  const src = s.ctx.createBufferSource();
  src.buffer = audio;
  src.connect(s.ctx.destination);
  src.start(due);
  let at = s.queue.length;                              // keep the queue in index order
  while (at > 0 && s.queue[at - 1].index > f.index) at--;
  s.queue.splice(at, 0, {...f, due});
}

function draw() {
  if (!s) return;
  const now = s.ctx.currentTime;
  let frame = null;
  while (s.queue.length && s.queue[0].due <= now) {
    if (frame) { frame.bitmap.close(); s.skipped += 1; }
    frame = s.queue.shift();
  }
  if (frame) {
    const canvas = $("video");
    canvas.getContext("2d").drawImage(frame.bitmap, 0, 0, canvas.width, canvas.height);
    frame.bitmap.close();
    s.drawn += 1;
    const t = performance.now();
    s.drawTimes.push(t);
    while (s.drawTimes.length && s.drawTimes[0] < t - 1000) s.drawTimes.shift();
    if (frame.index > 0 && s.captureT0 !== null) {
      const delay = t - (s.captureT0 + 1000 * frame.pts);
      s.delays.push(delay);
      $("delay-ms").textContent = delay.toFixed(0);
      $("delay-mean-ms").textContent = (s.delays.reduce((a, b) => a + b, 0) / s.delays.length).toFixed(0);
    }
    $("frames-drawn").textContent = s.drawn;
    $("skipped").textContent = s.skipped;
    $("fps").textContent = s.drawTimes.length;
  }
  requestAnimationFrame(draw);
}

$("start").onclick = () => start().catch((e) => { setStatus(`error: ${e.message}`, true); finish(); });
$("stop").onclick = stop;
