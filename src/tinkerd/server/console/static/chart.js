// A small SVG line chart of our own: lineChart(element, points [[x, y], ...], options); hover shows step and value.
// The points drawn stay on the element as `element.chartPoints`, so tests read exactly what is on screen.
"use strict";
const SVG = "http://www.w3.org/2000/svg";

function formatNumber(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(3);
  return Number(v.toPrecision(5)).toString();
}

function axisNumber(v) {  // short enough for the axis: three significant digits
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-2 || a >= 1e5)) return v.toExponential(2);
  return Number(v.toPrecision(3)).toString();
}

function svgNode(name, attrs, parent) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

function lineChart(element, points, options = {}) {
  const title = options.title || element.dataset.title || "";
  const xLabel = options.xLabel || "step";
  element.chartPoints = points;
  element.chartOptions = options;
  element.innerHTML = "";
  const head = document.createElement("div");
  head.style.display = "flex";
  head.style.justifyContent = "space-between";
  head.innerHTML = `<h3></h3><span class="latest"></span>`;
  head.firstChild.textContent = title;
  element.appendChild(head);
  if (!points.length) {
    const none = document.createElement("div");
    none.className = "none";
    none.textContent = options.empty || "no points yet";
    element.appendChild(none);
    return;
  }
  head.lastChild.textContent = `latest ${formatNumber(points[points.length - 1][1])}`;
  const W = Math.max(240, element.clientWidth - 28), H = 180, L = 58, R = 10, T = 10, B = 24;  // one unit a pixel
  const xs = points.map(p => p[0]), ys = points.map(p => p[1]);
  const low = v => v.reduce((a, b) => Math.min(a, b)), high = v => v.reduce((a, b) => Math.max(a, b));
  let x0 = low(xs), x1 = high(xs), y0 = low(ys), y1 = high(ys);  // not Math.min(...v): 100k+ points overflow it
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { const pad = Math.abs(y0) * 0.1 || 1; y0 -= pad; y1 += pad; }
  const sx = x => L + (x - x0) / (x1 - x0) * (W - L - R);
  const sy = y => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const svg = svgNode("svg", { viewBox: `0 0 ${W} ${H}`, role: "img",
                               "aria-label": title }, element);
  for (let i = 0; i <= 3; i++) {  // horizontal grid lines with their values
    const y = y0 + (y1 - y0) * i / 3;
    svgNode("line", { class: "axis", x1: L, x2: W - R, y1: sy(y), y2: sy(y) }, svg);
    svgNode("text", { class: "axis-label", x: L - 4, y: sy(y) + 3, "text-anchor": "end" }, svg).textContent = axisNumber(y);
  }
  svgNode("text", { class: "axis-label", x: L, y: H - 6 }, svg).textContent = `${xLabel} ${formatNumber(x0)}`;
  svgNode("text", { class: "axis-label", x: W - R, y: H - 6, "text-anchor": "end" }, svg).textContent = formatNumber(x1);
  const d = points.map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("");
  svgNode("path", { class: "line", d, "vector-effect": "non-scaling-stroke" }, svg);
  if (points.length === 1) svgNode("circle", { class: "dot", cx: sx(xs[0]), cy: sy(ys[0]), r: 3 }, svg);
  const cross = svgNode("line", { class: "cross", y1: T, y2: H - B, visibility: "hidden" }, svg);
  const dot = svgNode("circle", { class: "dot", r: 3.5, visibility: "hidden" }, svg);
  const tip = document.createElement("div");
  tip.className = "tip";
  element.appendChild(tip);
  svg.addEventListener("mousemove", (event) => {
    const box = svg.getBoundingClientRect();
    const x = x0 + ((event.clientX - box.left) / box.width * W - L) / (W - L - R) * (x1 - x0);
    let best = 0;  // the nearest point by x (points are sorted by x)
    for (let i = 1; i < points.length; i++) if (Math.abs(points[i][0] - x) < Math.abs(points[best][0] - x)) best = i;
    const [px, py] = points[best];
    cross.setAttribute("x1", sx(px)); cross.setAttribute("x2", sx(px)); cross.setAttribute("visibility", "visible");
    dot.setAttribute("cx", sx(px)); dot.setAttribute("cy", sy(py)); dot.setAttribute("visibility", "visible");
    tip.textContent = `${xLabel} ${px}: ${formatNumber(py)}`;
    tip.dataset.step = px;
    tip.dataset.value = py;
    tip.style.display = "block";
    const host = element.getBoundingClientRect();  // the tip is placed inside the chart's box (SVG has no offsetTop)
    const left = box.left - host.left + (sx(px) / W) * box.width;
    tip.style.left = `${Math.max(4, Math.min(left + 8, element.clientWidth - tip.offsetWidth - 4))}px`;
    tip.style.top = `${box.top - host.top + (sy(py) / H) * box.height - 30}px`;
  });
  svg.addEventListener("mouseleave", () => {
    tip.style.display = "none"; cross.setAttribute("visibility", "hidden"); dot.setAttribute("visibility", "hidden");
  });
}

let resizing = null;  // charts are drawn at their pixel width: redraw them when the window changes size
window.addEventListener("resize", () => {
  clearTimeout(resizing);
  resizing = setTimeout(() => {
    for (const chart of document.querySelectorAll(".chart")) {
      if (chart.chartPoints) lineChart(chart, chart.chartPoints, chart.chartOptions);
    }
  }, 150);
});
