// The atlas in a browser: one page, six views (home, search, feature, probe, map, steer), all drawn
// from the JSON API of the same server. No framework and no build step: the files served are the
// files in this folder. Text from the corpus is untrusted, so it only ever enters the page as
// textContent (the `h` helper), never as HTML.
import { api, done, fmt, h, showToken } from "/static/dom.js";
import { drawMap } from "/static/map.js";
import { steer } from "/static/steer.js";

const view = document.getElementById("view");

const featureLink = (id, label) => h("a", { href: `/features/${id}` }, `#${id}`, label ? ` ${label}` : "");

function fail(err) {
  view.replaceChildren(h("h1", {}, "Something went wrong"), h("p", { class: "error", role: "alert" }, String(err.message || err)));
  done("error");
}

// -- home --------------------------------------------------------------------------------------

async function home() {
  const [a, best] = await Promise.all([api("/api/atlas"), api("/api/features?sort=label_score&limit=15")]);
  const m = a.metrics || {};
  const corpus = a.corpus || {};
  const stat = (k, v) => h("div", {}, h("dt", {}, k), h("dd", {}, v));
  document.title = `Feature Atlas: ${a.model?.name ?? "atlas"}`;
  view.replaceChildren(
    h("h1", {}, `${a.model?.name ?? "?"}, layer ${a.hook?.layer ?? "?"}`),
    h("dl", { class: "stats" },
      stat("features", fmt.int(a.dictionary?.d_sae)),
      stat("architecture", `${a.dictionary?.architecture ?? "?"}${a.dictionary?.k ? `, k=${a.dictionary.k}` : ""}`),
      stat("L0 (held out)", fmt.num(m.l0)),
      stat("variance explained", fmt.pct(m.variance_explained)),
      stat("loss recovered", fmt.pct(m.loss_recovered)),
      stat("dead features", fmt.pct(m.dead_fraction)),
      a.firing ? stat("never fired / rare", `${fmt.int(a.firing.dead)} / ${fmt.int(a.firing.rare)} (under ${a.firing.rare_below_windows} windows of the corpus)`) : "",
      stat("corpus", (corpus.sources || []).join(", ") || "–"),
      stat("documents", fmt.int(corpus.documents)),
      stat("tokens", fmt.int(a.tokens?.harvested)),
      stat("labels", a.labels ? `${a.labels.explainer}, mean score ${fmt.num(a.labels.label_score_mean)}` : "–"),
    ),
    h("form", { role: "search", action: "/search", style: "margin:1.2rem 0" },
      h("input", { type: "search", name: "q", "aria-label": "Search features", placeholder: "e.g. Python function arguments, French, kings and queens" })),
    h("h2", {}, "Best-labelled features"),
    h("ul", { class: "hits" }, best.features.map((f) => h("li", {},
      featureLink(f.feature_id, f.label),
      h("div", { class: "meta" }, `score ${fmt.num(f.label_score)} · density ${fmt.pct(f.density)}`)))),
  );
  done("home");
}

// -- search ------------------------------------------------------------------------------------

function snippet(text) {
  // The API marks the strongest token as [[token]].
  const out = h("div", { class: "snippet" });
  if (!text) return out;
  const i = text.indexOf("[["), j = text.indexOf("]]", i + 2);
  if (i < 0 || j < 0) { out.append(text); return out; }
  out.append(text.slice(0, i), h("mark", {}, text.slice(i + 2, j)), text.slice(j + 2));
  return out;
}

