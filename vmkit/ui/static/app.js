// vmkit's web UI: a single page with hash routes (#/, #/vms, #/vms/NAME, #/create, #/login), live from /v1/events.
import { ApiError, api, del, get, onUnauthorized, post, vmPath } from "./api.js";
import { lineChart } from "./charts.js";

const STATES = ["running", "paused", "in shutdown", "shut off", "saved", "crashed", "pmsuspended"];
// What each state allows, in the order the buttons show (virsh's words; "stop" is a hard stop: virsh destroy).
const ACTIONS = {
  "running": ["pause", "shutdown", "reboot", "destroy"],
  "paused": ["resume", "destroy"],
  "in shutdown": ["destroy"],
  "pmsuspended": ["destroy"],
  "shut off": ["start", "delete"],
  "saved": ["start", "delete"], // a managed save: start resumes it
  "crashed": ["start", "delete"],
};
const LABELS = { start: "Start", pause: "Pause", resume: "Resume", shutdown: "Shut down", reboot: "Reboot",
  destroy: "Stop", delete: "Delete" };
const MIB = 1024 * 1024, GIB = 1024 * MIB;

const state = { session: null, vms: new Map(), ops: new Map(), live: false, busy: new Set() };
let page = null; // {name, update()}; update is called when VMs change
let timers = [];

// ---- small helpers ------------------------------------------------------------------------------------------
function h(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined && c !== false) e.append(c);
  return e;
}
const $ = (sel) => document.querySelector(sel);
const bytes = (n) => n >= GIB ? `${(n / GIB).toFixed(1)} GiB` : n >= MIB ? `${(n / MIB).toFixed(0)} MiB`
  : `${(n / 1024).toFixed(0)} KiB`;
const stateClass = (s) => "st-" + s.replace(/ /g, "-");

export function toast(message, kind = "info") {
  const t = h("div", { class: `toast ${kind}`, role: kind === "error" ? "alert" : undefined, text: message });
  $("#toasts").append(t);
  setTimeout(() => t.remove(), kind === "error" ? 10000 : 4000);
}

function showError(e, what) {
  toast(`${what}: ${e instanceof ApiError ? e.message : String(e)}`, "error");
}

function every(ms, fn) {
  fn();
  timers.push(setInterval(fn, ms));
}

// ---- session ------------------------------------------------------------------------------------------------
onUnauthorized(() => {
  state.session = null;
  if (!location.hash.startsWith("#/login")) location.hash = "#/login";
});

async function loadSession() {
  try {
    state.session = await get("/v1/session");
  } catch (e) {
    state.session = null;
    if (!(e instanceof ApiError && e.status === 401)) throw e;
  }
  const ro = state.session?.read_only;
  $("#nav").hidden = $("#who").hidden = !state.session;
  $("#nav-create").hidden = !!ro;
  $("#whoami").textContent = state.session
    ? `${state.session.token || "admin"}${ro ? " (read-only)" : ""}` : "";
}

const readOnly = () => !!state.session?.read_only;

