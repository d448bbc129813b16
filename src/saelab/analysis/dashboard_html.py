"""The dashboard's pages: plain HTML, CSS and JavaScript, no library, font or network request.

``index.html`` and ``feature.html`` read their data from ``data/index.js`` and ``data/features-N.js``,
scripts that call ``saelabIndex(...)`` and ``saelabFeatures(...)``: a ``<script src>`` of a local file
works from ``file://``, where ``fetch`` does not. Page text is set with ``textContent``, never parsed as
HTML, so token strings cannot inject markup.
"""

STYLE_CSS = r"""
:root { --fg: #1f2328; --muted: #656d76; --line: #d0d7de; --panel: #f6f8fa; --link: #0969da; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff;
       font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header { padding: 14px 24px 12px; border-bottom: 1px solid var(--line); background: var(--panel); }
main { padding: 8px 24px 40px; max-width: 1280px; }
h1 { font-size: 20px; margin: 4px 0; }
h2 { font-size: 16px; margin: 22px 0 8px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 13px; margin: 14px 0 4px; color: var(--muted); font-weight: 600; }
a { color: var(--link); text-decoration: none; }
a:hover { text-decoration: underline; }
.meta { color: var(--muted); }
.meta span { margin-right: 18px; white-space: nowrap; }
.mono, .chip, .example { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace; }
.chip { display: inline-block; white-space: pre; background: var(--panel); border: 1px solid var(--line);
        border-radius: 4px; padding: 0 4px; margin: 1px 3px 1px 0; font-size: 12.5px; }
nav { display: flex; gap: 14px; align-items: center; margin-bottom: 6px; }
nav input { width: 8em; }
input[type=search] { width: 28em; max-width: 100%; padding: 5px 8px; border: 1px solid var(--line);
                     border-radius: 6px; }
.controls { display: flex; gap: 18px; align-items: center; margin: 14px 0 8px; flex-wrap: wrap; }
table.grid { border-collapse: collapse; }
table.grid th, table.grid td { padding: 4px 10px; border-bottom: 1px solid var(--line); text-align: left;
                               vertical-align: top; }
table.grid th { background: var(--panel); font-weight: 600; }
table.features { width: 100%; }
table.features th { cursor: pointer; user-select: none; position: sticky; top: 0; }
table.features th:hover { background: #eaeef2; }
th[aria-sort=ascending]::after { content: " \25B2"; font-size: 10px; }
th[aria-sort=descending]::after { content: " \25BC"; font-size: 10px; }
.num { text-align: right !important; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.dead td { color: var(--muted); }
.pager { margin: 10px 0; display: flex; gap: 12px; align-items: center; }
.stats { display: flex; gap: 12px 28px; flex-wrap: wrap; margin: 12px 0 4px; }
.stat { min-width: 6em; }
.stat b { display: block; font-size: 18px; font-variant-numeric: tabular-nums; }
.stat span { color: var(--muted); font-size: 12px; }
.explanation-text { font-size: 1.15em; margin: 4px 0; }
td.explanation { max-width: 28em; }
table.scored td.snippet { font-family: ui-monospace, monospace; white-space: pre-wrap; max-width: 46em; }
table.scored tr.wrong td { background: #ffebe9; }
.examples.silent { opacity: 0.85; }
table.norms div.bar { height: 10px; background: #e8710a; border-radius: 2px; }
.notice { padding: 10px 14px; background: #fff8c5; border: 1px solid #d4a72c66; border-radius: 6px; margin: 12px 0; }
.example { display: flex; gap: 10px; padding: 3px 0; border-bottom: 1px solid #eef0f2; font-size: 13px; }
.example .act { flex: 0 0 4.5em; text-align: right; color: var(--muted); font-variant-numeric: tabular-nums; }
.example .text { white-space: pre-wrap; word-break: break-word; line-height: 1.75; }
.t { border-radius: 2px; padding: 1px 0; }
.t.center { outline: 1.5px solid #cf222e; outline-offset: 0; }
#tip { position: fixed; display: none; pointer-events: none; z-index: 10; background: #1f2328; color: #fff;
       padding: 3px 7px; border-radius: 4px; font: 12px ui-monospace, Menlo, Consolas, monospace; white-space: pre; }
.columns { display: flex; gap: 40px; flex-wrap: wrap; }
svg.hist rect.bar { fill: #e8710a; }
svg.hist rect.bar:hover { fill: #b35400; }
svg.hist text { font-size: 11px; fill: var(--muted); }
svg.hist line { stroke: var(--line); }
"""