async function search(params) {
  const q = (params.get("q") || "").trim();
  document.querySelector("#searchbar input").value = q;
  if (!q) {
    view.replaceChildren(h("h1", {}, "Search"), h("p", { class: "muted" }, "Type what you are looking for in the box above: a topic, a word, a code construct."));
    return done("search");
  }
  const dictionary = params.get("dictionary") || "";
  view.replaceChildren(h("h1", {}, `Features for “${q}”`), h("p", { class: "muted" }, "Searching…"));
  const [r, dicts] = await Promise.all([
    api(`/api/search?${new URLSearchParams({ q, k: "20", ...(dictionary ? { dictionary } : {}) })}`),
    api("/api/dictionaries"),
  ]);
  const ids = r.hits.map((x) => x.feature_id).join(",");
  const c = r.coverage;
  // With several dictionaries (widths at one hook), search spans them all or keeps to one.
  const choice = (id, text) => id === dictionary ? h("strong", { "aria-current": "true" }, text)
    : h("a", { href: `/search?${new URLSearchParams({ q, ...(id ? { dictionary: id } : {}) })}` }, text);
  const picker = dicts.dictionaries.length < 2 ? "" : h("nav", { class: "meta", "aria-label": "dictionary", id: "dictionary-picker" },
    "In ", choice("", "every dictionary"), dicts.dictionaries.flatMap((d) => [" · ", choice(d.dictionary, d.dictionary)]));
  view.replaceChildren(
    h("h1", {}, `Features for “${q}”${dictionary ? ` in ${dictionary}` : ""}`),
    picker,
    h("p", { class: r.confident ? "verdict" : "verdict weak" }, r.confident
      ? `Found features about “${q}”: ${c.windows}${c.capped ? "+" : ""} of ${c.windows_total} corpus windows (${c.documents} of ${c.documents_total} documents) are about it.`
      : r.message),
    c.snippets.length ? h("details", {}, h("summary", {}, "where the corpus comes closest"),
      h("ul", {}, c.snippets.map((sn) => h("li", {}, h("span", { class: "muted" }, `${sn.title} (${sn.source}, similarity ${sn.similarity.toFixed(2)}): `), sn.text)))) : "",
    h("p", { class: "meta" }, `${r.hits.length} features · `, r.hits.length ? h("a", { href: `/map?${new URLSearchParams({ highlight: ids, q })}` }, "show them on the map") : ""),
    h("ol", { class: "hits" }, r.hits.map((x) => h("li", { class: x.strong ? "" : "weak" },
      featureLink(x.feature_id, x.label),
      x.strong ? "" : h("span", { class: "badge weak", title: "not clearly more than chance" }, "weak"),
      x.description ? h("div", { class: "muted" }, x.description) : "",
      h("div", { class: "meta" },
        `evidence ${x.evidence.toFixed(1)} · density ${fmt.pct(x.density)}${x.down_weighted ? " (dense: down-weighted)" : ""} · matched by `,
        Object.entries(x.matched_by).map(([sig, rank]) => h("span", { class: "badge", title: `rank ${rank} by ${sig}` }, `${sig} #${rank}`))),
      snippet(x.snippet)))),
  );
  done("search");
}

// -- feature page ------------------------------------------------------------------------------

function shadedTokens(tokens, values, max) {
  // Background opacity is the activation over the feature's maximum; the value is on hover and
  // in the accessible name, so it is not conveyed by colour alone.
  const line = h("div", { class: "example" });
  tokens.forEach((t, i) => {
    const v = values[i] || 0;
    if (v <= 0) { line.append(h("span", { class: "tok" }, showToken(t))); return; }
    const a = Math.min(1, v / (max || 1));
    line.append(h("span", {
      class: "tok", "data-act": v.toFixed(3), title: `${v.toFixed(3)}`, tabindex: "0",
      "aria-label": `${t.trim() || "space"}: ${v.toFixed(2)}`, style: `background: rgb(var(--hot) / ${(0.12 + 0.78 * a).toFixed(3)})`,
    }, showToken(t)));
  });
  return line;
}

function histogram(counts, edges) {
  const svgNS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(svgNS, "svg");
  svg.setAttribute("class", "histogram");
  svg.setAttribute("viewBox", `0 0 ${counts.length * 10} 100`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `activation histogram, ${counts.length} bins from 0 to ${fmt.num(edges[edges.length - 1])}`);
  const top = Math.log1p(Math.max(1, ...counts));
  counts.forEach((c, i) => {
    const r = document.createElementNS(svgNS, "rect");
    const hgt = c ? Math.max(2, (98 * Math.log1p(c)) / top) : 0;
    r.setAttribute("x", i * 10 + 1); r.setAttribute("width", 8);
    r.setAttribute("y", 100 - hgt); r.setAttribute("height", hgt);
    const t = document.createElementNS(svgNS, "title");
    t.textContent = `${fmt.num(edges[i])}–${fmt.num(edges[i + 1])}: ${c.toLocaleString("en")} tokens`;
    r.append(t);
    svg.append(r);
  });
  return svg;
}

function neighbourList(request) {
  // Filled in when its request answers: the page does not wait for the slowest list.
  const box = h("div", {}, h("p", { class: "muted" }, "loading…"));
  request.then((list) => box.replaceChildren(list.neighbors.length
    ? h("ol", { class: "neighbors" }, list.neighbors.map((n) => h("li", {},
      featureLink(n.feature_id, n.label), h("span", { class: "meta" }, ` ${n.similarity.toFixed(3)}`))))
    : h("p", { class: "muted" }, "none")))
    .catch((err) => box.replaceChildren(h("p", { class: "muted" }, `unavailable (${err.message})`)));
  return { box, request };
}