// ---- events: VM state live, operations' progress ------------------------------------------------------------
let ws = null, wsRetry = 1000;
function connectEvents() {
  if (ws || !state.session) return;
  ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/events`);
  ws.onopen = () => {
    wsRetry = 1000;
    setLive(true);
    loadVms(); // whatever changed while not connected
  };
  ws.onmessage = (m) => onEvent(JSON.parse(m.data));
  ws.onclose = () => {
    ws = null;
    setLive(false);
    if (state.session) setTimeout(connectEvents, wsRetry);
    wsRetry = Math.min(wsRetry * 2, 10000);
  };
}

function setLive(on) {
  state.live = on;
  const el = $("#live");
  el.textContent = on ? "● live" : "○ reconnecting";
  el.classList.toggle("on", on);
}

async function onEvent(ev) {
  const vm = ev.vm && state.vms.get(ev.vm);
  if (ev.type === "vm-state" && vm) {
    vm.state = ev.state;
    vm.reason = ev.reason;
  } else if (ev.type === "vm-agent" && vm) {
    vm.agent = ev.connected;
  } else if (ev.type === "vm-created" || (ev.type === "vm-state" && !vm)) {
    try { state.vms.set(ev.vm, await get(vmPath(ev.vm))); } catch { /* deleted meanwhile */ }
  } else if (ev.type === "vm-deleted") {
    state.vms.delete(ev.vm);
  } else if (ev.type === "operation") {
    state.ops.set(ev.operation.id, ev.operation);
    renderOps();
    return;
  } else {
    return;
  }
  page?.update?.();
}

async function loadVms() {
  try {
    const list = await get("/v1/vms");
    state.vms = new Map(list.map((v) => [v.name, v]));
    page?.update?.();
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 401)) showError(e, "listing VMs");
  }
}

// Long work (the demo image build) is an operation: its progress comes as events; a poll catches a missed one.
function renderOps() {
  const box = $("#ops");
  box.replaceChildren();
  for (const op of state.ops.values()) {
    const pct = Math.round(op.progress * 100);
    const text = op.status === "running" ? `${op.kind}: ${op.message || "working"} (${pct}%)`
      : op.status === "success" ? `${op.kind}: done` : `${op.kind} failed: ${op.error}`;
    box.append(h("div", { class: `op ${op.status}`, role: op.status === "failure" ? "alert" : undefined },
      h("span", { text }),
      h("progress", { max: "100", value: String(pct), "aria-label": `${op.kind} progress` })));
    if (op.status !== "running") setTimeout(() => { state.ops.delete(op.id); renderOps(); }, 8000);
  }
}

export async function followOperation(op) {
  state.ops.set(op.id, op);
  renderOps();
  while (state.ops.get(op.id)?.status === "running") {
    try {
      const now = await get(`/v1/operations/${op.id}?wait_s=2`);
      state.ops.set(op.id, now);
      renderOps();
    } catch (e) {
      showError(e, "following the operation");
      break;
    }
  }
  return state.ops.get(op.id);
}

// ---- VM actions ---------------------------------------------------------------------------------------------
async function act(name, action) {
  if (action === "delete" && !confirm(`Delete VM ${name} and its disks?`)) return;
  const key = `${name}/${action}`;
  state.busy.add(key);
  page?.update?.();
  try {
    if (action === "delete") {
      await del(vmPath(name));
      state.vms.delete(name);
      toast(`VM ${name} deleted`);
      if (location.hash.startsWith("#/vms/")) location.hash = "#/vms";
    } else {
      const body = action === "shutdown" ? { timeout_s: 60 } : undefined;
      const vm = await post(vmPath(name, action), body);
      state.vms.set(name, vm);
    }
  } catch (e) {
    showError(e, `${LABELS[action]} ${name}`);
  } finally {
    state.busy.delete(key);
    page?.update?.();
  }
}

function actionButtons(vm) {
  const ro = readOnly();
  return h("div", { class: "actions" }, (ACTIONS[vm.state] || []).map((a) => {
    const busy = state.busy.has(`${vm.name}/${a}`);
    return h("button", {
      type: "button", class: a === "delete" || a === "destroy" ? "danger" : "",
      "data-action": a, "aria-label": `${LABELS[a]} ${vm.name}`,
      disabled: ro || busy, title: ro ? "read-only token: no changes" : undefined,
      onclick: () => act(vm.name, a),
    }, busy ? `${LABELS[a]}…` : LABELS[a]);
  }));
}

const badge = (s) => h("span", { class: `badge ${stateClass(s)}`, text: s });

// ---- pages --------------------------------------------------------------------------------------------------
function loginPage(view, params) {
  const err = h("p", { class: "error", role: "alert", id: "login-error" });
  const input = h("input", { id: "token", name: "token", type: "password", autocomplete: "current-password",
    required: true, placeholder: "vmk_…", spellcheck: "false" });
  const button = h("button", { type: "submit", class: "primary" }, "Log in");
  async function login(body) {
    err.textContent = "";
    button.disabled = true;
    try {
      await post("/v1/session", body);
      await start();
      location.hash = "#/";
    } catch (e) {
      err.textContent = e instanceof ApiError && e.status === 401 ? e.message : `cannot log in: ${e.message}`;
      input.focus();
    } finally {
      button.disabled = false;
    }
  }
  view.append(h("section", { class: "login card" },
    h("h1", { text: "Log in to vmkit" }),
    h("form", { onsubmit: (e) => { e.preventDefault(); login({ token: input.value.trim() }); } },
      h("label", { for: "token", text: "API token" }), input, button, err),
    h("p", { class: "muted" }, "Make one on the host with ", h("code", { text: "vmkit token create NAME" }),
      ", or run ", h("code", { text: "vmkit ui" }), " there for a one-time link.")));
  const code = params.get("code");
  if (code) {
    history.replaceState(null, "", "#/login"); // the code is spent either way: keep it out of history
    login({ code });
  } else {
    input.focus();
  }
}

function dashboardPage(view) {
  const host = h("div", { class: "tiles" });
  const counts = h("div", { class: "tiles" });
  view.append(h("h1", { text: "Dashboard" }),
    h("section", { "aria-labelledby": "h-host" }, h("h2", { id: "h-host", text: "Host" }), host),
    h("section", { "aria-labelledby": "h-vms" }, h("h2", { id: "h-vms" }, "VMs by state ",
      h("a", { href: "#/vms", class: "small", text: "see all" })), counts));
  const tile = (label, value, sub, frac) => h("div", { class: "tile" },
    h("div", { class: "label", text: label }), h("div", { class: "value", text: value }),
    frac === undefined ? null : h("meter", { min: "0", max: "1", value: String(frac), high: "0.9",
      "aria-label": label }), sub ? h("div", { class: "muted small", text: sub }) : null);
  let prev = null;
  every(2000, async () => {
    let u;
    try { u = await get("/v1/host/usage"); } catch { return; }
    let cpu = "…";
    let frac;
    if (prev && u.cpu_total_ticks > prev.cpu_total_ticks) {
      frac = (u.cpu_busy_ticks - prev.cpu_busy_ticks) / (u.cpu_total_ticks - prev.cpu_total_ticks);
      cpu = `${Math.round(frac * 100)}%`;
    }
    prev = u;
    const memUsed = u.memory_total_bytes - u.memory_available_bytes;
    const tiles = [
      tile("CPU", cpu, `${u.cpus} CPUs, load ${u.load_avg[0].toFixed(2)}`, frac),
      tile("Memory", bytes(memUsed), `of ${bytes(u.memory_total_bytes)}`, memUsed / u.memory_total_bytes),
    ];
    if (u.disk) {
      const used = u.disk.total_bytes - u.disk.free_bytes;
      tiles.push(tile("Disk", bytes(used), `of ${bytes(u.disk.total_bytes)} (${u.disk.path})`,
        used / u.disk.total_bytes));
    }
    host.replaceChildren(...tiles);
  });
  const update = () => {
    const by = Object.fromEntries(STATES.map((s) => [s, 0]));
    for (const vm of state.vms.values()) by[vm.state] = (by[vm.state] || 0) + 1;
    counts.replaceChildren(tile("Defined", String(state.vms.size)),
      ...STATES.filter((s) => by[s] || ["running", "paused", "shut off"].includes(s))
        .map((s) => h("div", { class: `tile ${stateClass(s)}` }, h("div", { class: "label", text: s }),
          h("div", { class: "value", "data-state-count": s, text: String(by[s]) }))));
  };
  update();
  return { update };
}

function listPage(view) {
  const tbody = h("tbody");
  const empty = h("p", { class: "muted", hidden: true }, "No VMs yet. ",
    readOnly() ? null : h("a", { href: "#/create", text: "Create one" }));
  view.append(h("div", { class: "title" }, h("h1", { text: "Virtual machines" }),
    readOnly() ? null : h("a", { href: "#/create", class: "button primary", text: "Create VM" })),
  h("table", { class: "vms" }, h("thead", {}, h("tr", {},
    ["Name", "State", "vCPUs", "Memory", "Image", "Actions"].map((c) => h("th", { scope: "col", text: c })))),
  tbody), empty);
  const update = () => {
    const vms = [...state.vms.values()].sort((a, b) => a.name.localeCompare(b.name));
    empty.hidden = vms.length > 0;
    tbody.replaceChildren(...vms.map((vm) => h("tr", { "data-vm": vm.name },
      h("td", { "data-label": "Name" }, h("a", { href: `#/vms/${encodeURIComponent(vm.name)}`, text: vm.name })),
      h("td", { "data-label": "State" }, badge(vm.state)),
      h("td", { "data-label": "vCPUs", text: String(vm.vcpus) }),
      h("td", { "data-label": "Memory", text: `${vm.memory_mib} MiB` }),
      h("td", { "data-label": "Image", text: vm.image || "—" }),
      h("td", { "data-label": "Actions" }, actionButtons(vm)))));
  };
  update();
  return { update };
}

