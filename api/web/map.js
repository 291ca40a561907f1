// The feature map on a canvas: one small square of pixels per feature (a DOM node per point would
// not survive 100k of them), pan by dragging or arrow keys, zoom with the wheel or +/-, hover for a label,
// click (or Enter, for the point nearest the centre cross) to open a feature.
import { h } from "/static/dom.js";

// Tableau 10 plus two, readable on light and dark backgrounds.
const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
  "#9c755f", "#bab0ac", "#17becf", "#bcbd22"];
const NONE = "#8a8f96"; // dead or unlabelled
// Density on a log scale in ten steps (cividis-like: tells apart without relying on red/green).
const RAMP = ["#00224e", "#123570", "#3b496c", "#575d6d", "#707173", "#8a8779", "#a59c74", "#c3b369", "#e1cc55", "#fee838"];
const GRID = 128; // hover lookup: the map's square is cut into GRID x GRID cells

// The ramp spans the live features' log density from the 1st to the 99th percentile: a fixed
// scale would paint most atlases in two or three colours.
// "#rrggbb" and an alpha byte as one RGBA pixel of a Uint32Array over ImageData (little-endian).
function packed(hex, alpha) {
  const v = parseInt(hex.slice(1), 16);
  return ((alpha << 24) | ((v & 0xff) << 16) | (v & 0xff00) | (v >> 16)) >>> 0;
}

function densityScale(density) {
  const logs = density.filter((d) => d > 0).map(Math.log10).sort((a, b) => a - b);
  const lo = logs.length ? logs[Math.floor(0.01 * (logs.length - 1))] : -6;
  const hi = logs.length ? logs[Math.ceil(0.99 * (logs.length - 1))] : -1;
  const colour = (d) => (d > 0 ? Math.max(0, Math.min(RAMP.length - 1, Math.floor(((Math.log10(d) - lo) / Math.max(hi - lo, 1e-6)) * RAMP.length))) : -1);
  return { lo, hi, colour };
}
const percent = (logd) => `${(100 * 10 ** logd).toPrecision(2)}%`;