function familySection(fam) {
  // A feature of one of several dictionaries at a hook point (widths trained apart, or a nested
  // dictionary's prefixes): its parent in the narrower dictionary and its children in the
  // wider ones, each with its dictionary, label, density, the link's scores and its strongest example shaded.
  if (!fam) return "";
  const member = (m) => h("li", {},
    featureLink(m.feature_id, m.label),
    h("span", { class: "meta" }, ` ${m.dictionary} · density ${fmt.pct(m.density)} · decoder cosine ${m.decoder_cosine.toFixed(2)} · co-fires ${fmt.pct(m.coactivation)}`),
    m.example ? shadedTokens(m.example.tokens, m.example.activations, Math.max(...m.example.activations)) : "");
  return h("section", { "aria-label": "feature family", id: "family" },
    h("h2", {}, `Family (in ${fam.dictionary})`),
    h("h3", {}, "Parent"),
    fam.parent ? h("ul", { class: "family" }, member(fam.parent)) : h("p", { class: "muted" }, "none: it is in the narrowest dictionary"),
    h("h3", {}, fam.n_children > fam.children.length ? `Children (the ${fam.children.length} closest of ${fam.n_children})`
      : `Children (${fam.n_children})`),
    fam.children.length ? h("ul", { class: "family" }, fam.children.map(member)) : h("p", { class: "muted" }, "none in the wider dictionaries"));
}

async function feature(id) {
  // All three requests start together; the page is drawn when the feature arrives, and each
  // neighbour list when its own answer does.
  const byDecoder = neighbourList(api(`/api/features/${id}/neighbors?by=decoder&k=10`));
  const byCoactivation = neighbourList(api(`/api/features/${id}/neighbors?by=coactivation&k=10`));
  const f = await api(`/api/features/${id}`);
  document.title = `#${id} ${f.label || ""} · Feature Atlas`;
  const scores = (f.label_scores || []).map((s) => `${s.scorer} ${fmt.num(s.score)}`).join(", ");
  const examples = (list) => list.length ? list.map((e) => shadedTokens(e.tokens, e.activations, f.max_activation))
    : [h("p", { class: "muted" }, "none (the feature never fired on the corpus)")];
  const logits = (list) => h("ul", { class: "logits" }, (list || []).map((l) => h("li", {}, h("span", {}, showToken(l.token)), h("span", {}, l.value.toFixed(3)))));
  view.replaceChildren(
    h("h1", {}, `#${f.feature_id} `, f.label || h("span", { class: "muted" }, "(no label)")),
    f.description ? h("p", { class: "muted" }, f.description) : "",
    h("p", { class: "meta" },
      `label by ${f.label_source || "?"}${f.label_score !== null && f.label_score !== undefined ? ` · label score ${fmt.num(f.label_score)}` : ""}${scores ? ` (${scores})` : ""}`,
      f.single_token ? " · single-token feature" : "",
      " · ", h("a", { href: `/features/${f.feature_id}`, rel: "bookmark" }, "permalink"),
      " · ", h("a", { href: `/map?feature=${f.feature_id}` }, "on the map"),
      " · ", h("a", { href: `/steer?f=${f.feature_id}:2:clamp` }, "Steer with this feature")),
    h("dl", { class: "stats" },
      ...[["density", fmt.pct(f.density)], ["fires on", `${fmt.int(f.n_active)} tokens, ${fmt.int(f.n_windows)} windows`],
        ["max activation", fmt.num(f.max_activation)], ["mean activation", fmt.num(f.mean_activation)]]
        .map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, v)))),
    h("h2", {}, "Activation histogram"),
    f.histogram && f.histogram.length ? histogram(f.histogram, f.histogram_edges) : h("p", { class: "muted" }, "none"),
    familySection(f.family),
    h("h2", {}, "Top examples"),
    h("section", { "aria-label": "top examples", id: "top-examples" }, examples(f.top_examples)),
    h("h2", {}, "Examples across activation quantiles"),
    h("section", { "aria-label": "quantile examples" }, examples(f.quantile_examples)),
    h("div", { class: "columns" },
      h("section", {}, h("h2", {}, "Promotes (logits)"), logits(f.logit_positive)),
      h("section", {}, h("h2", {}, "Suppresses (logits)"), logits(f.logit_negative)),
      h("section", {}, h("h2", {}, "Decoder neighbours"), byDecoder.box),
      h("section", {}, h("h2", {}, "Co-activation neighbours"), byCoactivation.box)),
  );
  done("feature");
  await Promise.allSettled([byDecoder.request, byCoactivation.request]);
  performance.mark("fa:feature-complete"); // the neighbour lists are in too
}