function detailPage(view, name) {
  const head = h("div", { class: "title" });
  const overview = h("dl", { class: "kv" });
  const disks = h("tbody");
  const nics = h("tbody");
  const charts = h("div", { class: "charts" });
  const clone = cloneForm(name);
  const snapshots = snapshotsCard(name, () => loadDisks());
  view.append(head, clone.form,
    h("section", { class: "card" }, h("h2", { text: "Overview" }), overview),
    h("section", { class: "card", id: "console" }, h("h2", { text: "Console" }),
      // The console page (VNC and serial) is its own page: api/consoles.py + console.html.
      h("p", {}, h("a", { href: `/ui/console.html?vm=${encodeURIComponent(name)}`, class: "button",
        id: "console-link", target: "_blank", rel: "noopener", text: "Open the console" }))),
    h("section", { class: "card" }, h("h2", { text: "Disks" }), h("table", { class: "plain" },
      h("thead", {}, h("tr", {}, ["Name", "Device", "Volume", "Format", "Backing", "IOPS limit", "B/s limit"]
        .map((c) => h("th", { scope: "col", text: c })))), disks)),
    h("section", { class: "card" }, h("h2", { text: "Network cards" }), h("table", { class: "plain" },
      h("thead", {}, h("tr", {}, ["#", "Kind", "MAC"].map((c) => h("th", { scope: "col", text: c })))), nics)),
    snapshots.card,
    h("section", { class: "card" }, h("h2", { text: "Performance" }), charts));
  const update = () => {
    const vm = state.vms.get(name);
    if (!vm) {
      head.replaceChildren(h("h1", { text: name }), h("p", { class: "error", role: "alert", text: "no such VM" }));
      return;
    }
    const actions = actionButtons(vm);
    if (!readOnly()) actions.append(clone.toggle);
    head.replaceChildren(h("h1", {}, vm.name, " ", badge(vm.state)), actions);
    const rows = [["State", vm.state + (vm.reason ? ` (${vm.reason})` : "")], ["vCPUs", vm.vcpus],
      ["Memory", `${vm.memory_mib} MiB`], ["Image", vm.image || "—"], ["Autostart", vm.autostart ? "on" : "off"],
      ["Guest agent", vm.agent ? "connected" : "not connected"], ["QEMU pid", vm.pid ?? "—"],
      ["Runs as uid", vm.uid ?? "—"], ["cgroup", vm.cgroup || "—"], ["UUID", vm.uuid]];
    overview.replaceChildren(...rows.flatMap(([k, v]) => [h("dt", { text: k }), h("dd", { text: String(v) })]));
    nics.replaceChildren(...(vm.nics.length ? vm.nics.map((n, i) => h("tr", {}, h("td", { text: `net${i}` }),
      h("td", { text: n.kind === "user" ? "user (no host access)" : n.kind }), h("td", { text: n.mac })))
      : [h("tr", {}, h("td", { colspan: "3", class: "muted", text: "none" }))]));
  };
  update();
  // Snapshots change the disks' images (a disk-only one puts an overlay on each): reloaded after each.
  const loadDisks = () => get(vmPath(name, "disks")).then((list) => disks.replaceChildren(...list.map((d) =>
    h("tr", {},
      h("td", { text: d.name }), h("td", { text: d.device }),
      h("td", { class: "path", text: d.volume || d.path || "(empty)" }),
      h("td", { text: [d.format, d.provisioning].filter(Boolean).join(", ") || "—" }),
      h("td", { text: d.backing || "—" }), h("td", { text: String(d.live?.iops ?? d.iops_total ?? "—") }),
      h("td", { text: d.live?.bps ?? d.bps_total ? bytes(d.live?.bps ?? d.bps_total) + "/s" : "—" })))))
    .catch((e) => { if (e.status !== 404) showError(e, "disks"); });
  loadDisks();
  snapshots.load();
  every(2000, async () => {
    if (!state.vms.has(name)) return;
    let st;
    try { st = await get(vmPath(name, "stats")); } catch { return; }
    charts.replaceChildren(...statsCharts(st));
  });
  return { update };
}

