// The console page: console.html?vm=NAME[&token=SECRET].
// Serial: xterm.js on the daemon's /v1/vms/NAME/console websocket (the serial port's bytes, binary both ways).
// Graphics: noVNC's RFB on /v1/vms/NAME/vnc (RFB bridged by the daemon to QEMU's VNC server; no VNC password:
// the websocket itself is authenticated, by the session cookie the browser sends, or by ?token=).
// The libraries are served by the daemon from its pinned npm packages (/ui/vendor/), never from a CDN.
import { Terminal } from "./vendor/@xterm/xterm/lib/xterm.mjs";
import { FitAddon } from "./vendor/@xterm/addon-fit/lib/addon-fit.mjs";
import RFB from "./vendor/@novnc/novnc/core/rfb.js";

const params = new URLSearchParams(location.search);
const vm = params.get("vm") || "";
const token = params.get("token");
const statusEl = document.getElementById("status");
const panels = {};

function wsUrl(what) {
  const url = new URL(`/v1/vms/${encodeURIComponent(vm)}/${what}`, location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  // Only when the page itself was given one; otherwise the browser's cookies authenticate the websocket.
  if (token) url.searchParams.set("token", token);
  return url.href;
}

function closeText(ev) {
  return ev.reason ? `${ev.reason} (${ev.code})` : `closed (${ev.code})`;
}

function setState(panel, state, text) {
  panels[panel].dataset.state = state;
  panels[panel].text = text;
  if (!panels[panel].hidden) statusEl.textContent = text;
}

// ----- serial ---------------------------------------------------------------------------------
function startSerial() {
  const el = document.getElementById("serial");
  const term = new Terminal({ convertEol: false, cursorBlink: true, scrollback: 5000 });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(el);
  fit.fit();
  window.addEventListener("resize", () => {
    if (!el.hidden) fit.fit();
  });
  const ws = new WebSocket(wsUrl("console"));
  ws.binaryType = "arraybuffer";
  const encoder = new TextEncoder();
  setState("serial", "connecting", "serial: connecting…");
  ws.onopen = () => {
    setState("serial", "connected", "serial: connected");
    term.focus();
  };
  ws.onmessage = (ev) => term.write(typeof ev.data === "string" ? ev.data : new Uint8Array(ev.data));
  ws.onclose = (ev) => {
    setState("serial", "closed", `serial: ${closeText(ev)}`);
    term.write(`\r\n\x1b[31m[vmkit] serial console ${closeText(ev)}\x1b[0m\r\n`);
  };
  const send = (data) => {
    if (ws.readyState === WebSocket.OPEN) ws.send(data);
  };
  term.onData((data) => send(encoder.encode(data)));
  // Bytes that are not UTF-8 text (some mouse reports) arrive as a binary string, one char per byte.
  term.onBinary((data) => send(Uint8Array.from(data, (c) => c.charCodeAt(0))));
  return { term, fit, ws };
}

// ----- graphics -------------------------------------------------------------------------------
function startGraphics() {
  const screen = document.getElementById("graphics-screen");
  // Our own WebSocket (noVNC accepts one) so the close frame's reason can be shown.
  const ws = new WebSocket(wsUrl("vnc"), ["binary"]);
  ws.binaryType = "arraybuffer";
  let closed = null;
  ws.addEventListener("close", (ev) => {
    closed = ev;
  });
  const rfb = new RFB(screen, ws, { shared: true });
  rfb.scaleViewport = true;
  rfb.background = "#1e1e1e";
  setState("graphics", "connecting", "graphics: connecting…");
  rfb.addEventListener("connect", () => {
    setState("graphics", "connected", "graphics: connected");
    rfb.focus();
  });
  rfb.addEventListener("disconnect", () => {
    setTimeout(() => setState("graphics", "closed", `graphics: ${closed ? closeText(closed) : "disconnected"}`));
  });
  rfb.addEventListener("desktopname", (ev) => {
    document.title = `${ev.detail.name} — vmkit`;
  });
  document.getElementById("ctrl-alt-del").onclick = () => rfb.sendCtrlAltDel();
  return { rfb, ws };
}

// ----- tabs -----------------------------------------------------------------------------------
const consoles = {};

function show(which) {
  for (const name of ["serial", "graphics"]) {
    const on = name === which;
    document.getElementById(`tab-${name}`).setAttribute("aria-selected", String(on));
    panels[name].hidden = !on;
  }
  if (which === "graphics" && !consoles.graphics) consoles.graphics = startGraphics();
  if (which === "serial" && consoles.serial) {
    consoles.serial.fit.fit();
    consoles.serial.term.focus();
  }
  if (which === "graphics") consoles.graphics.rfb.focus();
  statusEl.textContent = panels[which].text || "";
  history.replaceState(null, "", `#${which}`);
}

panels.serial = document.getElementById("serial");
panels.graphics = document.getElementById("graphics");
document.getElementById("vm-name").textContent = vm || "(no VM given)";
document.title = `${vm} — console — vmkit`;
document.getElementById("tab-serial").onclick = () => show("serial");
document.getElementById("tab-graphics").onclick = () => show("graphics");

if (!vm) {
  statusEl.textContent = "no VM: open console.html?vm=NAME";
} else {
  consoles.serial = startSerial();
  show(location.hash === "#graphics" ? "graphics" : "serial");
}
// For tests and the browser's devtools.
window.vmkitConsole = consoles;