// -- probe -------------------------------------------------------------------------------------

async function probe(params) {
  const text = h("textarea", { id: "probe-text", "aria-label": "Text to run through the model" }, params.get("text") || "");
  const out = h("div", { "aria-live": "polite" });
  const run = async (ev) => {
    ev?.preventDefault();
    if (!text.value.trim()) return;
    out.replaceChildren(h("p", { class: "muted" }, "Running the model…"));
    try {
      showProbe(out, await api("/api/activations", { text: text.value, k: 8 }));
    } catch (err) {
      out.replaceChildren(h("p", { class: "error", role: "alert" }, err.message));
    }
    done("probe");
  };
  view.replaceChildren(
    h("h1", {}, "Probe"),
    h("p", { class: "muted" }, "Run text through the model and the dictionary. Each token is shaded by how strongly its features fire compared with the most they fire anywhere in the corpus. Select a token to list its features, then a feature to shade the text by it alone."),
    h("form", { onsubmit: run }, text, h("p", {}, h("button", { type: "submit" }, "Run"))),
    out,
  );
  if (text.value.trim()) await run(); else done("probe");
}

function showProbe(out, result) {
  // Shading is relative activation (value over the feature's corpus maximum), capped at 1.
  const tokens = result.tokens;
  const detail = h("section", { "aria-label": "features of the selected token" });
  let shadeBy = null;
  const buttons = tokens.map((t, i) => h("button", {
    type: "button", "aria-pressed": "false", "data-index": String(i), onclick: () => select(i),
  }, showToken(t.token)));
  const shade = () => {
    const value = (t) => (shadeBy === null ? Math.max(0, ...t.features.map((f) => f.relative))
      : (t.features.find((f) => f.feature_id === shadeBy)?.relative || 0));
    buttons.forEach((b, i) => {
      const v = value(tokens[i]);
      b.style.background = v > 0 ? `rgb(var(--hot) / ${(0.1 + 0.8 * Math.min(1, v)).toFixed(3)})` : "";
      b.dataset.act = v.toFixed(3);
      b.title = v > 0 ? `${(100 * v).toFixed(0)}% of its corpus maximum` : "";
    });
  };
  function select(i) {
    buttons.forEach((b, j) => b.setAttribute("aria-pressed", String(i === j)));
    const t = tokens[i];
    detail.replaceChildren(
      h("h2", {}, `Token “${showToken(t.token)}”`),
      t.features.length ? h("ol", { class: "neighbors" }, t.features.map((f) => h("li", {},
        featureLink(f.feature_id, f.label), h("span", { class: "meta" }, ` ${f.value.toFixed(3)} (${(100 * f.relative).toFixed(0)}% of max) `),
        h("button", { type: "button", onclick: () => { shadeBy = f.feature_id; shade(); } }, "shade by this")))) : h("p", { class: "muted" }, "no feature fires here"),
      shadeBy !== null ? h("p", {}, h("button", { type: "button", onclick: () => { shadeBy = null; shade(); } }, "shade by strongest feature again")) : "",
    );
  }
  shade();
  out.replaceChildren(h("div", { class: "probe-tokens", id: "probe-tokens" }, buttons), detail);
}

// -- map ---------------------------------------------------------------------------------------

// One level of detail of the map's points: binary columns, each whole, in the head's order. A
// level from another atlas than the head's (a publish while the map loads) is refused, not joined.
async function mapLevel(head, level) {
  const r = await fetch(`/api/map/points/${level}`);
  if (!r.ok) throw new Error(`map level ${level}: ${r.statusText}`);
  const buffer = await r.arrayBuffer(), count = head.levels[level], out = {};
  if (r.headers.get("x-atlas-version") !== head.version || buffer.byteLength !== 4 * count * head.columns.length) {
    throw new Error("the atlas was published again while the map loaded: reload the page to see the new one");
  }
  head.columns.forEach(([name, type], k) => {
    out[name] = new (type === "int32" ? Int32Array : Float32Array)(buffer, 4 * count * k, count);
  });
  return out;
}