# Helpers both pages use.
COMMON_JS = r"""
"use strict";
function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}
function tokenText(vocab, id) { const s = vocab[id]; return s === undefined ? "<" + id + ">" : s; }
// Whitespace a reader must see: newlines and tabs get a visible mark, an empty token a placeholder.
function visible(s) { return s === "" ? "\u2205" : s.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5"); }
function fmt(x) {
  if (x === 0) return "0";
  const a = Math.abs(x);
  return a >= 100 ? x.toFixed(1) : a >= 1 ? x.toFixed(2) : x.toPrecision(3);
}
function pct(x) { return x === 0 ? "0%" : (100 * x).toPrecision(3) + "%"; }
// A token on its own: spaces of a whitespace-only token shown as open boxes.
function chip(vocab, id) {
  const s = tokenText(vocab, id);
  return el("span", "chip", s !== "" && s.trim() === "" ? visible(s).replace(/ /g, "\u2423") : visible(s));
}
"""

INDEX_JS = r"""
const D = window.SAELAB_INDEX;
const PAGE_SIZE = 100;
const NUMERIC = {feature: true, frequency: true, mean: true, max: true, score: true};
const state = {key: "feature", dir: 1, query: "", hideDead: false, page: 0};
const rows = D.rows.map(r => ({feature: r[0], frequency: r[1], mean: r[2], max: r[3], top: r[4], promoted: r[5],
  explanation: r[6] || "", score: r[7] ?? null,
  text: r[4].concat(r[5]).map(t => tokenText(D.vocab, t).toLowerCase()).concat([(r[6] || "").toLowerCase()])
    .join("\u0000")}));
const EXPLAINED = rows.some(r => r.explanation);

function summary() {
  const s = D.sae;
  const kind = !s.kind || s.kind === "sae" ? "SAE" : s.kind.replace("_", " ");
  document.getElementById("title").textContent = `${s.architecture} ${kind} on ${s.model} \u00b7 ${s.hook}`;
  document.title = `SAE features: ${s.model} ${s.hook}`;
  const meta = document.getElementById("meta");
  const facts = [`d_in ${s.d_in} \u2192 d_sae ${s.d_sae}`, s.k ? `k ${s.k}` : null,
                 s.trained_on ? `trained on ${s.trained_on}` : null,
                 `read ${D.tokens.toLocaleString()} tokens of ${D.dataset}`, s.folder];
  facts.filter(Boolean).forEach(f => meta.append(el("span", null, f)));
  if (s.neuronpedia) {
    const a = el("a", null, "Neuronpedia"); a.href = s.neuronpedia; meta.append(a);
  }
  const keys = Object.keys(D.metrics).filter(k => typeof D.metrics[k] === "number" && k !== "tokens");
  if (!keys.length) return;
  const box = document.getElementById("summary");
  const where = [D.metrics.tokens ? `${D.metrics.tokens.toLocaleString()} tokens` : null,
                 D.metrics.dataset ? `of ${D.metrics.dataset}` : null].filter(Boolean).join(" ");
  box.append(el("h2", null, "Evaluation" + (where ? ` on ${where}` : "")));
  const stats = el("div", "stats");
  keys.forEach(k => {
    const v = D.metrics[k];
    const item = el("div", "stat");
    item.append(el("b", null, Number.isInteger(v) ? v.toLocaleString() : fmt(v)), el("span", null, k));
    item.title = D.meanings[k] || "";
    stats.append(item);
  });
  box.append(stats, el("div", "meta", "from " + D.metrics_source));
}
function autointerpSummary() {
  const a = D.autointerp;
  if (!a) return;
  const box = document.getElementById("summary");
  box.append(el("h2", null, `Explanations scored by ${a.scorer} (means over ${a.features} features)`));
  const table = el("table", "grid");
  const head = el("tr");
  ["explanations", "detection bal. acc.", "detection AUC", "fuzzing bal. acc.", "fuzzing AUC"].forEach(
    t => head.append(el("th", null, t)));
  table.append(head);
  Object.entries(a.means).forEach(([name, m]) => {
    const tr = el("tr");
    tr.append(el("td", null, name.replace("_", " ")));
    ["detection_balanced_accuracy", "detection_auc", "fuzzing_balanced_accuracy", "fuzzing_auc"].forEach(
      k => tr.append(el("td", "num", m[k] === null ? "-" : m[k].toFixed(3))));
    table.append(tr);
  });
  box.append(table, el("div", "meta", "balanced accuracy 0.5 = chance; a score means something only against the " +
                                     "baselines: another feature's explanation (shuffled) and its top tokens"));
}

function matches(row, q) {
  if (state.hideDead && row.frequency === 0) return false;
  if (!q) return true;
  return (/^\d+$/.test(q) && row.feature === Number(q)) || row.text.includes(q);
}
function compare(a, b) {
  const k = state.key;
  if (k === "score") {  // features not scored last, whichever the direction
    if (a.score === null || b.score === null) return (a.score === null) - (b.score === null) || a.feature - b.feature;
  }
  if (NUMERIC[k]) return state.dir * (a[k] - b[k]) || a.feature - b.feature;
  if (k === "explanation") return state.dir * ((a[k] || "\uffff").localeCompare(b[k] || "\uffff")) || a.feature - b.feature;
  const first = row => row[k].length ? tokenText(D.vocab, row[k][0]) : "\uffff";  // no tokens: last
  return state.dir * first(a).localeCompare(first(b)) || a.feature - b.feature;
}
function numberCell(tr, value, text) {
  const td = el("td", "num", text);
  td.dataset.value = value;
  tr.append(td);
}
function tokensCell(tr, ids) {
  const td = el("td");
  ids.forEach(id => td.append(chip(D.vocab, id)));
  tr.append(td);
}
function render() {
  const q = state.query.trim().toLowerCase();
  const shown = rows.filter(r => matches(r, q)).sort(compare);
  const pages = Math.max(1, Math.ceil(shown.length / PAGE_SIZE));
  state.page = Math.min(state.page, pages - 1);
  const body = document.querySelector("#features tbody");
  body.replaceChildren();
  shown.slice(state.page * PAGE_SIZE, (state.page + 1) * PAGE_SIZE).forEach(r => {
    const tr = el("tr", r.frequency === 0 ? "dead" : null);
    const link = el("a", null, String(r.feature));
    link.href = "feature.html#" + r.feature;
    const first = el("td", "num");
    first.dataset.value = r.feature;
    first.append(link);
    tr.append(first);
    numberCell(tr, r.frequency, pct(r.frequency));
    numberCell(tr, r.mean, fmt(r.mean));
    numberCell(tr, r.max, fmt(r.max));
    tokensCell(tr, r.top);
    tokensCell(tr, r.promoted);
    if (EXPLAINED) {
      tr.append(el("td", "explanation", r.explanation));
      numberCell(tr, r.score ?? -1, r.score === null ? "" : r.score.toFixed(2));
    }
    body.append(tr);
  });
  document.querySelectorAll("#features th").forEach(th => {
    if (th.dataset.key === state.key) th.setAttribute("aria-sort", state.dir > 0 ? "ascending" : "descending");
    else th.removeAttribute("aria-sort");
  });
  document.getElementById("count").textContent =
    `${shown.length.toLocaleString()} of ${rows.length.toLocaleString()} features`;
  document.getElementById("page").textContent = `page ${state.page + 1} of ${pages}`;
  document.getElementById("prev").disabled = state.page === 0;
  document.getElementById("next").disabled = state.page >= pages - 1;
}

summary();
autointerpSummary();
if (!EXPLAINED) document.querySelectorAll("#features th.autointerp").forEach(th => th.remove());
document.querySelectorAll("#features th").forEach(th => th.addEventListener("click", () => {
  const key = th.dataset.key;
  // A new numeric column starts with its largest values (the feature index with the smallest).
  state.dir = key === state.key ? -state.dir : (NUMERIC[key] && key !== "feature" ? -1 : 1);
  state.key = key;
  state.page = 0;
  render();
}));
document.getElementById("search").addEventListener("input", e => {
  state.query = e.target.value;
  state.page = 0;
  render();
});
document.getElementById("hide-dead").addEventListener("change", e => {
  state.hideDead = e.target.checked;
  state.page = 0;
  render();
});
document.getElementById("prev").addEventListener("click", () => { state.page -= 1; render(); });
document.getElementById("next").addEventListener("click", () => { state.page += 1; render(); });
render();
"""

