// Small SVG line charts (no library): one or more series over time, the y axis from 0 to the largest value.

const NS = "http://www.w3.org/2000/svg";
const W = 480, H = 140, PAD_L = 56, PAD_B = 18, PAD_T = 8;

function el(name, attrs, text) {
  const e = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

// series: [{label, cls, points: [[t_s, value], ...]}]; fmt: value -> text; spanS: the time window shown.
export function lineChart(title, series, fmt, spanS) {
  const fig = document.createElement("figure");
  fig.className = "chart";
  const cap = document.createElement("figcaption");
  cap.textContent = title;
  fig.append(cap);
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
  const all = series.flatMap((s) => s.points);
  const tMax = all.length ? Math.max(...all.map((p) => p[0])) : Date.now() / 1000;
  const tMin = tMax - spanS;
  const yMax = Math.max(1e-9, ...all.map((p) => p[1]));
  const x = (t) => PAD_L + ((t - tMin) / spanS) * (W - PAD_L - 4);
  const y = (v) => H - PAD_B - (v / yMax) * (H - PAD_B - PAD_T);
  for (const frac of [0, 0.5, 1]) {
    const yy = y(yMax * frac);
    svg.append(el("line", { x1: PAD_L, x2: W - 4, y1: yy, y2: yy, class: "grid" }));
    svg.append(el("text", { x: PAD_L - 4, y: yy + 4, class: "axis", "text-anchor": "end" }, fmt(yMax * frac)));
  }
  svg.append(el("text", { x: PAD_L, y: H - 2, class: "axis" }, `-${Math.round(spanS / 60)} min`));
  svg.append(el("text", { x: W - 4, y: H - 2, class: "axis", "text-anchor": "end" }, "now"));
  for (const s of series) {
    const pts = s.points.filter((p) => p[0] >= tMin).map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`);
    if (pts.length > 1) svg.append(el("polyline", { points: pts.join(" "), class: `line ${s.cls || ""}` }));
  }
  fig.append(svg);
  if (series.length > 1 || !all.length) {
    const legend = document.createElement("p");
    legend.className = "legend";
    legend.textContent = all.length ? "" : "no samples yet (the VM must be running)";
    for (const s of all.length ? series : []) {
      const span = document.createElement("span");
      span.className = `key ${s.cls || ""}`;
      span.textContent = s.label;
      legend.append(span);
    }
    fig.append(legend);
  }
  return fig;
}
