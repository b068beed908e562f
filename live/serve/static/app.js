// The page of `python -m live.serve`: the camera's frames out as JPEG over /ws, one at a time,
// and the labels the server sends back drawn over the video. A frame is sent only when the reply
// to the previous one has arrived, so at most one is in flight and latency never builds up.
// With a server --source, the page shows /stream and the replies the server pushes instead.
"use strict";

const $ = (id) => document.getElementById(id);
const JPEG_QUALITY = 0.9;
const RATE_WINDOW = 30;

const expected = []; // what each reply answers, in the order the messages went out
const replyTimes = [];
let sentAt = 0;
let sentBlob = null;
let canvas = null;
let socket = null;

// What the page last showed, with the bytes it came from (the browser tests read it).
window.shown = null;

function scheme() {
  return location.protocol === "https:" ? "wss:" : "ws:";
}

function showError(text) {
  $("error").textContent = text || "";
}

function renderLabels(top) {
  if (top.length === 0) $("message").textContent = "no classes yet: type a name, hold the button";
  const list = $("labels");
  list.replaceChildren(
    ...top.map((entry) => {
      const item = document.createElement("li");
      item.className = "label";
      item.dataset.name = entry.name;
      item.dataset.prob = String(entry.prob);
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.style.width = `${Math.round(entry.prob * 100)}%`;
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = entry.name;
      const prob = document.createElement("span");
      prob.className = "prob";
      prob.textContent = entry.prob.toFixed(3);
      item.append(bar, name, prob);
      return item;
    }),
  );
}

function renderStats(reply, roundTrip) {
  const now = performance.now();
  replyTimes.push(now);
  if (replyTimes.length > RATE_WINDOW) replyTimes.shift();
  const span = (replyTimes[replyTimes.length - 1] - replyTimes[0]) / 1000;
  const fps = span > 0 ? (replyTimes.length - 1) / span : 0;
  const parts = [`${fps.toFixed(1)} fps`];
  if (roundTrip !== null) parts.push(`round trip ${roundTrip.toFixed(0)} ms`);
  parts.push(`server ${reply.ms.total.toFixed(0)} ms (network ${reply.ms.network.toFixed(0)} ms)`);
  $("stats").textContent = parts.join(" | ");
}

function renderTaught(taught) {
  $("taught").replaceChildren(
    ...Object.entries(taught || {}).map(([name, count]) => {
      const item = document.createElement("li");
      item.textContent = `${name} (${count})`;
      item.dataset.name = name;
      return item;
    }),
  );
}

function sendFrame() {
  const video = $("video");
  if (socket && socket.readyState >= WebSocket.CLOSING) return; // the close says why
  if (!socket || socket.readyState !== WebSocket.OPEN || video.videoWidth === 0) {
    setTimeout(sendFrame, 50);
    return;
  }
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  canvas.getContext("2d").drawImage(video, 0, 0);
  canvas.toBlob(
    (blob) => {
      sentBlob = blob;
      sentAt = performance.now();
      expected.push("frame");
      socket.send(blob);
    },
    "image/jpeg",
    JPEG_QUALITY,
  );
}

function send(command) {
  if (!socket || socket.readyState !== WebSocket.OPEN) return;
  expected.push("command");
  socket.send(JSON.stringify(command));
}

function onReply(event) {
  const reply = JSON.parse(event.data);
  if (reply.source !== undefined) {
    // A frame of the server's own source, pushed as it comes.
    renderLabels(reply.top);
    renderStats(reply, null);
    return;
  }
  const kind = expected.shift();
  if (kind === "frame") {
    if (reply.error) {
      showError(reply.error);
    } else {
      renderLabels(reply.top);
      renderStats(reply, performance.now() - sentAt);
      window.shown = { blob: sentBlob, reply };
    }
    requestAnimationFrame(sendFrame);
    return;
  }
  if (reply.error) {
    showError(reply.error);
    return;
  }
  showError("");
  if (reply.classes !== undefined) renderTaught(reply.taught);
  if (reply.learned) {
    $("message").textContent = `taught ${reply.learned.name}: ${reply.learned.examples} examples`;
  } else if (reply.forgot) {
    $("message").textContent = `forgot ${reply.forgot}`;
  } else if (reply.saved) {
    $("message").textContent = `saved ${reply.saved}`;
  }
}

function teachControls() {
  const button = $("teach");
  let held = false;
  const start = (event) => {
    event.preventDefault();
    const name = $("class-name").value.trim();
    if (!name) {
      showError("type a class name first");
      return;
    }
    held = true;
    button.classList.add("held");
    send({ command: "teach", name });
  };
  const end = () => {
    if (!held) return;
    held = false;
    button.classList.remove("held");
    send({ command: "stop" });
  };
  button.addEventListener("pointerdown", start);
  button.addEventListener("pointerup", end);
  button.addEventListener("pointerleave", end);
  $("forget").addEventListener("click", () =>
    send({ command: "forget", name: $("class-name").value.trim() }),
  );
  $("save").addEventListener("click", () =>
    send({ command: "save", path: $("save-path").value.trim() || "." }),
  );
}

async function start() {
  teachControls();
  const health = await (await fetch("health")).json();
  socket = new WebSocket(`${scheme()}//${location.host}/ws`);
  socket.addEventListener("message", onReply);
  socket.addEventListener("close", (event) =>
    showError(`connection closed${event.reason ? `: ${event.reason}` : ""}`),
  );
  socket.addEventListener("open", () => send({ command: "classes" }));
  if (health.source) {
    const stream = $("stream");
    stream.src = "stream";
    stream.hidden = false;
    $("stats").textContent = health.source;
    return;
  }
  if (!navigator.mediaDevices) {
    showError("no camera here: the browser allows it only on localhost or over HTTPS");
    return;
  }
  const video = $("video");
  try {
    video.srcObject = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
  } catch (error) {
    showError(`the camera cannot be opened: ${error.message}`);
    return;
  }
  video.hidden = false;
  await video.play();
  canvas = document.createElement("canvas");
  sendFrame();
}

start();