const field = (id, label, input, hint) => h("div", { class: "field" }, h("label", { for: id, text: label }),
  input, hint ? h("small", { class: "muted", text: hint }) : null);

// The VM page's clone form (virt-clone), opened from its actions: a long copy, followed as an operation.
function cloneForm(name) {
  const newName = h("input", { id: "clone-name", name: "clone-name", required: true, autocomplete: "off",
    spellcheck: "false", value: `${name}-clone`, pattern: "[A-Za-z0-9][A-Za-z0-9._\\-]{0,62}" });
  const linked = h("input", { id: "clone-linked", name: "clone-linked", type: "checkbox" });
  const submit = h("button", { type: "submit", class: "primary" }, "Create clone");
  const toggle = h("button", { type: "button", id: "clone-toggle", "aria-expanded": "false",
    "aria-controls": "clone-form", "aria-label": `Clone ${name}`, onclick: () => show(form.hidden) }, "Clone…");
  const form = h("form", { id: "clone-form", class: "card inline-form", hidden: true, novalidate: true,
    "aria-labelledby": "h-clone", onsubmit: async (e) => {
      e.preventDefault();
      const body = { name: newName.value.trim(), linked: linked.checked };
      const here = location.hash;
      submit.disabled = true;
      try {
        const res = await post(vmPath(name, "clone"), body);
        const op = await followOperation(res.operation);
        if (op?.status === "failure") throw new Error(op.error);
        if (op?.result?.name) state.vms.set(op.result.name, op.result);
        toast(`VM ${body.name} cloned from ${name}${body.linked ? " (linked)" : ""}`);
        if (location.hash === here) location.hash = `#/vms/${encodeURIComponent(body.name)}`;
      } catch (ex) {
        showError(ex, `Clone ${name}`);
        newName.focus();
      } finally {
        submit.disabled = false;
      }
    } },
  h("h2", { id: "h-clone", text: `Clone ${name}` }),
  field("clone-name", "New VM's name", newName, "1-63 characters: A-Z a-z 0-9 . _ -"),
  h("label", { class: "check" }, linked,
    " Linked: overlays on this VM's disks (which become read-only bases of both) instead of full copies"),
  h("div", { class: "actions" }, submit,
    h("button", { type: "button", onclick: () => { show(false); toggle.focus(); } }, "Cancel")));
  function show(on) {
    form.hidden = !on;
    toggle.setAttribute("aria-expanded", String(on));
    if (on) newName.select();
  }
  return { form, toggle };
}