FEATURE_JS = r"""
const D = window.SAELAB_INDEX;
const FEATURES = {}, VOCAB = {}, LOADED = {};
const ORDER = D.rows.map(r => r[0]);
const POSITION = new Map(ORDER.map((f, i) => [f, i]));
window.saelabFeatures = function (chunk) {
  Object.assign(VOCAB, chunk.vocab);
  Object.assign(FEATURES, chunk.features);
};

function wanted() {
  const m = /^#(\d+)$/.exec(location.hash);
  return m ? Number(m[1]) : ORDER[0];
}
function load(f, then) {
  const chunk = Math.floor(f / D.chunk_size);
  if (LOADED[chunk]) return then();
  const script = document.createElement("script");
  script.src = `data/features-${chunk}.js`;
  script.onload = () => { LOADED[chunk] = true; then(); };
  document.head.append(script);
}
function show() {
  const f = wanted();
  const content = document.getElementById("content");
  content.replaceChildren();
  if (!POSITION.has(f)) {
    document.getElementById("title").textContent = `Feature ${f}`;
    content.append(el("p", "notice", `Feature ${f} is not in this dashboard: it holds ${ORDER.length} features, ` +
                                     `${ORDER[0]} to ${ORDER[ORDER.length - 1]}.`));
    return;
  }
  load(f, () => render(FEATURES[f]));
}

function navigation(f) {
  const i = POSITION.get(f);
  [["prev", ORDER[i - 1]], ["next", ORDER[i + 1]]].forEach(([id, target]) => {
    const a = document.getElementById(id);
    if (target === undefined) { a.removeAttribute("href"); a.classList.add("meta"); }
    else { a.href = "#" + target; a.classList.remove("meta"); }
  });
}
function stat(value, label) {
  const box = el("div", "stat");
  box.append(el("b", null, value), el("span", null, label));
  return box;
}
function tokenSpan(id, act, fmax, center) {
  const text = tokenText(VOCAB, id);
  const span = el("span", "t", visible(text));
  if (act > 0) span.style.backgroundColor = `rgba(232, 113, 10, ${(0.12 + 0.88 * Math.min(1, act / fmax)).toFixed(3)})`;
  span.dataset.tip = `${JSON.stringify(text)}  ${act > 0 ? fmt(act) : "0"}`;
  if (center) span.classList.add("center");
  return span;
}
// An example: [activation, context, position, center, token ids, activations] (see dashboard.py).
function exampleRow(ex, fmax) {
  const [act, context, position, center, ids, acts] = ex;
  const row = el("div", "example");
  const label = el("span", "act", fmt(act));
  label.dataset.tip = `context ${context}, token ${position}`;
  const text = el("span", "text");
  ids.forEach((id, i) => text.append(tokenSpan(id, acts[i], fmax, i === center)));
  row.append(label, text);
  return row;
}
const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  Object.entries(attrs).forEach(([k, v]) => node.setAttribute(k, v));
  if (text !== undefined) node.textContent = text;
  return node;
}
function histogram(h, logScale) {
  const W = 680, H = 180, left = 52, right = 12, top = 10, bottom = 26;
  const n = h.counts.length, most = Math.max(...h.counts);
  const scale = c => logScale ? Math.log1p(c) / Math.log1p(most) : c / most;
  const box = svg("svg", {class: "hist", width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img"});
  const step = (W - left - right) / n, base = H - bottom;
  h.counts.forEach((c, i) => {
    const height = c ? Math.max(1, scale(c) * (base - top)) : 0;
    const bar = svg("rect", {class: "bar", x: left + i * step + 0.5, y: base - height, width: Math.max(1, step - 1),
                             height});
    const range = `${fmt(i * h.bin_width)} \u2013 ${fmt((i + 1) * h.bin_width)}`;
    bar.append(svg("title", {}, `${range}: ${c.toLocaleString()} tokens`));
    box.append(bar);
  });
  box.append(svg("line", {x1: left, x2: W - right, y1: base + 0.5, y2: base + 0.5}));
  [[0, "start"], [n / 2, "middle"], [n, "end"]].forEach(([i, anchor]) =>
    box.append(svg("text", {x: left + i * step, y: H - 8, "text-anchor": anchor}, fmt(i * h.bin_width))));
  box.append(svg("text", {x: left - 6, y: top + 9, "text-anchor": "end"}, most.toLocaleString()));
  box.append(svg("text", {x: left - 6, y: base, "text-anchor": "end"}, "0"));
  return box;
}
function logitTable(title, pairs) {
  const table = el("table", "grid");
  const head = el("tr");
  head.append(el("th", null, title), el("th", "num", "logit change"));
  table.append(head);
  pairs.forEach(([id, value]) => {
    const tr = el("tr"), td = el("td");
    td.append(chip(VOCAB, id));
    tr.append(td, el("td", "num", (value > 0 ? "+" : "") + value.toFixed(3)));
    table.append(tr);
  });
  return table;
}

function explanationBox(e) {
  const box = el("div", "explanation");
  box.append(el("h2", null, "Explanation"), el("p", "explanation-text", e.explanation || "(none)"),
             el("div", "meta", `by ${e.explainer}`));
  if (!e.detection) return box;
  const table = el("table", "grid");
  const head = el("tr");
  ["", "detection bal. acc.", "detection AUC", "fuzzing bal. acc.", "fuzzing AUC"].forEach(
    t => head.append(el("th", null, t)));
  table.append(head);
  const rowOf = (name, s) => {
    const tr = el("tr");
    tr.append(el("td", null, name));
    [s.detection.balanced_accuracy, s.detection.auc, s.fuzzing.balanced_accuracy, s.fuzzing.auc].forEach(
      v => tr.append(el("td", "num", v === null || v === undefined ? "-" : v.toFixed(2))));
    return tr;
  };
  table.append(rowOf("this explanation", e));
  Object.entries(e.baselines || {}).forEach(([name, s]) => {
    const tr = rowOf(name.replace("_", " "), s);
    tr.title = s.explanation;
    table.append(tr);
  });
  box.append(table, el("div", "meta", `scored by ${e.scorer}; 0.5 = chance`));
  return box;
}
// A crosscoder's or CLT's latent: its decoder norm at each hook it writes, as bars.
function decoderNorms(norms) {
  const box = el("div");
  box.append(el("h2", null, "Decoder norm at each hook it writes"));
  const table = el("table", "grid norms");
  const most = Math.max(...norms, 1e-12);
  norms.forEach((n, i) => {
    const tr = el("tr"), bar = el("td"), fill = el("div", "bar");
    fill.style.width = `${(240 * n / most).toFixed(1)}px`;
    bar.append(fill);
    tr.append(el("td", null, D.sae.writes[i]), el("td", "num", fmt(n)), bar);
    table.append(tr);
  });
  box.append(table);
  return box;
}
function scoredTests(tests) {
  const box = el("div");
  box.append(el("h2", null, `The snippets the explanation was scored on (${tests.length})`));
  const table = el("table", "grid scored");
  const head = el("tr");
  ["test", "snippet", "truth", "P(yes)"].forEach(t => head.append(el("th", null, t)));
  table.append(head);
  tests.forEach(t => {
    const tr = el("tr", (t.p_yes > 0.5) === (t.label === 1) ? "right" : "wrong");
    tr.append(el("td", null, `${t.scorer}: ${t.kind.replace("_", " ")}`), el("td", "snippet", t.text),
              el("td", null, t.label ? "yes" : "no"), el("td", "num", t.p_yes.toFixed(2)));
    table.append(tr);
  });
  box.append(table);
  return box;
}

function render(r) {
  const content = document.getElementById("content");
  document.getElementById("title").textContent = `Feature ${r.feature}`;
  document.title = `Feature ${r.feature} \u00b7 ${D.sae.model} ${D.sae.hook}`;
  navigation(r.feature);
  const np = document.getElementById("neuronpedia");
  if (r.neuronpedia) { np.href = r.neuronpedia; np.hidden = false; } else np.hidden = true;
  const stats = el("div", "stats");
  stats.append(stat(pct(r.frequency), `of tokens (${r.count.toLocaleString()} of ${D.tokens.toLocaleString()})`),
               stat(fmt(r.mean), "mean activation when active"), stat(fmt(r.max), "max activation"));
  content.append(stats);
  if (r.explanation) content.append(explanationBox(r.explanation));
  if (r.count === 0) {
    content.append(el("p", "notice", `This feature never fired on the ${D.tokens.toLocaleString()} tokens read ` +
                                     `from ${D.dataset}: no examples or histogram. Its logit effects are below.`));
  } else {
    content.append(el("h2", null, "Activation histogram (active tokens)"));
    const holder = el("div");
    const toggle = el("label", "meta");
    const box = el("input");
    box.type = "checkbox";
    toggle.append(box, " log scale");
    const draw = () => holder.replaceChildren(histogram(r.histogram, box.checked));
    box.addEventListener("change", draw);
    draw();
    content.append(holder, toggle);
    content.append(el("h2", null, `Top activations (${r.top.length})`));
    const tops = el("div", "examples top");
    r.top.forEach(ex => tops.append(exampleRow(ex, r.max)));
    content.append(tops);
    content.append(el("h2", null, "Examples by activation band (sampled at random within each band)"));
    r.bands.forEach(b => {
      content.append(el("h3", null, `activation ${fmt(b.low)} \u2013 ${fmt(b.high)}: ` +
                                    `${b.count.toLocaleString()} tokens (${pct(b.count / r.count)} of this ` +
                                    "feature's activations)"));
      const list = el("div", "examples band");
      b.examples.forEach(ex => list.append(exampleRow(ex, r.max)));
      content.append(list);
    });
  }
  [["near_misses", "Near misses (the closest features fire, this one does not)"],
   ["random", "Random contexts where it does not fire"]].forEach(([key, title]) => {
    if (!r[key] || !r[key].length) return;
    content.append(el("h2", null, `${title} (${r[key].length})`));
    const list = el("div", "examples silent");
    r[key].forEach(ex => list.append(exampleRow(ex, r.max)));
    content.append(list);
  });
  if (r.explanation && r.explanation.tests) content.append(scoredTests(r.explanation.tests));
  if (r.decoder_norms) content.append(decoderNorms(r.decoder_norms));
  content.append(el("h2", null, "Logit effects of the decoder direction (per unit activation)"));
  const columns = el("div", "columns");
  columns.append(logitTable("promotes", r.promoted), logitTable("suppresses", r.suppressed));
  content.append(columns);
  window.scrollTo(0, 0);
}

const tip = document.getElementById("tip");
document.addEventListener("mouseover", e => {
  const target = e.target.closest ? e.target.closest("[data-tip]") : null;
  if (!target) { tip.style.display = "none"; return; }
  tip.textContent = target.dataset.tip;
  tip.style.display = "block";
  const rect = target.getBoundingClientRect();
  tip.style.left = `${Math.min(rect.left, window.innerWidth - tip.offsetWidth - 8)}px`;
  tip.style.top = `${rect.bottom + 4}px`;
});
document.getElementById("goto").addEventListener("submit", e => {
  e.preventDefault();
  location.hash = "#" + document.getElementById("goto-input").value;
});
document.getElementById("sae").textContent = `${D.sae.architecture} SAE on ${D.sae.model} \u00b7 ${D.sae.hook}`;
window.addEventListener("hashchange", show);
show();
"""

