// The SAE feature browser (gemma_scope.browse writes data/index.js and data/latents/<i>.js next to this file).
// Plain script, no libraries: it must run from file:// where fetch() of local files is blocked, so each latent's
// data is a script that calls BROWSE.showLatent(...).
"use strict";

const MAX_ROWS = 1000;  // rows drawn at once; the search narrows the rest

const BROWSE = (() => {
  const index = window.BROWSE_INDEX;
  const col = Object.fromEntries(index.columns.map((name, i) => [name, i]));
  const rows = index.latents.map((r) => ({
    id: r[col.id], frequency: r[col.frequency], max: r[col.max], mean: r[col.mean], flag: r[col.flag],
    promoted: r[col.promoted], search: (r[col.promoted].join("\u0001") + "\u0001" + r[col.text]).toLowerCase(),
  }));
  const state = { key: "id", desc: false, query: "", hideDead: false, selected: null };

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (name === "class") node.className = value;
      else if (name === "style") node.style.cssText = value;
      else node.setAttribute(name, value);
    }
    for (const child of children) node.append(child);
    return node;
  }

  const fmt = (x) => (x === 0 ? "0"
    : Math.abs(x) >= 1000 || Math.abs(x) < 0.01 ? x.toExponential(2) : x.toPrecision(3));
  const pct = (x) => (x === 0 ? "0" : x < 1e-4 ? (100 * x).toExponential(1) + "%" : (100 * x).toPrecision(3) + "%");
  const shown = (text) => text.replace(/\n/g, "↵").replace(/\t/g, "→");

  function flagBadge(flag) {
    return flag ? el("span", { class: "flag " + flag, title: flag === "dead" ? "never fired on the pass's tokens"
      : `fires on more than ${pct(index.dense_frequency)} of tokens` }, flag) : "";
  }

  function renderHeader() {
    document.getElementById("title").textContent = index.title;
    document.title = index.title;
    const meta = document.getElementById("meta");
    for (const [name, value] of Object.entries(index.meta)) {
      meta.append(el("dt", {}, name), el("dd", {}, String(value)));
    }
  }

  function renderList() {
    const query = state.query.toLowerCase();
    let list = rows.filter((r) => (!query || r.search.includes(query)) && !(state.hideDead && r.flag === "dead"));
    const sign = state.desc ? -1 : 1;
    list.sort((a, b) => sign * (a[state.key] - b[state.key]) || a.id - b.id);
    const body = document.querySelector("#index tbody");
    body.replaceChildren(...list.slice(0, MAX_ROWS).map((r) => {
      const tr = el("tr", { "data-id": r.id, class: r.id === state.selected ? "selected" : "" },
        el("td", { class: "num" }, String(r.id), flagBadge(r.flag)), el("td", { class: "num" }, pct(r.frequency)),
        el("td", { class: "num" }, fmt(r.max)), el("td", { class: "num" }, fmt(r.mean)),
        el("td", { class: "promotes", title: r.promoted.join(" | ") }, r.promoted.map(shown).join(" | ")));
      tr.addEventListener("click", () => { location.hash = "latent=" + r.id; });
      return tr;
    }));
    document.getElementById("count").textContent = `${list.length} of ${rows.length} latents` +
      (list.length > MAX_ROWS ? ` (first ${MAX_ROWS} shown; search to narrow)` : "") +
      ` · ${index.tokens.toLocaleString()} tokens`;
    for (const th of document.querySelectorAll("th[data-key]")) {
      th.className = th.dataset.key === state.key ? (state.desc ? "sorted-desc" : "sorted-asc") : "";
      th.classList.add("num");
    }
  }

  function context(c, max) {
    const tokens = c.tokens.map((text, i) => {
      const act = c.acts[i];
      const alpha = max > 0 ? Math.min(1, act / max) * 0.85 : 0;
      return el("span", { class: "tok" + (act > 0 ? " on" : "") + (i === c.center ? " peak" : ""),
        title: `activation ${fmt(act)}`, style: act > 0 ? `background: rgba(255, 140, 0, ${alpha.toFixed(3)})` : "" },
      shown(text));
    });
    return el("div", { class: "context" }, el("span", { class: "value" }, fmt(c.act)), el("span", {}, ...tokens));
  }

  function histogram(h) {
    // bars of counts per log-spaced bin; hover a bar for its range and count
    const n = h.counts.length;
    if (!n) return el("p", { class: "hint" }, "never fired");
    const width = 480, height = 110, pad = 18, left = 40;
    const svgNode = (tag, attrs, ...children) => {
      const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
      for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
      node.append(...children);
      return node;
    };
    const top = Math.max(...h.counts), bar = (width - left) / n;
    const svg = svgNode("svg", { class: "hist", width, height: height + 2 * pad });
    h.counts.forEach((count, i) => {
      const y = height * count / top;
      svg.append(svgNode("rect", { x: left + i * bar, y: pad + height - y, width: Math.max(1, bar - 1), height: y },
        svgNode("title", {}, `${fmt(h.edges[i])}–${fmt(h.edges[i + 1])}: ${count}`)));
    });
    svg.append(svgNode("text", { x: 0, y: pad + 8 }, String(top)), svgNode("text", { x: 0, y: pad + height }, "0"));
    for (const [i, anchor] of [[0, "start"], [Math.floor(n / 2), "middle"], [n, "end"]]) {
      const label = { x: left + i * bar, y: height + 2 * pad - 2, "text-anchor": anchor };
      svg.append(svgNode("text", label, fmt(h.edges[i])));
    }
    return svg;
  }

  function tokenList(kind, pairs) {
    return el("div", { class: "tokens-list " + kind },
      ...pairs.map(([text, score]) => el("span", { title: `logit ${kind === "up" ? "+" : ""}${fmt(score)} per unit` },
        shown(text))));
  }

  function showLatent(d) {
    const detail = document.getElementById("detail");
    const parts = [
      el("h2", {}, `Latent ${d.id}`, flagBadge(d.flag)),
      el("div", { class: "stats" },
        el("div", {}, el("span", {}, "frequency"), pct(d.frequency)),
        el("div", {}, el("span", {}, "fired on"), `${d.count.toLocaleString()} tokens`),
        el("div", {}, el("span", {}, "max activation"), fmt(d.max)),
        el("div", {}, el("span", {}, "mean when firing"), fmt(d.mean))),
      el("h3", {}, "Activations when firing (log-spaced bins)"), histogram(d.hist),
    ];
    if (d.promoted) {
      parts.push(el("h3", {}, "Promotes (direct effect on output logits)"), tokenList("up", d.promoted),
                 el("h3", {}, "Suppresses"), tokenList("down", d.suppressed));
    }
    parts.push(el("h3", {}, `Top ${d.top.length} activating contexts`),
               el("div", { class: "contexts top" }, ...d.top.map((c) => context(c, d.max))));
    for (const group of d.samples) {
      if (group.contexts.length) {
        parts.push(el("h3", {}, `Random contexts, activation ${group.label}`),
                   el("div", { class: "contexts sample" }, ...group.contexts.map((c) => context(c, d.max))));
      }
    }
    if (!d.top.length) parts.push(el("p", { class: "hint" }, "This latent never fired on the pass's tokens."));
    detail.replaceChildren(...parts);
    detail.scrollTop = 0;
  }

  function load(id) {
    state.selected = id;
    for (const tr of document.querySelectorAll("#index tbody tr")) {
      tr.classList.toggle("selected", +tr.dataset.id === id);
    }
    document.getElementById("latent-data")?.remove();
    const script = el("script", { id: "latent-data", src: `data/latents/${id}.js` });
    script.onerror = () => document.getElementById("detail").replaceChildren(
      el("p", { class: "missing" }, `No data for latent ${id} (data/latents/${id}.js).`));
    document.body.append(script);
  }

  function route() {
    const match = /latent=(\d+)/.exec(location.hash);
    if (match) load(+match[1]);
  }

  function init() {
    renderHeader();
    document.getElementById("search").addEventListener("input", (e) => { state.query = e.target.value; renderList(); });
    document.getElementById("hide-dead").addEventListener("change", (e) => {
      state.hideDead = e.target.checked;
      renderList();
    });
    for (const th of document.querySelectorAll("th[data-key]")) {
      th.addEventListener("click", () => {
        state.desc = th.dataset.key === state.key ? !state.desc : th.dataset.key !== "id";
        state.key = th.dataset.key;
        renderList();
      });
    }
    renderList();
    window.addEventListener("hashchange", route);
    route();
  }

  document.addEventListener("DOMContentLoaded", init);
  return { showLatent };
})();
