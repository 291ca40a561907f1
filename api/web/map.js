// The feature map on a canvas: one small square of pixels per feature (a DOM node per point would
// not survive 100k of them), pan by dragging or arrow keys, zoom with the wheel or +/-, hover for a label,
// click (or Enter, for the point nearest the centre cross) to open a feature.
// Three parts share one viewport (the pan and zoom): the spatial index says which point is at a
// screen position, the renderer paints frames, and input turns events into viewport changes.
import { h } from "/static/dom.js";

// Tableau 10 plus two, readable on light and dark backgrounds.
const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
  "#9c755f", "#bab0ac", "#17becf", "#bcbd22"];
const NONE = "#8a8f96"; // dead or unlabelled
// Density on a log scale in ten steps (cividis-like: tells apart without relying on red/green).
const RAMP = ["#00224e", "#123570", "#3b496c", "#575d6d", "#707173", "#8a8779", "#a59c74", "#c3b369", "#e1cc55", "#fee838"];
const GRID = 128; // hover lookup: the map's square is cut into GRID x GRID cells
const MOVING_POINTS = 131_072; // drawn in a frame while the view moves (see renderer)
const SETTLE_MS = 150; // rest before the whole map is drawn again
const LABEL_DELAY_MS = 120; // how long the pointer rests on a point before its label is asked for
// What placed the points (the document's layout field, from ingest/feature_map.py).
const LAYOUTS = {
  function: "placed by what they do: UMAP of document co-activation and firing windows",
  decoder: "placed by decoder direction: UMAP of the decoder directions",
};

// "#rrggbb" and an alpha byte as one RGBA pixel of a Uint32Array over ImageData (little-endian).
function packed(hex, alpha) {
  const v = parseInt(hex.slice(1), 16);
  return ((alpha << 24) | ((v & 0xff) << 16) | (v & 0xff00) | (v >> 16)) >>> 0;
}

// The ramp spans the live features' log density from the 1st to the 99th percentile: a fixed
// scale would paint most atlases in two or three colours.
function densityScale(density) {
  const logs = density.filter((d) => d > 0).map(Math.log10).sort((a, b) => a - b);
  const lo = logs.length ? logs[Math.floor(0.01 * (logs.length - 1))] : -6;
  const hi = logs.length ? logs[Math.ceil(0.99 * (logs.length - 1))] : -1;
  const colour = (d) => (d > 0 ? Math.max(0, Math.min(RAMP.length - 1, Math.floor(((Math.log10(d) - lo) / Math.max(hi - lo, 1e-6)) * RAMP.length))) : -1);
  return { lo, hi, colour };
}
const percent = (logd) => `${(100 * 10 ** logd).toPrecision(2)}%`;
const clampZoom = (zoom) => Math.min(400, Math.max(0.5, zoom));

// -- the points and the viewport, shared by the three parts ---------------------------------------

// Centred on the points' bounding box, with a margin (ingest stores them in [-1, 1]; older or
// imported maps need not be). Later levels of detail keep the first level's frame: a uniform
// sample spans the same box, and the view must not jump as points arrive.
function centred(data, frame = null) {
  const n = data.n;
  if (!frame) {
    let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
    for (let i = 0; i < n; i++) {
      x0 = Math.min(x0, data.x[i]); x1 = Math.max(x1, data.x[i]); y0 = Math.min(y0, data.y[i]); y1 = Math.max(y1, data.y[i]);
    }
    frame = { mx: n ? (x0 + x1) / 2 : 0, my: n ? (y0 + y1) / 2 : 0, extent: n ? 1.05 * Math.max(x1 - x0, y1 - y0, 1e-6) / 2 : 1 };
  }
  return {
    n,
    frame,
    xs: Float32Array.from(data.x, (v) => v - frame.mx),
    ys: Float32Array.from(data.y, (v) => v - frame.my),
    regions: data.regions.map((r) => ({ name: r.name, x: r.x - frame.mx, y: r.y - frame.my })),
    extent: frame.extent,
  };
}