export function drawMap(view, data, { highlight = [], title = null, onOpen }) {
  const n = data.n;
  // Centred on the points' bounding box, with a margin (ingest stores them in [-1, 1]; older or
  // imported maps need not be).
  let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
  for (let i = 0; i < n; i++) {
    x0 = Math.min(x0, data.x[i]); x1 = Math.max(x1, data.x[i]); y0 = Math.min(y0, data.y[i]); y1 = Math.max(y1, data.y[i]);
  }
  const mx = n ? (x0 + x1) / 2 : 0, my = n ? (y0 + y1) / 2 : 0;
  const EXTENT = n ? 1.05 * Math.max(x1 - x0, y1 - y0, 1e-6) / 2 : 1;
  const xs = Float32Array.from(data.x, (v) => v - mx), ys = Float32Array.from(data.y, (v) => v - my);
  const canvas = h("canvas", {
    tabindex: "0", role: "img", id: "map-canvas",
    "aria-label": `Map of ${n.toLocaleString("en")} features. Drag or use the arrow keys to pan, the wheel or plus and minus to zoom, Enter to open the feature nearest the centre cross.`,
  });
  const tip = h("div", { class: "tooltip", role: "status" });
  const colourBy = h("select", { "aria-label": "Colour points by" },
    h("option", { value: "density" }, "colour by density"), h("option", { value: "cluster" }, "colour by label cluster"));
  const legend = h("div", { class: "legend", "aria-label": "legend" });
  const state = { cx: 0, cy: 0, zoom: 1, hover: -1, focused: false };
  const zoomBy = (f) => { state.zoom = Math.min(400, Math.max(0.5, state.zoom * f)); schedule(); };
  const position = new Map(data.feature_id.map((id, i) => [id, i]));
  const marked = new Set(highlight.map((id) => position.get(id)).filter((i) => i !== undefined));

  view.replaceChildren(
    h("h1", {}, title || "Map of the features"),
    h("div", { class: "toolbar" }, colourBy,
      h("button", { type: "button", onclick: () => zoomBy(1.5), "aria-label": "zoom in" }, "+"),
      h("button", { type: "button", onclick: () => zoomBy(1 / 1.5), "aria-label": "zoom out" }, "−"),
      h("button", { type: "button", onclick: () => { Object.assign(state, { cx: 0, cy: 0, zoom: 1 }); schedule(); } }, "reset"),
      h("span", { class: "meta" }, `${n.toLocaleString("en")} features · UMAP of the decoder directions`)),
    h("div", { class: "map-wrap" }, canvas, tip),
    legend,
    marked.size ? h("section", {}, h("h2", {}, "Highlighted"), h("ol", { class: "neighbors" },
      [...marked].map((i) => h("li", {}, h("a", { href: `/features/${data.feature_id[i]}` }, `#${data.feature_id[i]} ${data.label[i] || ""}`))))) : "",
  );

  // Points grouped by colour, so each colour is set once per frame.
  const density = densityScale(data.density);
  let groups = [];
  function recolour() {
    const byCluster = colourBy.value === "cluster";
    const colours = byCluster ? PALETTE : RAMP;
    const code = new Int16Array(n);
    for (let i = 0; i < n; i++) code[i] = byCluster ? (data.cluster[i] >= 0 ? data.cluster[i] % PALETTE.length : -1) : density.colour(data.density[i]);
    groups = [{ colour: NONE, idx: [] }, ...colours.map((c) => ({ colour: c, idx: [] }))];
    for (let i = 0; i < n; i++) groups[code[i] + 1].idx.push(i);
    legend.replaceChildren(...(byCluster
      ? data.clusters.map((c) => h("span", { style: `--swatch:${PALETTE[c.id % PALETTE.length]}` }, `${c.name} (${c.size})`))
      : [h("span", { style: `--swatch:${RAMP[0]}` }, `density ≤ ${percent(density.lo)}`),
        h("span", { style: `--swatch:${RAMP[RAMP.length >> 1]}` }, percent((density.lo + density.hi) / 2)),
        h("span", { style: `--swatch:${RAMP[RAMP.length - 1]}` }, `≥ ${percent(density.hi)} of tokens`)]),
    h("span", { style: `--swatch:${NONE}` }, byCluster ? "unlabelled" : "dead"));
    schedule();
  }

  // Hover lookup: points bucketed by grid cell (a counting sort, O(n)).
  const cellOf = (x, y) => {
    const cx = Math.min(GRID - 1, Math.max(0, Math.floor(((x + EXTENT) / (2 * EXTENT)) * GRID)));
    const cy = Math.min(GRID - 1, Math.max(0, Math.floor(((y + EXTENT) / (2 * EXTENT)) * GRID)));
    return cy * GRID + cx;
  };
  const start = new Uint32Array(GRID * GRID + 1), order = new Uint32Array(n);
  for (let i = 0; i < n; i++) start[cellOf(xs[i], ys[i]) + 1]++;
  for (let c = 0; c < GRID * GRID; c++) start[c + 1] += start[c];
  const fill = start.slice(0, GRID * GRID);
  for (let i = 0; i < n; i++) order[fill[cellOf(xs[i], ys[i])]++] = i;

  const ctx = canvas.getContext("2d");
  const dpr = window.devicePixelRatio || 1;
  const scale = () => (Math.min(canvas.width, canvas.height) / (2 * EXTENT)) * state.zoom;
  const toScreen = (x, y) => [(x - state.cx) * scale() + canvas.width / 2, (state.cy - y) * scale() + canvas.height / 2];
  const toData = (sx, sy) => [(sx - canvas.width / 2) / scale() + state.cx, state.cy - (sy - canvas.height / 2) / scale()];

  function nearest(sx, sy, radiusPx = 8 * dpr) {
    const [x, y] = toData(sx, sy);
    const r = radiusPx / scale();
    const c0 = cellOf(x - r, y - r), c1 = cellOf(x + r, y + r);
    let best = -1, bestD = r * r;
    for (let cy = Math.floor(c0 / GRID); cy <= Math.floor(c1 / GRID); cy++) {
      for (let cx = c0 % GRID; cx <= c1 % GRID; cx++) {
        const c = cy * GRID + cx;
        for (let k = start[c]; k < start[c + 1]; k++) {
          const i = order[k], d = (xs[i] - x) ** 2 + (ys[i] - y) ** 2;
          if (d < bestD) { bestD = d; best = i; }
        }
      }
    }
    return best;
  }

  // The keyboard's pick: the point nearest the centre cross, however far (a linear scan: ~1 ms at 100k).
  function nearestToCentre() {
    const [x, y] = toData(canvas.width / 2, canvas.height / 2);
    let best = -1, bestD = Infinity;
    for (let i = 0; i < n; i++) {
      const d = (xs[i] - x) ** 2 + (ys[i] - y) ** 2;
      if (d < bestD) { bestD = d; best = i; }
    }
    return best;
  }

  let pending = false, image = null;
  function schedule() {
    if (!pending) { pending = true; requestAnimationFrame(() => { pending = false; draw(); }); }
  }

  function draw() {
    const t0 = performance.now(); // each frame's cost is recorded for scripts/bench_ui.py
    if (!canvas.isConnected) { observer.disconnect(); return; } // the view was left
    const w = Math.round(canvas.clientWidth * dpr), hgt = Math.round(canvas.clientHeight * dpr);
    if (!w || !hgt) return;
    if (canvas.width !== w || canvas.height !== hgt) { canvas.width = w; canvas.height = hgt; }
    const s = scale(), ox = canvas.width / 2 - state.cx * s, oy = canvas.height / 2 + state.cy * s;
    const size = Math.max(1, Math.round(Math.min(8, (n > 20000 ? 1.6 : n > 2000 ? 2.5 : 4.5) * Math.sqrt(state.zoom)) * dpr));
    const half = size >> 1;
    // Points are written straight into the pixel buffer: fillRect per point cost ~80 ms a frame
    // at 100k points here, this costs a few. Highlighting dims the rest through the alpha byte.
    if (!image || image.width !== w || image.height !== hgt) image = ctx.createImageData(w, hgt);
    const pixels = new Uint32Array(image.data.buffer);
    pixels.fill(0);
    const alpha = marked.size ? 90 : 220;
    for (const g of groups) {
      const c = packed(g.colour, alpha);
      for (const i of g.idx) {
        const px = Math.round(xs[i] * s + ox) - half, py = Math.round(oy - ys[i] * s) - half;
        if (px < 0 || py < 0 || px + size > w || py + size > hgt) continue;
        for (let dy = 0; dy < size; dy++) pixels.fill(c, (py + dy) * w + px, (py + dy) * w + px + size);
      }
    }
    ctx.putImageData(image, 0, 0);
    ctx.lineWidth = 2 * dpr;
    const ring = getComputedStyle(document.documentElement).getPropertyValue("--fg").trim() || "#000";
    for (const i of [...marked, ...(state.hover >= 0 ? [state.hover] : [])]) {
      const [sx, sy] = toScreen(xs[i], ys[i]);
      ctx.beginPath();
      ctx.arc(sx, sy, 5 * dpr, 0, 2 * Math.PI);
      ctx.fillStyle = "#e15759";
      ctx.fill();
      ctx.strokeStyle = ring;
      ctx.stroke();
    }
    if (state.focused) { // the keyboard's cursor: Enter opens the point nearest the cross
      const cxs = canvas.width / 2, cys = canvas.height / 2, arm = 8 * dpr;
      ctx.strokeStyle = ring;
      ctx.beginPath();
      ctx.moveTo(cxs - arm, cys); ctx.lineTo(cxs + arm, cys); ctx.moveTo(cxs, cys - arm); ctx.lineTo(cxs, cys + arm);
      ctx.stroke();
    }
    performance.measure("fa:draw", { start: t0 });
  }

  function showTip(i, sx, sy) {
    state.hover = i;
    if (i < 0) { tip.style.display = "none"; schedule(); return; }
    const d = data.density[i];
    tip.textContent = `#${data.feature_id[i]} ${data.label[i] || "(no label)"} · density ${d > 0 ? (100 * d).toPrecision(2) + "%" : "dead"}`;
    tip.style.display = "block";
    tip.style.left = `${Math.min(sx / dpr + 12, canvas.clientWidth - 200)}px`;
    tip.style.top = `${sy / dpr + 12}px`;
    schedule();
  }

  // Pointer: drag pans, a click that did not drag opens the point under it.
  let drag = null;
  canvas.addEventListener("pointerdown", (e) => { drag = { x: e.offsetX, y: e.offsetY, cx: state.cx, cy: state.cy, moved: false }; canvas.setPointerCapture(e.pointerId); });
  canvas.addEventListener("pointermove", (e) => {
    if (drag) {
      const dx = e.offsetX - drag.x, dy = e.offsetY - drag.y;
      if (Math.abs(dx) + Math.abs(dy) > 3) drag.moved = true;
      if (drag.moved) { state.cx = drag.cx - (dx * dpr) / scale(); state.cy = drag.cy + (dy * dpr) / scale(); schedule(); return; }
    }
    showTip(nearest(e.offsetX * dpr, e.offsetY * dpr), e.offsetX * dpr, e.offsetY * dpr);
  });
  canvas.addEventListener("pointerup", (e) => {
    const click = drag && !drag.moved;
    drag = null;
    if (!click) return;
    const i = nearest(e.offsetX * dpr, e.offsetY * dpr);
    if (i >= 0) onOpen(data.feature_id[i]);
  });
  canvas.addEventListener("pointerleave", () => showTip(-1, 0, 0));
  canvas.addEventListener("wheel", (e) => {
    e.preventDefault();
    const [x, y] = toData(e.offsetX * dpr, e.offsetY * dpr);
    state.zoom = Math.min(400, Math.max(0.5, state.zoom * Math.exp(-e.deltaY * 0.0015)));
    const [x2, y2] = toData(e.offsetX * dpr, e.offsetY * dpr); // keep the point under the cursor still
    state.cx += x - x2; state.cy += y - y2;
    schedule();
  }, { passive: false });
  canvas.addEventListener("keydown", (e) => {
    const step = (0.15 * EXTENT) / state.zoom;
    const keys = { ArrowLeft: () => (state.cx -= step), ArrowRight: () => (state.cx += step), ArrowUp: () => (state.cy += step),
      ArrowDown: () => (state.cy -= step), "+": () => zoomBy(1.5), "=": () => zoomBy(1.5), "-": () => zoomBy(1 / 1.5) };
    if (e.key === "Enter") {
      const i = nearestToCentre();
      if (i >= 0) onOpen(data.feature_id[i]);
      return;
    }
    if (!keys[e.key]) return;
    e.preventDefault();
    keys[e.key]();
    const i = nearestToCentre();
    if (i >= 0) showTip(i, ...toScreen(xs[i], ys[i]));
  });
  canvas.addEventListener("focus", () => {
    state.focused = true;
    const i = nearestToCentre();
    if (i >= 0) showTip(i, ...toScreen(xs[i], ys[i]));
  });
  canvas.addEventListener("blur", () => { state.focused = false; showTip(-1, 0, 0); });
  colourBy.addEventListener("change", recolour);
  const observer = new ResizeObserver(schedule);
  observer.observe(canvas);

  recolour();
  draw(); // the first frame now, not on the next animation frame: the caller marks the map drawn
  // For tests: screen position of a feature, in CSS pixels relative to the canvas.
  canvas.locate = (id) => {
    const i = position.get(id);
    const [sx, sy] = toScreen(xs[i], ys[i]);
    return { x: sx / dpr, y: sy / dpr };
  };
}
