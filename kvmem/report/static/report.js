/* kvmem report: renders figures, the paged neuron table and neuron pages from the data scripts.
   Every corpus or vocabulary string is inserted with textContent (never innerHTML). */
(function () {
  "use strict";
  var KV = window.KV = window.KV || {};
  KV.layers = KV.layers || {};
  KV.packed = KV.packed || {};
  KV.addPacked = function (name, b64) { KV.packed[name] = b64; };
  /* Promise of the object stored as base64 gzip-compressed JSON under name (see kvmem.report.data.packed). */
  KV.unpack = function (name) {
    var bin = atob(KV.packed[name]), bytes = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    var stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
    return new Response(stream).text().then(function (text) { delete KV.packed[name]; return JSON.parse(text); });
  };

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  KV.el = el;

  var VISIBLE = { " ": "\u2423", "\n": "\u23ce", "\t": "\u21e5", "\r": "\u240d" };
  /* A token as a span: whitespace drawn as muted ␣ ⏎ ⇥, other control characters as \uXXXX,
     the whole token isolated for bidi so RTL text cannot reorder its neighbours. */
  function tokenEl(str, cls) {
    var span = el("span", "tok" + (cls ? " " + cls : ""));
    span.setAttribute("dir", "auto");
    if (str === undefined || str === null) { span.appendChild(el("span", "ws", "\u2205")); return span; }
    if (str === "") { span.appendChild(el("span", "ws", "\u2205")); return span; }
    var buf = "";
    for (var ch of String(str)) {
      var code = ch.codePointAt(0);
      if (VISIBLE[ch] || code < 32 || code === 127 || (code >= 0x200b && code <= 0x200f) || (code >= 0x202a && code <= 0x202e) || (code >= 0x2066 && code <= 0x2069)) {
        if (buf) { span.appendChild(document.createTextNode(buf)); buf = ""; }
        var shown = VISIBLE[ch] || ("\\u" + code.toString(16).padStart(4, "0"));
        span.appendChild(el("span", "ws", shown));
        if (ch === "\n") span.appendChild(el("wbr"));
      } else buf += ch;
    }
    if (buf) span.appendChild(document.createTextNode(buf));
    return span;
  }
  KV.tokenEl = tokenEl;
  function vocab(id) { return id >= 0 && id < KV.vocab.length ? KV.vocab[id] : "<id " + id + ">"; }
  function fmt(x, d) { if (x === null || x === undefined) return "–"; return Number(x).toPrecision(d || 3).replace(/\.?0+e/, "e").replace(/(\.\d*?)0+$/, "$1").replace(/\.$/, ""); }
  function pct(x) { return (100 * x).toFixed(x < 0.001 && x > 0 ? 3 : (x < 0.1 ? 2 : 1)) + "%"; }
  KV.fmt = fmt; KV.pct = pct;

  function plot(div, fig) {
    var config = { displaylogo: false, responsive: true, modeBarButtonsToRemove: ["sendDataToCloud"] };
    div.style.height = ((fig.layout && fig.layout.height) || 320) + "px";
    return Plotly.newPlot(div, fig.data || [], fig.layout || {}, config);
  }
  KV.renderFigures = function () {
    document.querySelectorAll('script[type="application/json"][data-fig]').forEach(function (s) {
      var div = document.getElementById(s.getAttribute("data-fig"));
      if (div) plot(div, JSON.parse(s.textContent));
    });
  };

  /* ---------------- overview: the paged, sortable, filterable neuron table ---------------- */
  /* opts: {gated, default_sort}: gated FFNs open sorted by the share with |m| > 10% of max |m| (their m > 0
     rate is about one half for every neuron), the others by the firing rate (m > 0). */
  KV.overview = function (opts) {
    KV.renderFigures();
    KV.unpack("neurons").then(function (N) { KV.neurons = N; table(opts || {}); });
  };
  var SHARES = { act: 1, pos: 1, neg: 1, rate: 1 };
  function table(opts) {
    var N = KV.neurons, n = N.layer.length, norm = KV.vocab.map(function (t) { return t.trim().toLowerCase(); });
    var first = opts.default_sort || "act";
    var hasVal = !!N.val, PAGE = 50, state = { rows: [], sort: first, dir: -1, page: 0 };
    // [key, header, tooltip, class]: every share header states its threshold
    var cols = [["id", "neuron", "layer.neuron", "c-id"],
                ["act", "|m| > 10% max|m|", "share of tokens with |m| > 10% of the neuron's max |m| (either sign), \u00b1 the histogram's bound", "c-act"],
                ["pos", "m > +10%", "share of tokens with m > +10% of the neuron's max |m|", "c-num"],
                ["neg", "m < \u221210%", "share of tokens with m < \u221210% of the neuron's max |m|", "c-num"],
                ["maxabs", "max |m|", "largest |m| over the corpus (exact)", "c-num"],
                ["rate", "m > 0", "firing rate: share of tokens with m > 0 (exact)", "c-num"],
                ["trig", "top trigger token", "the token of the neuron's highest activation", "c-trig"]];
    if (hasVal) cols.push(["val", "top value tokens", "the top tokens of v \u00b7 W_U", "c-val"]);
    var hasDesc = !!N.desc, descText = hasDesc ? N.desc.map(function (t) { return t.toLowerCase(); }) : null, descWords = null;
    if (hasDesc) {
      cols.push(["xd", "description", "kvmem explain's key-side description (the LLM's, else the baseline's)", "c-desc"]);
      cols.push(["xs", "detection", "balanced accuracy of detection on held-out snippets with this description (0.5 = chance)", "c-num"]);
      cols.push(["xb", "baseline", "the LLM-free baseline's detection score, same neuron and sign", "c-num"]);
      descWords = descText.map(function (t) { var w = {}; t.split(/[^\p{L}\p{N}_]+/u).forEach(function (x) { if (x) w[x] = 1; }); return w; });
    }
    var layerSel = document.getElementById("layer"), seen = {};
    N.layer.forEach(function (l) { if (!seen[l]) { seen[l] = 1; var o = el("option", null, "layer " + l); o.value = l; layerSel.appendChild(o); } });
    var q = document.getElementById("q"), qmode = document.getElementById("qmode"), qexact = document.getElementById("qexact");
    var minrate = document.getElementById("minrate"), ratecol = document.getElementById("ratecol"), hidedead = document.getElementById("hidedead");
    ratecol.value = SHARES[first] ? first : "act";
    if (!hasVal) { qmode.value = "trig"; qmode.querySelector('option[value="val"]').disabled = true; }
    function key(i) {
      if (state.sort === "id") return N.layer[i] * 1e7 + N.neuron[i];
      if (state.sort === "trig") return norm[N.trig[i]] || "";
      if (state.sort === "val") return hasVal ? norm[N.val[i][0]] || "" : "";
      if (state.sort === "xd") return descText ? (N.xd[i] || "\uffff").toLowerCase() : "";
      if (state.sort === "xs" || state.sort === "xb") return N[state.sort][i] === null ? -1 : N[state.sort][i];
      return N[state.sort][i];
    }
    function filter() {
      var text = q.value.trim(), lay = layerSel.value, mr = parseFloat(minrate.value) || 0, rows = [], share = N[ratecol.value];
      var idm = /^(\d+)\.(\d+)$/.exec(text), t = text.toLowerCase(), mode = qmode.value, exact = qexact.checked;
      var eid = /^\d+\.[es]\d+\.\d+$/.test(text) ? text : null;  // an expert neuron (MoE runs: N.id)
      function match(id) { var s = norm[id]; return s !== undefined && (exact ? s === t : s.indexOf(t) >= 0); }
      var words = t.split(/[^\p{L}\p{N}_]+/u).filter(function (w) { return w; });
      function describes(i) {  // every word of the query in the neuron's descriptions
        if (!hasDesc || !words.length || !descText[i]) return false;
        return words.every(function (w) { return exact ? descWords[i][w] === 1 : descText[i].indexOf(w) >= 0; });
      }
      for (var i = 0; i < n; i++) {
        if (lay !== "" && N.layer[i] !== +lay) continue;
        if (share[i] < mr || (hidedead.checked && N.rate[i] === 0)) continue;
        if (eid) { if (!N.id || N.id[i] !== eid) continue; }
        else if (idm) { if (N.layer[i] !== +idm[1] || N.neuron[i] !== +idm[2]) continue; }
        else if (t) {
          var ok = mode === "desc" ? describes(i) : (mode !== "val" && match(N.trig[i]));
          if (!ok && (mode === "both" || mode === "val") && hasVal) for (var j = 0; j < N.val[i].length && !ok; j++) ok = match(N.val[i][j]);
          if (!ok && mode === "both") ok = describes(i);
          if (!ok) continue;
        }
        rows.push(i);
      }
      var dir = state.dir;
      rows.sort(function (a, b) { var x = key(a), y = key(b); return x < y ? -dir : x > y ? dir : a - b; });
      state.rows = rows; state.page = 0; render();
    }
    var wrap = document.getElementById("table");
    function render() {
      var table = el("table", "neurons"), thead = el("thead"), tr = el("tr");
      cols.forEach(function (c) {
        var th = el("th", "sortable " + c[3], c[1] + (state.sort === c[0] ? (state.dir < 0 ? " \u25be" : " \u25b4") : ""));
        th.title = c[2]; th.setAttribute("data-col", c[0]);
        th.addEventListener("click", function () { state.dir = state.sort === c[0] ? -state.dir : (c[0] === "id" || c[0] === "trig" || c[0] === "val" || c[0] === "xd" ? 1 : -1); state.sort = c[0]; filter(); });
        tr.appendChild(th);
      });
      thead.appendChild(tr); table.appendChild(thead);
      var tbody = el("tbody"), start = state.page * PAGE, rows = state.rows.slice(start, start + PAGE);
      rows.forEach(function (i) {
        var r = el("tr"), id = N.id ? N.id[i] : N.layer[i] + "." + N.neuron[i], a = el("a", null, id);
        a.href = "neuron.html#" + id;
        var td = el("td"); td.appendChild(a); r.appendChild(td);
        td = el("td", "num", pct(N.act[i]));
        if (N.act_err[i] > 0) td.appendChild(el("span", "err", " \u00b1" + pct(N.act_err[i])));
        r.appendChild(td);
        r.appendChild(el("td", "num", pct(N.pos[i])));
        r.appendChild(el("td", "num", pct(N.neg[i])));
        r.appendChild(el("td", "num", fmt(N.maxabs[i])));
        r.appendChild(el("td", "num", pct(N.rate[i])));
        td = el("td"); if (N.trig[i] >= 0) td.appendChild(tokenEl(vocab(N.trig[i]))); r.appendChild(td);
        if (hasVal) { td = el("td"); N.val[i].slice(0, 4).forEach(function (v) { td.appendChild(tokenEl(vocab(v))); }); r.appendChild(td); }
        if (hasDesc) {
          td = el("td", "desc", N.xd[i] || ""); td.title = N.desc[i]; r.appendChild(td);
          r.appendChild(el("td", "num", N.xs[i] === null ? "\u2013" : N.xs[i].toFixed(2)));
          r.appendChild(el("td", "num", N.xb[i] === null ? "\u2013" : N.xb[i].toFixed(2)));
        }
        tbody.appendChild(r);
      });
      table.appendChild(tbody);
      wrap.replaceChildren(table);
      var pages = Math.max(1, Math.ceil(state.rows.length / PAGE));
      document.getElementById("pageinfo").textContent = state.rows.length.toLocaleString() + " neurons · page " + (state.page + 1) + " of " + pages;
      document.getElementById("prev").disabled = state.page === 0;
      document.getElementById("next").disabled = state.page >= pages - 1;
    }
    document.getElementById("prev").addEventListener("click", function () { state.page--; render(); });
    document.getElementById("next").addEventListener("click", function () { state.page++; render(); });
    var timer = null;
    [q, qmode, qexact, layerSel, minrate, ratecol, hidedead].forEach(function (x) {
      x.addEventListener("input", function () { clearTimeout(timer); timer = setTimeout(filter, 120); });
    });
    filter();
  }

  /* ---------------- neuron page: rendered on demand from data/layer-L.js ---------------- */
  function shade(v) {  // v in [-100, 100] (share of the neuron's max |m|)
    if (!v) return "";
    var a = Math.min(1, Math.abs(v) / 100) * 0.85;
    return v > 0 ? "rgba(232,89,12," + a.toFixed(3) + ")" : "rgba(28,126,214," + a.toFixed(3) + ")";
  }
  function example(L, ex, scale) {
    // ex = [value, window number, shading or undefined]; L.win[w] = token ids, L.wdoc[w] = document
    var row = el("div", "ex"), val = el("span", "val", fmt(ex[0], 3)), ctx = el("span", "ctx");
    var before = L.before, win = L.win[ex[1]], sh = ex[2];
    val.title = "m at the marked token"; row.appendChild(val);
    win.forEach(function (id, j) {
      if (id < 0) return;
      var t = tokenEl(vocab(id), j === before ? "at" : "");
      // shading levels: one letter per token, 'K' = 0, 'A' = -max|m|, 'U' = +max|m| (kvmem.report.shade)
      var s = sh ? 10 * (sh.charCodeAt(j) - 75) : (j === before ? Math.round(100 * ex[0] / scale) : 0);
      if (s) t.style.backgroundColor = shade(s);
      if (sh) t.title = "m \u2248 " + fmt(s * scale / 100, 1) + " (to 10% of max |m|)";
      ctx.appendChild(t);
    });
    row.appendChild(ctx);
    row.appendChild(el("span", "doc", "doc " + L.wdoc[ex[1]]));
    return row;
  }
  function examples(L, id, list, scale, empty) {
    var box = document.getElementById(id); box.replaceChildren();
    if (!list || !list.length) { box.appendChild(el("p", "note", empty)); return; }
    list.forEach(function (ex) { box.appendChild(example(L, ex, scale)); });
  }
  function vocabTable(id, list) {
    var t = document.getElementById(id); t.replaceChildren();
    (list || []).forEach(function (p) {
      var r = el("tr"), a = el("td"); a.appendChild(tokenEl(vocab(p[0]))); r.appendChild(a);
      r.appendChild(el("td", "num", fmt(p[1], 3))); t.appendChild(r);
    });
  }
  function histFigure(h, nTok, whose) {
    var E = KV.meta.edges, lo = h[0], counts = h[1], x = [], col = [], text = [];
    function e(i) { var v = E[i]; return v === null ? (i === 0 ? "-\u221e" : "\u221e") : (Math.abs(v) < 1e-30 ? "0" : fmt(v, 3)); }
    for (var i = 0; i < counts.length; i++) {
      var b = lo + i, mid = (E[b] === null ? -1 : E[b]) + (E[b + 1] === null ? 1 : E[b + 1]);
      x.push(b); col.push(mid > 1e-30 ? "#e8590c" : mid < -1e-30 ? "#1c7ed6" : "#868e96"); text.push("[" + e(b) + ", " + e(b + 1) + ")");
    }
    var step = Math.max(1, Math.floor(counts.length / 8)), tv = [], tt = [];
    for (var t = lo; t <= lo + counts.length; t += step) { tv.push(t - 0.5); tt.push(e(t)); }
    return { data: [{ type: "bar", x: x, y: counts, marker: { color: col, line: { width: 0 } }, customdata: text,
      hovertemplate: "m in %{customdata}: %{y:,} tokens<extra></extra>" }],
      layout: { title: { text: "Activation histogram (" + whose + " " + nTok.toLocaleString() + " tokens)", font: { size: 14 }, x: 0.01, xanchor: "left" }, height: 300, margin: { l: 60, r: 20, t: 50, b: 45 }, bargap: 0.05,
        xaxis: { title: { text: "activation m (bins log-spaced in |m|)" }, tickvals: tv, ticktext: tt },
        yaxis: { title: { text: "tokens (log)" }, type: "log" } } };
  }
  var QN = ["gate > 0, up > 0", "gate > 0, up < 0", "gate < 0, up > 0", "gate < 0, up < 0"];
  function quadFigure(q) {
    var total = q.reduce(function (a, b) { return a + b; }, 0) || 1;
    return { data: [{ type: "bar", x: QN, y: q.map(function (c) { return c / total; }), text: q.map(function (c) { return c.toLocaleString(); }),
      marker: { color: ["#2b8a3e", "#e8590c", "#1c7ed6", "#862e9c"] }, hovertemplate: "%{x}: %{y:.1%} (%{text} tokens)<extra></extra>" }],
      layout: { title: { text: "Sign combinations of gate and up (all " + total.toLocaleString() + " tokens)", font: { size: 14 }, x: 0.01, xanchor: "left" },
        height: 280, margin: { l: 60, r: 20, t: 50, b: 45 }, yaxis: { tickformat: ".0%", range: [0, 1], title: { text: "share of tokens" } } } };
  }
  function showNeuron(layer, neuron) {
    var L = KV.layers[layer], d = L.neurons[neuron], M = KV.meta, X = L.moe;
    var id = X ? X.ids[neuron] : layer + "." + neuron;
    var maxv = L.max[neuron], minv = L.min[neuron];
    var scale = Math.max(Math.abs(maxv), Math.abs(minv)) || 1;
    document.title = "neuron " + id + " \u00b7 kvmem report";
    document.getElementById("nid").textContent = "neuron " + id;
    var rate = L.rate[neuron], nTok = X ? X.n[neuron] : M.n_tokens, whose = X ? "its expert's" : "all";
    var routed = "", ex = document.getElementById("expert");
    if (X) {  // MoE: every figure of this neuron is of the tokens routed to its expert
      var e = (X.shared[neuron] ? "shared expert s" : "routed expert e") + X.expert[neuron];
      routed = " \u00b7 " + e + ": " + nTok.toLocaleString() + " of " + M.n_tokens.toLocaleString() + " tokens routed to it (" +
        pct(nTok / M.n_tokens) + (X.share_lo[neuron] === null ? ", every token" : ", 95% interval " + pct(X.share_lo[neuron]) + "\u2013" + pct(X.share_hi[neuron])) + ")";
      ex.replaceChildren(document.createTextNode("Rates, histogram and examples are of the tokens routed to this neuron's expert only (raw m, before the routing weight). "));
      var a = el("a", null, "routing of layer " + layer); a.href = X.page; ex.appendChild(a); ex.hidden = false;
    } else if (ex) { ex.hidden = true; }
    document.getElementById("summary").textContent = "layer " + layer + " of " + M.n_layers + routed + " \u00b7 firing rate " + (rate === null ? "\u2013" : pct(rate)) +
      " (m > 0 on " + Math.round(rate * nTok).toLocaleString() + " of " + nTok.toLocaleString() + (X ? " of its expert's" : "") + " tokens) \u00b7 max m " +
      fmt(maxv, 4) + " \u00b7 min m " + fmt(minv, 4);
    document.getElementById("shadenote").textContent = "Each token is shaded by m of this neuron (orange > 0, blue < 0, relative to max |m| = " +
      fmt(scale, 3) + "); the activating token is boxed. " + M.shade_note.charAt(0).toUpperCase() + M.shade_note.slice(1) + ".";
    examples(L, "top", d.top, scale, "no token with m > 0 was stored");
    examples(L, "top_docs", d.top_docs, scale, "none stored");
    examples(L, "bands", d.bands, scale, "no firing tokens sampled");
    examples(L, "bottom", d.bottom, scale, "none stored");
    var agg = {}, chips = document.getElementById("pertoken"); chips.replaceChildren();
    (d.t || []).forEach(function (p) { var a = agg[p[0]] = agg[p[0]] || [0, -Infinity]; a[0]++; a[1] = Math.max(a[1], p[1]); });
    Object.keys(agg).sort(function (a, b) { return agg[b][0] - agg[a][0] || agg[b][1] - agg[a][1]; }).forEach(function (k) {
      var c = el("span", "chip"); c.appendChild(tokenEl(vocab(+k))); c.appendChild(el("span", "count", "\u00d7" + agg[k][0] + " max " + fmt(agg[k][1], 3)));
      chips.appendChild(c);
    });
    described(d.x);
    document.getElementById("valuenote").textContent = M.has_values ? "Tokens whose logit v \u00b7 W_U is largest / smallest for this neuron's value vector v, " + M.value_note + "." : "Value side " + M.value_note + ".";
    vocabTable("vtop", d.vt); vocabTable("vbottom", d.vb);
    document.getElementById("gatednote").textContent = M.gated_note ? "Note: " + M.gated_note + "." : "";
    plot(document.getElementById("hist"), histFigure(d.h, nTok, whose));
    document.getElementById("histnote").textContent = "Bins are log-spaced in |m| (4 per octave), symmetric around 0; the middle grey bin holds exact zeros.";
    var qdiv = document.getElementById("quad"), qex = document.getElementById("quadex");
    qex.replaceChildren();
    if (d.q) {
      qdiv.hidden = false; plot(qdiv, quadFigure(d.q));
      qex.appendChild(el("h3", null, "Strongest example of each sign combination (largest |m|)"));
      (d.quad || []).forEach(function (ex, j) {
        qex.appendChild(el("div", "qlabel", QN[j] + " (" + d.q[j].toLocaleString() + " tokens)"));
        if (ex[1] < 0) qex.appendChild(el("p", "note", "none"));
        else qex.appendChild(example(L, ex, scale));
      });
    } else { qdiv.hidden = true; }
    var nl = L.neurons.length;
    function nid(j) { return X ? X.ids[j] : layer + "." + j; }
    document.getElementById("prevn").href = "neuron.html#" + (neuron > 0 ? nid(neuron - 1) : id);
    document.getElementById("nextn").href = "neuron.html#" + (neuron + 1 < nl ? nid(neuron + 1) : id);
    document.getElementById("error").hidden = true;
  }
  var XSCORES = ["detection", "fuzzing", "simulation", "value"];
  function scoreText(sc) {  // [score, n, lo, hi]
    if (!sc) return "\u2013";
    return sc[0].toFixed(2) + (sc[2] === null ? "" : " [" + sc[2].toFixed(2) + ", " + sc[3].toFixed(2) + "]") + " n=" + sc[1];
  }
  function described(x) {  // the neuron's descriptions and scores (kvmem.report.explained), as text only
    var box = document.getElementById("described"), t = document.getElementById("xtable");
    if (!x || !x.length) { box.hidden = true; t.replaceChildren(); return; }
    box.hidden = false;
    document.getElementById("explainnote").textContent = KV.meta.explain_note;
    var head = el("tr");
    ["side", "sign", "explainer", "description"].concat(XSCORES).forEach(function (c) { head.appendChild(el("th", null, c)); });
    var thead = el("thead"); thead.appendChild(head);
    var tbody = el("tbody");
    x.forEach(function (r) {
      var tr = el("tr", r.by === "baseline" ? "xrow baseline" : "xrow llm");
      tr.appendChild(el("td", null, r.side === "key" ? "key (reads)" : "value (writes)"));
      tr.appendChild(el("td", null, r.sign === "+" ? "m > 0" : "m < 0"));
      var by = el("td", null, r.by); if (r.sc && r.sc !== r.by) by.title = "scored by " + r.sc; tr.appendChild(by);
      var dtd = el("td", "desc", r.d || "(no usable reply)"); dtd.setAttribute("dir", "auto"); tr.appendChild(dtd);
      XSCORES.forEach(function (s) {
        var has = r.s.hasOwnProperty(s), td = el("td", "num score", has ? scoreText(r.s[s]) : "");
        td.setAttribute("data-score", s);
        if (r.note && r.note[s]) td.title = r.note[s];
        tr.appendChild(td);
      });
      tbody.appendChild(tr);
    });
    t.replaceChildren(thead, tbody);
  }
  function fail(msg) { var e = document.getElementById("error"); e.textContent = msg; e.hidden = false; }
  KV.neuronPage = function () {
    function go() {
      var text = decodeURIComponent(location.hash).replace(/^#/, "");
      var m = /^(\d+)\.(?:([es])(\d+)\.)?(\d+)$/.exec(text);
      var layer = m ? +m[1] : KV.meta.layers[0], neuron = m ? +m[4] : 0, expert = m && m[2] ? text : null;
      if (KV.meta.layers.indexOf(layer) < 0) return fail("layer " + layer + " was not profiled in this run");
      function show() {  // an expert id (L.eE.N / L.sS.N) is looked up in its layer's ids
        var L = KV.layers[layer], j = neuron;
        if (expert) { j = L.moe ? L.moe.ids.indexOf(expert) : -1; if (j < 0) return fail("no neuron " + expert + " in this run"); }
        if (j >= L.neurons.length) return fail("neuron " + j + " is out of range (d_mlp = " + L.neurons.length + ")");
        showNeuron(layer, j);
      }
      if (KV.layers[layer]) return show();
      var s = document.createElement("script");
      s.src = "data/layer-" + layer + ".js";
      s.onload = function () {
        KV.unpack("layer-" + layer).then(function (d) { KV.layers[layer] = d; show(); })
          .catch(function (e) { fail("could not read data/layer-" + layer + ".js: " + e); });
      };
      s.onerror = function () { fail("could not load data/layer-" + layer + ".js"); };
      document.head.appendChild(s);
    }
    window.addEventListener("hashchange", go);
    document.getElementById("goto").addEventListener("submit", function (ev) {
      ev.preventDefault(); location.hash = document.getElementById("gotoq").value.trim();
    });
    go();
  };
})();
/* ---------------- prompt page ---------------- */
(function () {
  "use strict";
  var KV = window.KV, el = KV.el, tokenEl = KV.tokenEl, fmt = KV.fmt;
  KV.promptPage = function () {
    var D = JSON.parse(document.getElementById("pdata").textContent), linked = {}, sel = D.tokens.length - 1;
    D.linked_layers.forEach(function (l) { linked[l] = 1; });
    function nid(layer, neuron) {
      var id = layer + "." + neuron;
      if (!linked[layer]) return el("span", "nid", id);
      var a = el("a", "nid", id); a.href = "neuron.html#" + id; return a;
    }
    function table(rows, withLayer) {
      var t = el("table", "ptable"), h = el("tr");
      ["neuron", "m", "|m|\u00b7\u2016v\u2016", "writes"].forEach(function (c) { h.appendChild(el("th", null, c)); });
      t.appendChild(h);
      rows.forEach(function (r) {
        var tr = el("tr"), td = el("td"); td.appendChild(nid(r.layer, r.neuron)); tr.appendChild(td);
        tr.appendChild(el("td", "num", fmt(r.m, 3))); tr.appendChild(el("td", "num", fmt(r.c, 3)));
        td = el("td"); r.w.forEach(function (w) { td.appendChild(tokenEl(w)); }); tr.appendChild(td);
        t.appendChild(tr);
      });
      return t;
    }
    var box = document.getElementById("ptokens");
    function render() {
      box.replaceChildren();
      D.tokens.forEach(function (t, i) {
        var s = tokenEl(t, i === sel ? "sel" : ""); s.title = "position " + i;
        s.addEventListener("click", function () { sel = i; render(); });
        box.appendChild(s);
      });
      var P = D.positions[sel];
      document.getElementById("ptitle").textContent = "Top neurons over all layers at position " + sel;
      document.getElementById("pnext").replaceChildren(document.createTextNode("next token: "));
      P.next.forEach(function (n) {
        var c = el("span", "chip"); c.appendChild(tokenEl(n[0])); c.appendChild(el("span", "count", (100 * n[1]).toFixed(1) + "%"));
        document.getElementById("pnext").appendChild(c);
      });
      document.getElementById("ptop").replaceChildren(table(P.top));
      var lay = document.getElementById("players"); lay.replaceChildren();
      P.layers.forEach(function (L) {
        lay.appendChild(el("h3", null, "layer " + L.layer));
        lay.appendChild(table(L.neurons.map(function (r) { return { layer: L.layer, neuron: r.neuron, m: r.m, c: r.c, w: r.w }; })));
      });
    }
    render();
  };
})();