// The levels so far as one set of points (typed arrays grown by concatenation).
function joinLevels(head, parts) {
  const n = parts.reduce((a, p) => a + p.feature_id.length, 0), data = { ...head, n, total: head.n };
  for (const [name, type] of head.columns) {
    const all = new (type === "int32" ? Int32Array : Float32Array)(n);
    let at = 0;
    for (const p of parts) { all.set(p[name], at); at += p[name].length; }
    data[name] = all;
  }
  return data;
}

// A feature's label, asked for once (the map's tooltip and highlight list); a failed ask is
// forgotten, so the next hover asks again.
const labels = new Map();
const labelOf = (id) => {
  if (!labels.has(id)) labels.set(id, api(`/api/features/${id}`).then((f) => f.label, () => { labels.delete(id); return null; }));
  return labels.get(id);
};

// The levels after the first, added as they arrive while the map is already in use; a failure
// says so above the map and leaves the points already drawn.
async function addLevels(head, parts, update, canvas) {
  try {
    for (let level = parts.length; level < head.levels.length; level++) {
      parts.push(await mapLevel(head, level));
      if (!canvas.isConnected) return; // the view was left
      update(joinLevels(head, parts));
    }
    done("map-full");
  } catch (err) {
    if (!canvas.isConnected) return;
    canvas.parentElement.before(h("p", { class: "error", role: "alert" }, `Only part of the map is shown: ${err.message || err}`));
    done("map-error");
  }
}

// The first level of detail is drawn as soon as it arrives (a uniform sample: the whole map's
// shape), the rest are added level by level; ``map`` marks the first draw, ``map-full`` the last.
async function map(params) {
  view.replaceChildren(h("h1", {}, "Map of the features"), h("p", { class: "muted" }, "Loading the map…"));
  let highlight = (params.get("highlight") || "").split(",").filter(Boolean).map(Number).filter((id) => Number.isInteger(id) && id >= 0);
  const center = params.has("feature") ? Number(params.get("feature")) : null;
  const [head, near] = await Promise.all([
    api("/api/map/head"),
    center === null ? null : api(`/api/features/${center}/neighbors?by=decoder&k=10`).catch(() => null),
  ]);
  if (center !== null) highlight = [center, ...(near ? near.neighbors.map((n) => n.feature_id) : [])];
  for (const n of near ? near.neighbors : []) labels.set(n.feature_id, Promise.resolve(n.label));
  const title = center !== null ? `Feature #${center} and its decoder neighbours`
    : params.get("q") ? `Search results for “${params.get("q")}”` : null;
  const parts = [await mapLevel(head, 0)];
  const update = drawMap(view, joinLevels(head, parts), { highlight, title, labelOf, onOpen: (id) => navigate(`/features/${id}`) });
  const canvas = view.querySelector("#map-canvas");
  done("map");
  if (head.levels.length > 1) addLevels(head, parts, update, canvas); // not awaited: the view is ready with the first level
}

// -- routing -----------------------------------------------------------------------------------

async function route() {
  const { pathname, searchParams } = new URL(location.href);
  document.body.dataset.ready = "";
  view.classList.toggle("wide", pathname === "/map");
  try {
    const m = pathname.match(/^\/features\/(\d+)$/);
    if (m) await feature(Number(m[1]));
    else if (pathname === "/search") await search(searchParams);
    else if (pathname === "/probe") await probe(searchParams);
    else if (pathname === "/map") await map(searchParams);
    else if (pathname === "/steer") await steer(view, searchParams);
    else await home();
  } catch (err) {
    fail(err);
  }
}

function navigate(url) {
  history.pushState(null, "", url);
  window.scrollTo(0, 0);
  route().then(() => view.focus({ preventScroll: true }));
}

document.addEventListener("click", (ev) => {
  const a = ev.target.closest("a");
  if (!a || a.target || ev.ctrlKey || ev.metaKey || ev.shiftKey || ev.button !== 0) return;
  const url = new URL(a.href, location.href);
  const page = url.origin === location.origin && !/^\/(api|schema|static)\b/.test(url.pathname);
  if (!page || (url.pathname === location.pathname && url.search === location.search && url.hash)) return;
  ev.preventDefault();
  navigate(url.pathname + url.search);
});

document.addEventListener("submit", (ev) => {
  const form = ev.target;
  if (form.getAttribute("action") !== "/search") return;
  ev.preventDefault();
  const q = new FormData(form).get("q") || "";
  navigate(`/search?${new URLSearchParams({ q })}`);
});

window.addEventListener("popstate", route);
route();
