// The helpers every view uses: building elements safely, calling the JSON API, formatting numbers and
// tokens, and saying when a view is drawn.

// Attributes are set as attributes and children appended as nodes or text: corpus text never
// becomes markup.
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "style") el.style.cssText = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined && c !== false) el.append(c);
  return el;
}

export async function api(path, body) {
  const init = body === undefined ? {} : { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) };
  const r = await fetch(path, init);
  const data = await r.json().catch(() => ({}));
  if (!r.ok) {
    const message = data.detail ? `${data.error}: ${typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail)}` : (data.error || r.statusText);
    // A view that explains errors itself reads the status, the API's detail and when to ask again.
    throw Object.assign(new Error(message), { status: r.status, detail: data.detail, retryAfter: r.headers.get("retry-after") });
  }
  return data;
}

// When the view's data is on screen, for tests and scripts/bench_ui.py.
export function done(name) {
  document.body.dataset.ready = name;
  performance.mark(`fa:${name}`);
}

export const fmt = {
  pct: (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(x < 0.001 ? 4 : x < 0.1 ? 2 : 1)}%`),
  num: (x, d = 3) => (x === null || x === undefined ? "–" : Number(x).toPrecision(d)),
  int: (x) => (x === null || x === undefined ? "–" : Number(x).toLocaleString("en")),
};

// Tokens as the model saw them: newlines and tabs made visible, leading spaces kept.
export const showToken = (t) => t.replace(/\n/g, "⏎").replace(/\t/g, "⇥");