# The data scripts call these before the page's own script runs.
_RECEIVERS = "<script>function saelabIndex(data) { window.SAELAB_INDEX = data; }</script>"
_HEAD = ('<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
         '<meta name="viewport" content="width=device-width, initial-scale=1">'
         '<link rel="icon" href="data:,"><link rel="stylesheet" href="style.css"><title>{title}</title></head>\n')

INDEX_HTML = _HEAD.format(title="SAE features") + """<body>
<header><h1 id="title">SAE features</h1><div id="meta" class="meta"></div></header>
<main>
<div id="summary"></div>
<h2>Features</h2>
<div class="controls">
  <input id="search" type="search" placeholder="search a token (e.g. Paris), an explanation's words or a feature number" autocomplete="off">
  <label><input id="hide-dead" type="checkbox"> hide features that never fired</label>
  <span id="count" class="meta"></span>
</div>
<table class="grid features" id="features"><thead><tr>
  <th data-key="feature" class="num" title="feature (latent) index">feature</th>
  <th data-key="frequency" class="num" title="share of the tokens read on which the feature is active">frequency</th>
  <th data-key="mean" class="num" title="mean activation over the tokens where it is active">mean act.</th>
  <th data-key="max" class="num" title="largest activation">max act.</th>
  <th data-key="top" title="the tokens most often at the maximum of its top examples">top tokens</th>
  <th data-key="promoted" title="the tokens whose logits its decoder direction raises most">promotes</th>
  <th data-key="explanation" class="autointerp" title="written by saelab explain">explanation</th>
  <th data-key="score" class="num autointerp" title="detection balanced accuracy of the explanation (saelab score; 0.5 = chance)">score</th>
</tr></thead><tbody></tbody></table>
<div class="pager"><button id="prev">&lsaquo; previous</button><span id="page" class="meta"></span>
  <button id="next">next &rsaquo;</button></div>
</main>
""" + _RECEIVERS + """
<script src="data/index.js"></script>
<script>""" + COMMON_JS + INDEX_JS + """</script>
</body></html>
"""

FEATURE_HTML = _HEAD.format(title="SAE feature") + """<body>
<header>
<nav><a href="index.html">&larr; all features</a><a id="prev">&lsaquo; previous</a><a id="next">next &rsaquo;</a>
<form id="goto"><input id="goto-input" type="number" min="0" placeholder="feature #"></form>
<a id="neuronpedia" hidden>Neuronpedia &nearr;</a></nav>
<h1 id="title">Feature</h1><div id="sae" class="meta"></div>
</header>
<main id="content"></main>
<div id="tip"></div>
""" + _RECEIVERS + """
<script src="data/index.js"></script>
<script>""" + COMMON_JS + FEATURE_JS + """</script>
</body></html>
"""
