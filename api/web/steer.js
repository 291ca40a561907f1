// The Steer view: continue a prompt twice, untouched and with chosen features clamped or added, and
// show both continuations side by side, each token shaded by a steered feature's activation.
import { api, done, fmt, h, showToken } from "/static/dom.js";

// The whole form lives in the URL, so a steer is shareable: one f=<id>:<value>:<mode> per feature,
// the value in units of the feature's corpus maximum, then the prompt and any option not at its
// default. Only Run writes it (replaceState): typing does not flood the history.
const STEER_DEFAULTS = { tokens: "32", temperature: "0", seed: "0" };
// torch seeds take 64 bits; the form keeps to 32, well inside what the server accepts.
const MAX_SEED = 2 ** 32 - 1;

function steerRow({ id = "", value = "2", mode = "clamp" } = {}) {
  const idBox = h("input", { type: "number", class: "steer-id", min: "0", step: "1", required: true, value: id, "aria-label": "feature id" });
  const label = h("span", { class: "steer-label" });
  const slider = h("input", { type: "range", min: "-10", max: "10", step: "0.1", value, "aria-label": "value" });
  const number = h("input", { type: "number", class: "steer-value", min: "-100", max: "100", step: "any", required: true, value,
    "aria-label": "value, times the feature's maximum activation" });
  slider.addEventListener("input", () => { number.value = slider.value; });
  number.addEventListener("input", () => { slider.value = number.value; });
  const modeBox = h("select", { class: "steer-mode", "aria-label": "mode" }, ["clamp", "add"].map((m) => h("option", { value: m }, m)));
  modeBox.value = mode === "add" ? "add" : "clamp";
  const lookUp = () => idBox.value === "" ? label.replaceChildren()
    : api(`/api/features/${Number(idBox.value)}`).then((f) => nameRow(row, f.label))
      .catch((err) => label.replaceChildren(h("span", { class: "error" }, typeof err.detail === "string" ? err.detail : err.message)));
  idBox.addEventListener("change", lookUp);
  const row = h("li", { class: "steer-feature" }, h("span", { class: "steer-name" }, "#", idBox, label), slider, number, modeBox,
    h("button", { type: "button", onclick: () => row.remove() }, "remove"));
  if (id !== "") lookUp();
  return row;
}

// A row's inputs are its state: read when Run is pressed, never copied elsewhere.
const rowField = (row, name) => row.querySelector(`.steer-${name}`);
const readRow = (row) => ({ id: Number(rowField(row, "id").value), value: Number(rowField(row, "value").value), mode: rowField(row, "mode").value });

function nameRow(row, text) {
  rowField(row, "label").replaceChildren(h("a", { href: `/features/${rowField(row, "id").value}` }, text || "(no label)"));
}

function steerURL(body) {
  const p = new URLSearchParams();
  for (const f of body.features) p.append("f", `${f.id}:${f.value}:${f.mode}`);
  p.set("prompt", body.prompt);
  const options = { tokens: body.max_new_tokens, temperature: body.temperature, seed: body.seed };
  for (const [k, v] of Object.entries(options)) if (String(v) !== STEER_DEFAULTS[k]) p.set(k, v);
  if (body.chat) p.set("chat", "1");
  if (body.generated_only) p.set("generated_only", "1");
  return `/steer?${p.toString().replaceAll("%3A", ":")}`;
}

