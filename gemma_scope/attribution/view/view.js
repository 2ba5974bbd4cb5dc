// The attribution graph's offline view: nodes by layer (rows) and position (columns), edges by weight.
// Data: window.GRAPH (circuit-tracer's graph JSON) and window.LATENTS ({"layer_latent": [{text, act}]} or null).
(function () {
  "use strict";
  var graph = window.GRAPH, latents = window.LATENTS || {};
  var svg = document.getElementById("graph"), details = document.getElementById("details");
  var tooltip = document.getElementById("tooltip"), NS = "http://www.w3.org/2000/svg";
  var meta = graph.metadata, tokens = meta.prompt_tokens;
  document.getElementById("title").textContent = "Attribution graph: " + meta.prompt;
  document.getElementById("summary").textContent = graph.nodes.length + " nodes, " + graph.links.length +
      " edges (node threshold " + meta.node_threshold + ")";
  var rows = {}, maxRow = 0;
  graph.nodes.forEach(function (n) {
    var row = n.layer === "E" ? 0 : parseInt(n.layer, 10) + 1;
    n.row = row; maxRow = Math.max(maxRow, row);
    var key = row + ":" + n.ctx_idx;
    (rows[key] = rows[key] || []).push(n);
  });
  var width = Math.max(700, tokens.length * 90), height = Math.max(400, (maxRow + 1) * 34 + 60);
  svg.setAttribute("viewBox", "0 0 " + width + " " + height);
  var colW = (width - 80) / tokens.length, rowH = (height - 60) / (maxRow + 1), byId = {};
  Object.keys(rows).forEach(function (key) {
    var cell = rows[key];
    cell.forEach(function (n, i) {
      n.x = 60 + colW * n.ctx_idx + colW * (i + 1) / (cell.length + 1);
      n.y = height - 40 - rowH * n.row - rowH / 2;
      byId[n.node_id] = n;
    });
  });
  function el(name, attrs, parent) {
    var e = document.createElementNS(NS, name);
    Object.keys(attrs).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    (parent || svg).appendChild(e);
    return e;
  }
  tokens.forEach(function (t, i) {
    el("text", {x: 60 + colW * (i + 0.5), y: height - 10, "text-anchor": "middle", class: "axis"}).textContent = t;
  });
  for (var r = 0; r <= maxRow; r++) {
    var label = r === 0 ? "E" : r === maxRow ? "logit" : "L" + (r - 1);
    el("text", {x: 4, y: height - 40 - rowH * r - rowH / 2 + 4, class: "axis"}).textContent = label;
  }
  var maxW = graph.links.reduce(function (m, l) { return Math.max(m, Math.abs(l.weight)); }, 1e-12);
  var edges = el("g", {}), nodes = el("g", {});
  graph.links.forEach(function (l) {
    var s = byId[l.source], t = byId[l.target];
    if (!s || !t) { return; }
    l.line = el("line", {x1: s.x, y1: s.y, x2: t.x, y2: t.y, class: "edge " + (l.weight >= 0 ? "pos" : "neg"),
                         "stroke-width": 0.3 + 3 * Math.abs(l.weight) / maxW}, edges);
  });
  function kind(n) { return n.feature_type === "cross layer transcoder" ? "latent" :
                     n.feature_type === "mlp reconstruction error" ? "error" : n.feature_type; }
  function describe(n) {
    var k = kind(n), text = k === "latent" ? "latent " + n.node_id.split("_")[1] + " at layer " + n.layer :
        k === "error" ? "error node, layer " + n.layer : k === "embedding" ? "token embedding" : n.clerp;
    text += " · position " + n.ctx_idx + " (" + JSON.stringify(tokens[n.ctx_idx]) + ")";
    if (n.activation !== null && n.activation !== undefined) { text += " · activation " + n.activation.toFixed(3); }
    if (n.influence !== null && n.influence !== undefined) { text += " · cumulative influence " + n.influence.toFixed(3); }
    return text;
  }
  function show(n) {
    details.textContent = "";
    var p = document.createElement("p"); p.textContent = describe(n); details.appendChild(p);
    var contexts = latents[n.layer + "_" + n.node_id.split("_")[1]];
    if (kind(n) === "latent" && contexts) {
      var h = document.createElement("h3"); h.textContent = "Top contexts"; details.appendChild(h);
      contexts.forEach(function (c) {
        var d = document.createElement("div"); d.className = "context";
        d.textContent = c.text + "  (" + c.act.toFixed(2) + ")"; details.appendChild(d);
      });
    }
    var ins = graph.links.filter(function (l) { return l.target === n.node_id; }).sort(function (a, b) {
      return Math.abs(b.weight) - Math.abs(a.weight); }).slice(0, 8);
    if (ins.length) {
      var h2 = document.createElement("h3"); h2.textContent = "Strongest inputs"; details.appendChild(h2);
      ins.forEach(function (l) {
        var d = document.createElement("div"); d.textContent = l.weight.toFixed(3) + " from " + describe(byId[l.source]);
        details.appendChild(d);
      });
    }
  }
  // Error nodes first, so that in a crowded cell the latents beside them are drawn on top and stay hoverable.
  var errorsFirst = graph.nodes.slice().sort(function (a, b) {
    return (kind(b) === "error") - (kind(a) === "error");
  });
  errorsFirst.forEach(function (n) {
    var c = el("circle", {cx: n.x, cy: n.y, r: kind(n) === "latent" ? 5 : 6, class: "node " + kind(n),
                          "data-id": n.node_id}, nodes);
    c.addEventListener("mouseenter", function (ev) {
      c.classList.add("hover");
      graph.links.forEach(function (l) {
        if (!l.line) { return; }
        var on = l.source === n.node_id || l.target === n.node_id;
        l.line.classList.toggle("lit", on); l.line.classList.toggle("dim", !on);
      });
      tooltip.textContent = describe(n); tooltip.hidden = false;
      tooltip.style.left = (ev.clientX + 12) + "px"; tooltip.style.top = (ev.clientY + 12) + "px";
      show(n);
    });
    c.addEventListener("mouseleave", function () {
      c.classList.remove("hover"); tooltip.hidden = true;
      graph.links.forEach(function (l) { if (l.line) { l.line.classList.remove("lit", "dim"); } });
    });
  });
}());