const snapshotKind = (s) => s.kind === "external" ? `disk-only${s.quiesced ? ", quiesced" : ""}`
  : s.memory ? "internal + RAM" : "internal";

// The snapshot tree in table rows, depth first: each child right under its parent, siblings oldest first.
function snapshotTree(list) {
  const by = new Map(list.map((s) => [s.name, s]));
  const age = (a, b) => a.created_at - b.created_at;
  const out = [];
  const walk = (s, depth) => {
    out.push([s, depth]);
    for (const c of s.children.map((n) => by.get(n)).filter(Boolean).sort(age)) walk(c, depth + 1);
  };
  for (const s of list.filter((x) => !x.parent || !by.has(x.parent)).sort(age)) walk(s, 0);
  return out;
}

// The VM page's Snapshots card (virt-manager's snapshot view): the tree, a form to take one, revert, delete.
function snapshotsCard(name, changed) {
  const ro = readOnly();
  const tbody = h("tbody");
  let list = [], busy = false, seq = 0;
  const snapName = h("input", { id: "snap-name", name: "snap-name", required: true, autocomplete: "off",
    spellcheck: "false", placeholder: "e.g. before-upgrade", pattern: "[A-Za-z0-9][A-Za-z0-9._\\-]{0,62}" });
  const desc = h("input", { id: "snap-description", name: "snap-description", maxlength: "1000",
    autocomplete: "off" });
  const diskOnly = h("input", { id: "snap-disk-only", name: "snap-disk-only", type: "checkbox" });
  const submit = h("button", { type: "submit", class: "primary" }, "Take snapshot");
  const form = ro ? null : h("form", { class: "inline-form snap-form", novalidate: true,
    "aria-label": "Take a snapshot", onsubmit: (e) => {
      e.preventDefault();
      const body = { name: snapName.value.trim(), description: desc.value, disk_only: diskOnly.checked };
      run(`Take snapshot ${body.name || "(no name)"}`, async () => {
        await post(vmPath(name, "snapshots"), body);
        toast(`Snapshot ${body.name} of ${name} taken`);
        snapName.value = desc.value = "";
        diskOnly.checked = false;
      }, () => snapName.focus());
    } },
  field("snap-name", "Snapshot name", snapName), field("snap-description", "Description", desc),
  h("label", { class: "check", title: "external: a new overlay on every disk; internal ones hold RAM too "
    + "while the VM runs" }, diskOnly, " Disk only"), submit);
  const card = h("section", { class: "card", id: "snapshots", "aria-labelledby": "h-snapshots" },
    h("h2", { id: "h-snapshots", text: "Snapshots" }), form,
    h("table", { class: "plain snapshots" }, h("thead", {}, h("tr", {},
      ["Name", "Kind", "VM state", "Taken", "Description", ro ? null : "Actions"].filter(Boolean)
        .map((c) => h("th", { scope: "col", text: c })))), tbody));

  // One change at a time: the card's buttons are off until it ends and the list is reloaded.
  async function run(what, fn, onError) {
    busy = true;
    render();
    try {
      await fn();
    } catch (e) {
      showError(e, what);
      onError?.();
    } finally {
      busy = false;
      await load();
      changed();
    }
  }

  function revert(s) {
    const after = s.memory ? `it resumes ${s.state} from the snapshot's RAM` : "it is left shut off";
    if (!confirm(`Revert ${name} to snapshot ${s.name}? The VM's current state is lost (${after}).`)) return;
    run(`Revert ${name} to ${s.name}`, async () => {
      state.vms.set(name, await post(vmPath(name, `snapshots/${encodeURIComponent(s.name)}/revert`)));
      page?.update?.();
      toast(`${name} reverted to snapshot ${s.name}`);
    });
  }

  function remove(s) {
    if (!confirm(`Delete snapshot ${s.name} of ${name}? The other snapshots stay revertable.`)) return;
    run(`Delete snapshot ${s.name}`, async () => {
      await del(vmPath(name, `snapshots/${encodeURIComponent(s.name)}`));
      toast(`Snapshot ${s.name} of ${name} deleted`);
    });
  }

  function render() {
    submit.disabled = busy;
    const cols = ro ? 5 : 6;
    if (!list.length) {
      tbody.replaceChildren(h("tr", {}, h("td", { colspan: String(cols), class: "muted", text: "No snapshots." })));
      return;
    }
    tbody.replaceChildren(...snapshotTree(list).map(([s, depth]) => {
      const when = new Date(s.created_at * 1000);
      const nameCell = h("td", { class: "snap-name" },
        depth ? h("span", { class: "tree", "aria-hidden": "true", text: "└ " }) : null, s.name,
        s.parent ? h("span", { class: "visually-hidden", text: ` (child of ${s.parent})` }) : null,
        s.current ? h("span", { class: "badge current", title: "the VM's present state grew from this one",
          text: "current" }) : null);
      nameCell.style.setProperty("--depth", String(depth));
      return h("tr", { "data-snap": s.name, "data-parent": s.parent || undefined,
        "aria-current": s.current ? "true" : undefined },
      nameCell,
      h("td", { text: snapshotKind(s) }),
      h("td", {}, badge(s.state)),
      h("td", {}, h("time", { datetime: when.toISOString(), text: when.toLocaleString() })),
      h("td", { text: s.description || "—" }),
      ro ? null : h("td", {}, h("div", { class: "actions" },
        h("button", { type: "button", "data-action": "revert", "aria-label": `Revert to ${s.name}`,
          disabled: busy, onclick: () => revert(s) }, "Revert"),
        h("button", { type: "button", class: "danger", "data-action": "delete",
          "aria-label": `Delete snapshot ${s.name}`, disabled: busy, onclick: () => remove(s) }, "Delete"))));
    }));
  }

  async function load() {
    const mine = ++seq;
    try {
      const now = await get(vmPath(name, "snapshots"));
      if (mine !== seq) return; // a later load answers
      list = now;
    } catch (e) {
      if (e.status !== 404) showError(e, "snapshots");
    }
    render();
  }

  render();
  return { card, load };
}