// Screen positions are in the canvas's device pixels, not CSS ones, so points stay sharp on
// high-density screens; events convert with dpr.
function viewport(canvas, extent) {
  const state = { cx: 0, cy: 0, zoom: 1, hover: -1, focused: false };
  const dpr = window.devicePixelRatio || 1;
  const scale = () => (Math.min(canvas.width, canvas.height) / (2 * extent)) * state.zoom;
  const toScreen = (x, y) => [(x - state.cx) * scale() + canvas.width / 2, (state.cy - y) * scale() + canvas.height / 2];
  const toData = (sx, sy) => [(sx - canvas.width / 2) / scale() + state.cx, state.cy - (sy - canvas.height / 2) / scale()];
  return { canvas, state, dpr, extent, scale, toScreen, toData };
}

// -- spatial index -------------------------------------------------------------------------------

// Hover lookup: points bucketed by grid cell (a counting sort, O(n)), so a pointer move looks at a
// few cells rather than every point.
function spatialIndex({ n, xs, ys, extent }) {
  const cellOf = (x, y) => {
    const cx = Math.min(GRID - 1, Math.max(0, Math.floor(((x + extent) / (2 * extent)) * GRID)));
    const cy = Math.min(GRID - 1, Math.max(0, Math.floor(((y + extent) / (2 * extent)) * GRID)));
    return cy * GRID + cx;
  };
  const start = new Uint32Array(GRID * GRID + 1), order = new Uint32Array(n);
  for (let i = 0; i < n; i++) start[cellOf(xs[i], ys[i]) + 1]++;
  for (let c = 0; c < GRID * GRID; c++) start[c + 1] += start[c];
  const fill = start.slice(0, GRID * GRID);
  for (let i = 0; i < n; i++) order[fill[cellOf(xs[i], ys[i])]++] = i;

  // -1 when nothing lies within r: a pointer over empty space names no feature.
  function within(x, y, r) {
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

  // The keyboard's pick, however far (a linear scan: ~1 ms at 100k, once per key press).
  function closest(x, y) {
    let best = -1, bestD = Infinity;
    for (let i = 0; i < n; i++) {
      const d = (xs[i] - x) ** 2 + (ys[i] - y) ** 2;
      if (d < bestD) { bestD = d; best = i; }
    }
    return best;
  }
  return { within, closest };
}

// Hit testing in screen pixels: the radius stays 8 CSS pixels whatever the zoom.
function hitTester(index, vp) {
  return {
    at(sx, sy, radiusPx = 8 * vp.dpr) {
      const [x, y] = vp.toData(sx, sy);
      return index.within(x, y, radiusPx / vp.scale());
    },
    centre() {
      const [x, y] = vp.toData(vp.canvas.width / 2, vp.canvas.height / 2);
      return index.closest(x, y);
    },
  };
}

// -- renderer ------------------------------------------------------------------------------------

// Points grouped by colour, so each colour is set once per frame.
function colourGroups(data, byCluster, density) {
  const n = data.n;
  const colours = byCluster ? PALETTE : RAMP;
  const code = new Int16Array(n);
  for (let i = 0; i < n; i++) code[i] = byCluster ? (data.cluster[i] >= 0 ? data.cluster[i] % PALETTE.length : -1) : density.colour(data.density[i]);
  const groups = [{ colour: NONE, idx: [] }, ...colours.map((c) => ({ colour: c, idx: [] }))];
  for (let i = 0; i < n; i++) groups[code[i] + 1].idx.push(i);
  return groups;
}

function legendEntries(data, byCluster, density) {
  return [...(byCluster
    ? data.clusters.map((c) => h("span", { style: `--swatch:${PALETTE[c.id % PALETTE.length]}` }, `${c.name} (${c.size})`))
    : [h("span", { style: `--swatch:${RAMP[0]}` }, `density ≤ ${percent(density.lo)}`),
      h("span", { style: `--swatch:${RAMP[RAMP.length >> 1]}` }, percent((density.lo + density.hi) / 2)),
      h("span", { style: `--swatch:${RAMP[RAMP.length - 1]}` }, `≥ ${percent(density.hi)} of tokens`)]),
  h("span", { style: `--swatch:${NONE}` }, byCluster ? "unlabelled" : "dead")];
}

// The colours and the legend change together, from the select's current choice.
function recolour({ colourBy, legend }, data, density, frames) {
  const byCluster = colourBy.value === "cluster";
  frames.groups = colourGroups(data, byCluster, density);
  legend.replaceChildren(...legendEntries(data, byCluster, density));
  frames.schedule();
}

// Points are written straight into the pixel buffer: fillRect per point cost ~80 ms a frame
// at 100k points here, this costs a few. Highlighting dims the rest through the alpha byte.
function writePoints(pixels, w, hgt, groups, { xs, ys }, { s, ox, oy, size, alpha, shown }) {
  const half = size >> 1;
  for (const g of groups) {
    const c = packed(g.colour, alpha);
    for (const i of g.idx) { // ascending: the points before ``shown`` are the first levels of detail
      if (i >= shown) break;
      const px = Math.round(xs[i] * s + ox) - half, py = Math.round(oy - ys[i] * s) - half;
      if (px < 0 || py < 0 || px + size > w || py + size > hgt) continue;
      for (let dy = 0; dy < size; dy++) pixels.fill(c, (py + dy) * w + px, (py + dy) * w + px + size);
    }
  }
}

// Small squares when there are many points (larger ones merge into a blob), growing as one zooms in.
function pointSize(n, zoom, dpr) {
  return Math.max(1, Math.round(Math.min(8, (n > 20000 ? 1.6 : n > 2000 ? 2.5 : 4.5) * Math.sqrt(zoom)) * dpr));
}

// Region names at their points, largest region first (the server's order), in a halo of the
// background so they read over points. A name that would overlap one already drawn, or the canvas
// edge, waits for a zoom that spreads them apart. fillText draws the string as text, never markup.
function drawRegionNames(ctx, vp, regions, fg, bg) {
  const { canvas, dpr } = vp, drawn = [];
  ctx.font = `600 ${12 * dpr}px system-ui, sans-serif`;
  ctx.textAlign = "center";
  ctx.textBaseline = "middle";
  ctx.lineJoin = "round";
  ctx.lineWidth = 3 * dpr;
  for (const r of regions) {
    const [sx, sy] = vp.toScreen(r.x, r.y);
    const half = ctx.measureText(r.name).width / 2 + 4 * dpr, tall = 10 * dpr;
    const box = [sx - half, sy - tall, sx + half, sy + tall];
    if (box[0] < 0 || box[1] < 0 || box[2] > canvas.width || box[3] > canvas.height) continue;
    if (drawn.some((b) => box[0] < b[2] && b[0] < box[2] && box[1] < b[3] && b[1] < box[3])) continue;
    drawn.push(box);
    ctx.strokeStyle = bg;
    ctx.strokeText(r.name, sx, sy);
    ctx.fillStyle = fg;
    ctx.fillText(r.name, sx, sy);
  }
}

// Rings go on top of the pixels through the 2D context: a handful of paths, not worth hand-rasterising.
function drawRings(ctx, vp, { xs, ys }, indices, ring) {
  for (const i of indices) {
    const [sx, sy] = vp.toScreen(xs[i], ys[i]);
    ctx.beginPath();
    ctx.arc(sx, sy, 5 * vp.dpr, 0, 2 * Math.PI);
    ctx.fillStyle = "#e15759";
    ctx.fill();
    ctx.strokeStyle = ring;
    ctx.stroke();
  }
}

// The keyboard's cursor: Enter opens the point nearest the cross.
function drawCross(ctx, { canvas, dpr }, ring) {
  const cxs = canvas.width / 2, cys = canvas.height / 2, arm = 8 * dpr;
  ctx.strokeStyle = ring;
  ctx.beginPath();
  ctx.moveTo(cxs - arm, cys); ctx.lineTo(cxs + arm, cys); ctx.moveTo(cxs, cys - arm); ctx.lineTo(cxs, cys + arm);
  ctx.stroke();
}

// Any number of changes within one animation frame cost one draw. A frame that pans or zooms draws
// at most MOVING_POINTS points, the first levels of detail, a uniform sample: a million points
// cost ~100 ms a frame here, too slow to follow a drag. The whole map is drawn once the view has
// rested SETTLE_MS; a frame that only moves the hover ring draws it whole.
function renderer(vp, live) {
  const { canvas, state, dpr } = vp;
  const ctx = canvas.getContext("2d");
  const frames = { groups: [], names: true, schedule, draw };
  let pending = false, image = null, settle = 0, lastView = "";
  function schedule() {
    if (!pending) { pending = true; requestAnimationFrame(() => { pending = false; draw(true); }); }
  }

  function draw(moving = false) {
    const t0 = performance.now(); // each frame's cost is recorded for scripts/bench_ui.py
    if (!canvas.isConnected) { observer.disconnect(); return; } // the view was left
    const w = Math.round(canvas.clientWidth * dpr), hgt = Math.round(canvas.clientHeight * dpr);
    if (!w || !hgt) return;
    if (canvas.width !== w || canvas.height !== hgt) { canvas.width = w; canvas.height = hgt; }
    const s = vp.scale(), ox = canvas.width / 2 - state.cx * s, oy = canvas.height / 2 + state.cy * s;
    if (!image || image.width !== w || image.height !== hgt) image = ctx.createImageData(w, hgt); // reused: no garbage per frame
    const pixels = new Uint32Array(image.data.buffer);
    pixels.fill(0);
    const { points, marked } = live;
    const view = `${state.cx} ${state.cy} ${state.zoom} ${w} ${hgt}`;
    const shown = moving && view !== lastView ? Math.min(points.n, MOVING_POINTS) : points.n;
    lastView = view;
    clearTimeout(settle);
    if (shown < points.n) settle = setTimeout(draw, SETTLE_MS);
    writePoints(pixels, w, hgt, frames.groups, points,
      { s, ox, oy, size: pointSize(points.n, state.zoom, dpr), alpha: marked.size ? 90 : 220, shown });
    ctx.putImageData(image, 0, 0);
    const style = getComputedStyle(document.documentElement);
    const ring = style.getPropertyValue("--fg").trim() || "#000";
    if (frames.names) drawRegionNames(ctx, vp, points.regions, ring, style.getPropertyValue("--bg").trim() || "#fff");
    ctx.lineWidth = 2 * dpr;
    drawRings(ctx, vp, points, [...marked, ...(state.hover >= 0 ? [state.hover] : [])], ring);
    if (state.focused) drawCross(ctx, vp, ring);
    performance.measure("fa:draw", { start: t0, detail: { points: shown } });
  }

  const observer = new ResizeObserver(schedule);
  observer.observe(canvas);
  return frames;
}

// -- input ---------------------------------------------------------------------------------------

// The hovered point is ringed as well as named, hence the redraw. Labels are not part of the map's
// points (a million of them would outweigh the points): the tooltip asks for each one once.
function tooltip(tip, data, vp, schedule, labelOf) {
  return function showTip(i, sx, sy) {
    vp.state.hover = i;
    if (i < 0) { tip.style.display = "none"; schedule(); return; }
    const d = data.density[i], id = data.feature_id[i];
    const text = (label) => `#${id} ${label} · density ${d > 0 ? (100 * d).toPrecision(2) + "%" : "dead"}`;
    tip.textContent = text("…");
    // Asked only once the pointer rests: a sweep across the map does not ask for every point passed.
    setTimeout(() => {
      if (vp.state.hover === i) labelOf(id).then((label) => { if (vp.state.hover === i) tip.textContent = text(label || "(no label)"); });
    }, LABEL_DELAY_MS);
    tip.style.display = "block";
    tip.style.left = `${Math.min(sx / vp.dpr + 12, vp.canvas.clientWidth - 200)}px`;
    tip.style.top = `${sy / vp.dpr + 12}px`;
    schedule();
  };
}

// Pointer: drag pans, a click that did not drag opens the point under it.
function bindPointer(vp, { hit, showTip, open, schedule }) {
  const { canvas, state, dpr } = vp;
  let drag = null;
  canvas.addEventListener("pointerdown", (e) => { drag = { x: e.offsetX, y: e.offsetY, cx: state.cx, cy: state.cy, moved: false }; canvas.setPointerCapture(e.pointerId); });
  canvas.addEventListener("pointermove", (e) => {
    if (drag) {
      const dx = e.offsetX - drag.x, dy = e.offsetY - drag.y;
      if (Math.abs(dx) + Math.abs(dy) > 3) drag.moved = true;
      if (drag.moved) { state.cx = drag.cx - (dx * dpr) / vp.scale(); state.cy = drag.cy + (dy * dpr) / vp.scale(); schedule(); return; }
    }
    showTip(hit.at(e.offsetX * dpr, e.offsetY * dpr), e.offsetX * dpr, e.offsetY * dpr);
  });
  canvas.addEventListener("pointerup", (e) => {
    const click = drag && !drag.moved;
    drag = null;
    if (click) open(hit.at(e.offsetX * dpr, e.offsetY * dpr));
  });
  canvas.addEventListener("pointerleave", () => showTip(-1, 0, 0));
}

function bindWheel(vp, schedule) {
  const { canvas, state, dpr } = vp;
  canvas.addEventListener("wheel", (e) => {
    e.preventDefault();
    const [x, y] = vp.toData(e.offsetX * dpr, e.offsetY * dpr);
    state.zoom = clampZoom(state.zoom * Math.exp(-e.deltaY * 0.0015));
    const [x2, y2] = vp.toData(e.offsetX * dpr, e.offsetY * dpr); // keep the point under the cursor still
    state.cx += x - x2; state.cy += y - y2;
    schedule();
  }, { passive: false });
}

// Keyboard users see the centre cross instead of a pointer: the tooltip follows the point nearest
// it, the one Enter opens.
function bindKeys(vp, { hit, showTip, open, zoomBy, live }) {
  const { canvas, state } = vp;
  const tipAtCentre = () => {
    const i = hit.centre();
    if (i >= 0) showTip(i, ...vp.toScreen(live.points.xs[i], live.points.ys[i]));
  };
  canvas.addEventListener("keydown", (e) => {
    const step = (0.15 * vp.extent) / state.zoom;
    const keys = { ArrowLeft: () => (state.cx -= step), ArrowRight: () => (state.cx += step), ArrowUp: () => (state.cy += step),
      ArrowDown: () => (state.cy -= step), "+": () => zoomBy(1.5), "=": () => zoomBy(1.5), "-": () => zoomBy(1 / 1.5) };
    if (e.key === "Enter") { open(hit.centre()); return; }
    if (!keys[e.key]) return;
    e.preventDefault();
    keys[e.key]();
    tipAtCentre();
  });
  canvas.addEventListener("focus", () => { state.focused = true; tipAtCentre(); });
  canvas.addEventListener("blur", () => { state.focused = false; showTip(-1, 0, 0); });
}

// ``live`` holds what a new level of detail replaces (data, points, hit): handlers read it at each event.
function bindInput(els, vp, live, { frames, onOpen, labelOf }) {
  const { state } = vp, schedule = frames.schedule;
  const zoomBy = (f) => { state.zoom = clampZoom(state.zoom * f); schedule(); };
  const open = (i) => { if (i >= 0) onOpen(live.data.feature_id[i]); };
  const hit = { at: (...a) => live.hit.at(...a), centre: () => live.hit.centre() };
  const showTip = (i, sx, sy) => tooltip(els.tip, live.data, vp, schedule, labelOf)(i, sx, sy);
  els.zoomIn.addEventListener("click", () => zoomBy(1.5));
  els.zoomOut.addEventListener("click", () => zoomBy(1 / 1.5));
  els.reset.addEventListener("click", () => { Object.assign(state, { cx: 0, cy: 0, zoom: 1 }); schedule(); });
  bindPointer(vp, { hit, showTip, open, schedule });
  bindWheel(vp, schedule);
  bindKeys(vp, { hit, showTip, open, zoomBy, live });
}

// -- the view ------------------------------------------------------------------------------------

// The handlers are bound later, by bindInput: building the DOM needs none of the map's state.
function mapView(view, data, highlight, title, labelOf) {
  const n = data.total;
  const els = {
    canvas: h("canvas", {
      tabindex: "0", role: "img", id: "map-canvas",
      "aria-label": `Map of ${n.toLocaleString("en")} features, in regions: ${data.regions.map((r) => r.name).join("; ")}. Drag or use the arrow keys to pan, the wheel or plus and minus to zoom, Enter to open the feature nearest the centre cross.`,
    }),
    names: h("input", { type: "checkbox", checked: true }),
    tip: h("div", { class: "tooltip", role: "status" }),
    colourBy: h("select", { "aria-label": "Colour points by" },
      h("option", { value: "density" }, "colour by density"), h("option", { value: "cluster" }, "colour by label cluster")),
    legend: h("div", { class: "legend", "aria-label": "legend" }),
    zoomIn: h("button", { type: "button", "aria-label": "zoom in" }, "+"),
    zoomOut: h("button", { type: "button", "aria-label": "zoom out" }, "−"),
    reset: h("button", { type: "button" }, "reset"),
    shown: h("span", { class: "meta" }),
  };
  const listed = highlight.map((id) => { const a = h("a", { href: `/features/${id}` }, `#${id}`); labelOf(id).then((l) => a.append(` ${l || ""}`)); return h("li", {}, a); });
  view.replaceChildren(
    h("h1", {}, title || "Map of the features"),
    h("div", { class: "toolbar" }, els.colourBy, h("label", {}, els.names, " region names"), els.zoomIn, els.zoomOut, els.reset,
      els.shown),
    h("div", { class: "map-wrap" }, els.canvas, els.tip),
    els.legend,
    listed.length ? h("section", {}, h("h2", {}, "Highlighted"), h("ol", { class: "neighbors" }, listed)) : "",
  );
  return els;
}

function shownText(data) {
  const all = data.n === data.total ? data.total.toLocaleString("en") : `${data.n.toLocaleString("en")} of ${data.total.toLocaleString("en")} (loading the rest)`;
  return `${all} features · ${LAYOUTS[data.layout] || data.layout}`;
}

// The positions of ``ids`` among the points (-1 where not loaded yet): one pass, no map of every id.
function positionsOf(data, ids) {
  const want = new Map(ids.map((id, k) => [id, k])), out = ids.map(() => -1);
  for (let i = 0; i < data.n; i++) { const k = want.get(data.feature_id[i]); if (k !== undefined) out[k] = i; }
  return out;
}

// ``data``: the first level of detail (typed arrays feature_id, x, y, density, cluster; n of
// total; clusters, regions, layout). Returns a function that takes the same with more points.
export function drawMap(view, data, { highlight = [], title = null, onOpen, labelOf }) {
  const els = mapView(view, data, highlight, title, labelOf);
  const live = { data, points: centred(data), marked: new Set() };
  const vp = viewport(els.canvas, live.points.extent);
  const frames = renderer(vp, live);
  bindInput(els, vp, live, { frames, onOpen, labelOf });
  const show = (d, points) => {
    Object.assign(live, { data: d, points, hit: hitTester(spatialIndex(points), vp) });
    live.marked = new Set(positionsOf(d, highlight).filter((i) => i >= 0));
    live.density = densityScale(d.density);
    els.shown.textContent = shownText(d);
    recolour(els, d, live.density, frames);
  };
  show(data, live.points);
  els.colourBy.addEventListener("change", () => recolour(els, live.data, live.density, frames));
  els.names.addEventListener("change", () => { frames.names = els.names.checked; frames.schedule(); });
  frames.draw(); // the first frame now, not on the next animation frame: the caller marks the map drawn
  // For tests: screen position of a feature, in CSS pixels relative to the canvas.
  els.canvas.locate = (id) => {
    const [i] = positionsOf(live.data, [id]);
    if (i < 0) return null; // not in the levels loaded so far
    const [sx, sy] = vp.toScreen(live.points.xs[i], live.points.ys[i]);
    return { x: sx / vp.dpr, y: sy / vp.dpr };
  };
  return (more) => { show(more, centred(more, live.points.frame)); frames.draw(); };
}
