// The HTML report: renders the embedded JSON summary (the same one `--out json` writes).
"use strict";
(function () {
  var S = JSON.parse(document.getElementById("summary").textContent);
  var e = ST.esc;
  var evs = ST.marks(S.events);
  var perNode = {};
  (S.nodes || []).forEach(function (n) { perNode[n.name] = n.timeline || []; });
  var passed = (S.thresholds || []).every(function (t) { return t.passed; });
  var verdict = !(S.thresholds || []).length ? "" :
    '<span class="badge verdict ' + (passed ? "pass" : "fail") + '" id="verdict">thresholds ' + (passed ? "passed" : "FAILED") + "</span>";
  var h = '<header class="top"><h1>stampede · ' + e(S.plan) + '</h1><span class="sub">run <code>' + e(S.run_id) + "</code> · started " + e(S.started_at) +
    " · " + (S.duration_s || 0).toFixed(1) + " s · " + (S.nodes || []).length + " node(s)</span>" + verdict + "</header><main>";
  var sat = ST.saturation(perNode, S.generator, S.nodes);
  h += ST.alarm(sat, !!(S.generator || {}).saturated);
  var g = S.generator || {}, lag = g.schedule_lag_us || {};
  h += '<section id="totals"><h2>Totals</h2>' + ST.kpis(S.totals || {}) + "</section>";
  var namedAll = ST.namedTable({ "all": S.totals || {} });
  if (namedAll) h += '<section id="protocol-metrics"><h2>WebSocket and other protocol metrics</h2><h3>All steps</h3>' + namedAll +
    "<h3>Per step</h3>" + ST.namedTable(S.requests || {}) + "</section>";
  if ((S.thresholds || []).length) {
    h += '<section id="thresholds"><h2>Thresholds</h2>' + ST.table([{ h: "metric" }, { h: "expression" }, { h: "value", n: 1 }, { h: "result" }],
      S.thresholds.map(function (t) {
        var dur = /duration|service_time|^ws_connecting|^ws_msg_rtt/.test(t.metric);
        var rate = /failed|checks/.test(t.metric) && /rate/.test(t.expr);
        var shown = dur ? ST.ms(t.value) : rate ? (t.value * 100).toFixed(2) + " %" : e(t.value);
        return { cells: ["<code>" + e(t.metric) + "</code>", "<code>" + e(t.expr) + "</code>", shown,
          '<span class="badge ' + (t.passed ? "pass" : "fail") + '">' + (t.passed ? "pass" : "FAIL") + "</span>"] };
      }), ' class="thresholds"') + "</section>";
  }
  h += baselineSection();
  h += '<section id="merged"><h2>Golden signals, all nodes merged</h2>' + ST.mergedCharts(S.timeline || [], evs, "merged-") +
    '<p class="note">Percentiles are read from merged HdrHistograms, never averaged. Dashed vertical lines mark events.</p>' + ST.resolution(S.timeline) + "</section>";
  h += '<section id="per-node"><h2>Per node</h2>' + ST.nodeTable(S.nodes || []) + ST.perNodeCharts(perNode, evs, "node-") + "</section>";
  h += '<section id="per-label"><h2>Per label</h2>' + ST.labelSection(S.by_label, S.nodes || [], perNode, evs, "") + "</section>";
  // `--baseline BASE.json`: the earlier run beside this one, figure by figure, and its
  // p99 and throughput drawn dashed over this run's (by seconds since each run's start).
  function baselineSection() {
    var el = document.getElementById("baseline");
    if (!el) return "";
    var B = JSON.parse(el.textContent);
    var rows = [["total", B.totals, S.totals]];
    [["flow ", "flows"], ["request ", "requests"]].forEach(function (k) {
      Object.keys(S[k[1]] || {}).sort().forEach(function (n) {
        if ((B[k[1]] || {})[n]) rows.push([k[0] + n, B[k[1]][n], S[k[1]][n]]);
      });
    });
    var metrics = [["rps", function (s) { return s.rps || 0; }, false, function (v) { return v.toFixed(1); }],
      ["p50", function (s) { return (s.latency_us || {}).p50 || 0; }, true, ST.ms],
      ["p95", function (s) { return (s.latency_us || {}).p95 || 0; }, true, ST.ms],
      ["p99", function (s) { return (s.latency_us || {}).p99 || 0; }, true, ST.ms],
      ["error rate", function (s) { return s.requests ? 100 * s.failed / s.requests : 0; }, true, function (v) { return v.toFixed(2) + " %"; }]];
    var cells = [];
    rows.forEach(function (r) {
      metrics.forEach(function (m) {
        var b = m[1](r[1] || {}), n = m[1](r[2] || {}), d = n - b;
        var pct = b ? (100 * d / b) : (n ? Infinity : 0);
        var worse = Math.abs(pct) >= 5 && (d > 0) === m[2];
        var better = Math.abs(pct) >= 5 && !worse && d !== 0;
        cells.push({ attrs: ' data-row="' + e(r[0]) + '" data-metric="' + m[0] + '"' + (worse ? ' class="worse"' : better ? ' class="better"' : ""),
          cells: ["<b>" + e(r[0]) + "</b>", m[0], m[3](b), m[3](n), (d >= 0 ? "+" : "−") + m[3](Math.abs(d)),
            d === 0 ? "" : isFinite(pct) ? (pct >= 0 ? "+" : "") + pct.toFixed(1) + " %" : "+∞"] });
      });
    });
    var pts = function (tl, f) { return (tl || []).map(function (p) { return [p.t, f(p)]; }); };
    return '<section id="baseline-compare"><h2>Compared with the baseline</h2><p class="sub">baseline run <code>' + e(B.run_id) +
      "</code> · started " + e(B.started_at) + " · " + (B.duration_s || 0).toFixed(1) + " s</p>" +
      '<div class="charts">' +
      ST.chart({ id: "baseline-latency", title: "p99 latency: this run and the baseline (dashed)", unit: "us" }, [
        { name: "p99", color: "#c0262d", points: pts(S.timeline, function (p) { return p.p99_us; }) },
        { name: "baseline p99", color: "#888888", dash: 1, points: pts(B.timeline, function (p) { return p.p99_us; }) }]) +
      ST.chart({ id: "baseline-rps", title: "Throughput: this run and the baseline (dashed)" }, [
        { name: "rps", color: "#1f6feb", points: pts(S.timeline, function (p) { return p.rps; }) },
        { name: "baseline rps", color: "#888888", dash: 1, points: pts(B.timeline, function (p) { return p.rps; }) }]) +
      "</div>" + ST.table([{ h: "row" }, { h: "metric" }, { h: "baseline", n: 1 }, { h: "this run", n: 1 }, { h: "Δ", n: 1 }, { h: "Δ %", n: 1 }],
        cells, ' class="baseline-compare"') +
      '<p class="note">Red rows are worse by 5 % or more, green rows better. <code>stampede compare</code> prints the same and can fail a CI job on rules.</p></section>';
  }

  function statTable(title, id, m) {
    var names = Object.keys(m || {}).sort();
    return "<h3>" + e(title) + "</h3>" + ST.table([{ h: "name" }].concat(ST.STAT_COLS).concat([{ h: "errors by class" }]), names.map(function (n) {
      var errs = Object.keys(m[n].errors || {}).map(function (c) { return e(c) + ": " + ST.int(m[n].errors[c]); }).join(", ");
      return { attrs: ' data-name="' + e(n) + '"', cells: ["<b>" + e(n) + "</b>"].concat(ST.statCells(m[n])).concat([errs]) };
    }), ' class="' + id + '"');
  }
  h += '<section id="requests"><h2>Requests, flows and scenarios</h2>' + statTable("per request (step)", "steps", S.requests) +
    statTable("per flow", "flows", S.flows) + statTable("per scenario", "scenarios", S.scenarios) + "</section>";
  h += '<section id="generator"><h2>Generator</h2>' + ST.table([{ h: "busiest CPU", n: 1 }, { h: "schedule lag p50", n: 1 }, { h: "p99", n: 1 }, { h: "max", n: 1 },
    { h: "dropped iterations", n: 1 }, { h: "start skew", n: 1 }, { h: "saturated" }],
    [{ cells: [((g.cpu || 0) * 100).toFixed(0) + " %", ST.ms(lag.p50), ST.ms(lag.p99), ST.ms(lag.max), ST.int(g.dropped_iterations), ST.ms(S.start_skew_us),
      g.saturated ? '<span class="badge fail">yes</span>' : sat.length ? '<span class="badge fail">at times</span>' : '<span class="badge pass">no</span>'] }]) + "</section>";
  h += '<section id="events"><h2>Events</h2>' + ST.eventsTable(S.events) + "</section>";
  h += '<section id="plan"><h2>The plan that ran</h2><pre class="plan" id="plan-source"></pre></section>';
  h += '<p class="note">Generated by stampede. This file is self-contained: it needs no network.</p></main>';
  document.getElementById("app").innerHTML = h;
  document.getElementById("plan-source").textContent = S.plan_source || "";
  document.title = "stampede · " + S.plan + " · " + S.run_id;
})();