// Counters become rates between consecutive samples (a QEMU restart resets them: negative steps are skipped).
function rates(samples, pick) {
  const out = [];
  for (let i = 1; i < samples.length; i++) {
    const a = pick(samples[i - 1]), b = pick(samples[i]), dt = samples[i].time_s - samples[i - 1].time_s;
    if (a !== null && b !== null && dt > 0 && b >= a) out.push([samples[i].time_s, (b - a) / dt]);
  }
  return out;
}

function statsCharts(st) {
  const s = st.samples;
  const span = 600;
  const diskSum = (key) => (x) => x.disks ? x.disks.reduce((n, d) => n + d[key], 0) : null;
  const rate = (v) => `${bytes(v)}/s`;
  return [
    lineChart("CPU (% of one host CPU)", [{ label: "CPU", cls: "s1",
      points: rates(s, (x) => x.cpu_time_ns).map(([t, v]) => [t, v / 1e7]) }], (v) => `${v.toFixed(0)}%`, span),
    lineChart("Memory (QEMU resident)", [{ label: "RSS", cls: "s1",
      points: s.filter((x) => x.rss_bytes !== null).map((x) => [x.time_s, x.rss_bytes]) }], bytes, span),
    lineChart("Disk I/O", [
      { label: "read", cls: "s1", points: rates(s, diskSum("read_bytes")) },
      { label: "write", cls: "s2", points: rates(s, diskSum("write_bytes")) }], rate, span),
    h("figure", { class: "chart" }, h("figcaption", { text: "Network I/O" }), h("p", { class: "muted",
      text: "No counters: QEMU user-mode networking exposes none (they come with vmkit networks)." })),
  ];
}