export async function steer(view, params) {
  document.title = "Steer · Feature Atlas";
  const prompt = h("textarea", { id: "steer-prompt", "aria-label": "prompt", required: true }, params.get("prompt") || "");
  const rows = h("ol", { class: "steer-features", "aria-label": "features to steer" },
    params.getAll("f").map((f) => { const [id, value, mode] = f.split(":"); return steerRow({ id, value: value || undefined, mode }); }));
  const option = (name, attrs) => h("input", { name, value: params.get(name) ?? STEER_DEFAULTS[name], ...attrs });
  const tokens = option("tokens", { type: "number", min: "1", max: "256", step: "1", required: true });
  const temperature = option("temperature", { type: "number", min: "0", max: "2", step: "any", required: true });
  const seed = option("seed", { type: "number", min: "0", max: String(MAX_SEED), step: "1", required: true });
  const chat = h("input", { type: "checkbox", checked: params.get("chat") === "1" });
  const generatedOnly = h("input", { type: "checkbox", checked: params.get("generated_only") === "1" });
  const button = h("button", { type: "submit" }, "Run");
  const out = h("div", { "aria-live": "polite" });
  const run = async (ev) => {
    ev?.preventDefault();
    if (!form.reportValidity()) { // e.g. a shared URL with a value out of range: say which field
      const bad = form.querySelector(":invalid");
      out.replaceChildren(h("p", { class: "error", role: "alert" }, `${bad.getAttribute("aria-label") || bad.name}: ${bad.validationMessage}`));
      return done("steer");
    }
    const body = {
      prompt: prompt.value, max_new_tokens: Number(tokens.value), temperature: Number(temperature.value), seed: Number(seed.value),
      chat: chat.checked, generated_only: generatedOnly.checked, features: [...rows.children].map(readRow),
    };
    history.replaceState(null, "", steerURL(body));
    document.body.dataset.ready = "";
    button.disabled = true;
    out.replaceChildren(h("p", { class: "muted" }, "running… (the model writes both continuations; on a CPU this takes a few seconds)"));
    try {
      const r = await api("/api/steer", body);
      for (const row of rows.children) {
        const f = r.features.find((x) => String(x.id) === rowField(row, "id").value);
        if (f) nameRow(row, f.label);
      }
      showSteer(out, r);
    } catch (err) {
      // A 400 names the field in its detail; a 503 says when to ask again.
      out.replaceChildren(h("p", { class: "error", role: "alert" }, err.status === 503 ? `model busy, try again in ${err.retryAfter || "a few"} s`
        : typeof err.detail === "string" ? err.detail : err.message));
    } finally {
      button.disabled = false;
    }
    done("steer");
  };
  const labelled = (text, input) => h("label", {}, text, " ", input);
  const form = h("form", { onsubmit: run, id: "steer-form" },
    labelled("Prompt", prompt),
    rows,
    h("p", {}, h("button", { type: "button", onclick: () => rows.append(steerRow()) }, "add feature")),
    h("p", { class: "toolbar" }, labelled("max new tokens", tokens), labelled("temperature", temperature), labelled("seed", seed),
      h("label", {}, chat, " chat template"), h("label", {}, generatedOnly, " steer generated tokens only")),
    h("p", {}, button));
  view.replaceChildren(
    h("h1", {}, "Steer"),
    h("p", { class: "muted" }, "Continue a prompt twice, untouched and with features clamped (set to a value) or added (pushed along their direction). Values are in units of the feature's maximum activation over the corpus: 1 is as strong as it ever fires; clamps of about 1–3 are a good start."),
    form, out);
  if (prompt.value.trim() && rows.children.length) await run(); else done("steer");
}

function showSteer(out, r) {
  // Each token shaded by one steered feature's activation as the model read it, over its corpus maximum.
  let shadeBy = 0;
  const columns = h("div", { class: "columns", id: "steer-result" });
  const draw = () => {
    const f = r.features[shadeBy];
    columns.replaceChildren(...[["Default", r.default], ["Steered", r.steered]].map(([name, run]) =>
      h("section", { "aria-label": `${name} continuation`, "data-run": name.toLowerCase() }, h("h2", {}, name),
        continuation(r.settings.chat ? "" : r.prompt, run, shadeBy, f.max_activation))));
  };
  const name = (f) => `#${f.id} ${f.label || ""}`;
  const pick = r.features.length < 2 ? `shaded by ${name(r.features[0])}`
    : h("label", {}, "shade by ", h("select", { class: "steer-shade", onchange: (ev) => { shadeBy = Number(ev.target.value); draw(); } },
      r.features.map((f, j) => h("option", { value: String(j) }, name(f)))));
  draw();
  out.replaceChildren(
    h("p", { class: "meta" }, pick, " · its activation as the model read each token (before any edit) over its corpus maximum;",
      " hover a token for the value and its log-probability",
      r.default.text === r.steered.text ? " · steering did not change the text" : ""),
    columns);
}

function continuation(prompt, run, j, max) {
  const line = h("div", { class: "example" }, prompt ? h("span", { class: "muted" }, prompt) : "");
  run.tokens.forEach((t, i) => {
    const v = run.activations[i]?.[j] ?? 0, rel = v / (max || 1), lp = run.logprobs[i];
    line.append(h("span", {
      class: "tok", "data-act": rel.toFixed(3), tabindex: rel > 0 ? "0" : null,
      title: `activation ${fmt.num(v)} (${(100 * rel).toFixed(0)}% of max) · logprob ${lp.toFixed(2)}`,
      style: rel > 0 ? `background: rgb(var(--hot) / ${(0.12 + 0.78 * Math.min(1, rel)).toFixed(3)})` : null,
    }, showToken(t)));
  });
  if (!run.tokens.length) line.append(h("span", { class: "muted" }, " (the model ended the text at once)"));
  return line;
}