function createPage(view) {
  const err = h("p", { class: "error", role: "alert", id: "create-error" });
  const images = h("select", { id: "image", name: "image" }, h("option", { value: "", text: "none (empty disk)" }));
  const buildDemo = h("button", { type: "button", id: "build-demo", hidden: true, onclick: async () => {
    buildDemo.disabled = true;
    try {
      const res = await post("/v1/images/demo");
      if (res.operation) {
        const op = await followOperation(res.operation);
        if (op?.status === "failure") err.textContent = `the demo image build failed: ${op.error}`;
      }
      await loadImages();
    } catch (e) {
      err.textContent = e.message;
    } finally {
      buildDemo.disabled = false;
    }
  } }, "Build the demo image");
  async function loadImages() {
    try {
      const list = await get("/v1/images");
      images.replaceChildren(h("option", { value: "", text: "none (empty disk)" }),
        ...list.map((i) => h("option", { value: i.name, text: i.name })));
      if (list.length) images.value = list[0].name;
      buildDemo.hidden = list.some((i) => i.name === "demo");
    } catch (e) {
      showError(e, "listing images");
    }
  }
  const name = h("input", { id: "name", name: "name", required: true, pattern: "[A-Za-z0-9][A-Za-z0-9._\\-]{0,62}",
    autocomplete: "off", spellcheck: "false" });
  const memory = h("input", { id: "memory", name: "memory", type: "number", min: "16", value: "256", required: true });
  const vcpus = h("input", { id: "vcpus", name: "vcpus", type: "number", min: "1", max: "255", value: "1",
    required: true });
  const disk = h("input", { id: "disk", name: "disk", type: "number", min: "0", step: "any",
    placeholder: "the image's size" });
  const startNow = h("input", { id: "start", name: "start", type: "checkbox" });
  const submit = h("button", { type: "submit", class: "primary" }, "Create");
  view.append(h("h1", { text: "Create a virtual machine" }), h("form", { class: "card wizard", novalidate: true,
    onsubmit: async (e) => {
      e.preventDefault();
      err.textContent = "";
      const body = { name: name.value.trim(), memory_mib: Number(memory.value), vcpus: Number(vcpus.value) };
      if (images.value) body.image = images.value;
      if (disk.value) body.disk_size_bytes = Math.round(Number(disk.value) * GIB);
      submit.disabled = true;
      try {
        const vm = await post("/v1/vms", body);
        state.vms.set(vm.name, vm);
        toast(`VM ${vm.name} created`);
        if (startNow.checked) act(vm.name, "start");
        location.hash = "#/vms";
      } catch (ex) {
        err.textContent = ex.message;
        name.focus();
      } finally {
        submit.disabled = false;
      }
    } },
  h("fieldset", {}, h("legend", { text: "1. Name and image" }),
    field("name", "Name", name, "1-63 characters: A-Z a-z 0-9 . _ -"),
    field("image", "Boot image", images), buildDemo),
  h("fieldset", {}, h("legend", { text: "2. Resources" }),
    field("memory", "Memory (MiB)", memory), field("vcpus", "Virtual CPUs", vcpus),
    field("disk", "Disk size (GiB)", disk, "qcow2, thin: only what the guest writes takes room")),
  h("fieldset", {}, h("legend", { text: "3. Finish" }),
    h("label", { class: "check" }, startNow, " Start it right away"), h("div", { class: "actions" }, submit)),
  err));
  loadImages();
  name.focus();
}

// ---- router -------------------------------------------------------------------------------------------------
function route() {
  for (const t of timers) clearInterval(t);
  timers = [];
  page = null;
  const [path, query] = location.hash.slice(1).split("?");
  const params = new URLSearchParams(query || "");
  const view = $("#view");
  view.replaceChildren();
  if (path === "/login" || !state.session) {
    if (path !== "/login") { location.hash = "#/login"; return; }
    document.title = "Log in — vmkit";
    loginPage(view, params);
    return;
  }
  const parts = (path || "/").split("/").filter(Boolean);
  for (const a of document.querySelectorAll("[data-nav]")) {
    a.toggleAttribute("aria-current", a.dataset.nav === (parts[0] || "dashboard") && parts.length < 2);
  }
  if (parts.length === 0) { document.title = "Dashboard — vmkit"; page = dashboardPage(view); }
  else if (parts[0] === "vms" && parts.length === 1) { document.title = "VMs — vmkit"; page = listPage(view); }
  else if (parts[0] === "vms") {
    const name = decodeURIComponent(parts[1]);
    document.title = `${name} — vmkit`;
    page = detailPage(view, name);
  } else if (parts[0] === "create" && !readOnly()) { document.title = "Create VM — vmkit"; createPage(view); }
  else view.append(h("h1", { text: "Not found" }), h("p", {}, h("a", { href: "#/", text: "Dashboard" })));
}

async function start() {
  await loadSession();
  if (state.session) {
    await loadVms();
    connectEvents();
  }
}

$("#logout").addEventListener("click", async () => {
  try { await del("/v1/session"); } catch { /* gone already */ }
  state.session = null;
  ws?.close();
  await loadSession();
  location.hash = "#/login";
});
window.addEventListener("hashchange", route);

(async () => {
  const login = location.hash.startsWith("#/login") && location.hash.includes("code=");
  try {
    if (!login) await start();
  } catch (e) {
    showError(e, "starting");
  }
  route();
})();
