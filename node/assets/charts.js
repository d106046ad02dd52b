// Shared by the HTML report and the live dashboard: SVG line charts, tables and the
// golden-signal sections of one run. Everything is built as escaped strings; no
// network, no libraries.
"use strict";
var ST = (function () {
  var PALETTE = ["#3957d6", "#e8590c", "#2b8a3e", "#c2255c", "#7048e8", "#0b7285", "#e67700", "#495057", "#d6336c", "#5c940d"];
  var LAG_SATURATED_US = 10000;

  function esc(s) {
    return String(s === undefined || s === null ? "" : s)
      .replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  }
  function int(n) { return Math.round(n || 0).toLocaleString("en-US"); }
  function ms(us) {
    us = us || 0;
    if (us >= 1e6) return (us / 1e6).toFixed(2) + " s";
    if (us >= 1e4) return (us / 1e3).toFixed(0) + " ms";
    return (us / 1e3).toFixed(2) + " ms";
  }
  function pct(a, b) { return b ? (100 * a / b).toFixed(2) + " %" : "0 %"; }
  function bytes(n) {
    n = n || 0;
    var u = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : n) + " " + u[i];
  }
  function nice(max) {
    if (!(max > 0)) return 1;
    var p = Math.pow(10, Math.floor(Math.log10(max))), m = max / p;
    var step = m <= 1 ? 1 : m <= 2 ? 2 : m <= 2.5 ? 2.5 : m <= 5 ? 5 : 10;
    return step * p;
  }
  function tickLabel(v, unit) {
    if (unit === "us") return v >= 1e6 ? (v / 1e6) + "s" : (v / 1e3) + "ms";
    if (v >= 1e6) return (v / 1e6) + "M";
    if (v >= 1e3) return (v / 1e3) + "k";
    return String(Math.round(v * 100) / 100);
  }

  // Time ticks at whole seconds, minutes or hours: a run of days labelled in seconds
  // is unreadable.
  var STEPS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400];
  function timeStep(min) {
    for (var i = 0; i < STEPS.length; i++) if (STEPS[i] >= min) return STEPS[i];
    return nice(min / 86400) * 86400;
  }
  function timeLabel(v, step) {
    if (step < 60) return v + "s";
    if (step < 3600) return (v / 60) + "m";
    return (v / 3600) + "h";
  }

  // series: [{name, color, points: [[t, y], ...]}]; opts: {id, title, unit, events:[t]}
  function chart(opts, series) {
    var W = 560, H = 190, L = 48, R = 10, T = 8, B = 22;
    var xs = [], ymax = 0;
    series.forEach(function (s) { s.points.forEach(function (p) { xs.push(p[0]); if (p[1] > ymax) ymax = p[1]; }); });
    var head = '<div class="chartbox" data-chart="' + esc(opts.id) + '"><div class="title">' + esc(opts.title) + '</div>';
    if (!xs.length) return head + '<div class="empty">no data yet</div></div>';
    var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs);
    if (x1 === x0) x1 = x0 + 1;
    var top = nice(ymax * 1.05);
    var sx = function (x) { return L + (x - x0) / (x1 - x0) * (W - L - R); };
    var sy = function (y) { return T + (1 - y / top) * (H - T - B); };
    var svg = '<svg viewBox="0 0 ' + W + ' ' + H + '" xmlns="http://www.w3.org/2000/svg" role="img" aria-label="' + esc(opts.title) + '">';
    for (var i = 0; i <= 4; i++) {
      var yv = top * i / 4, y = sy(yv).toFixed(1);
      svg += '<line class="grid" x1="' + L + '" x2="' + (W - R) + '" y1="' + y + '" y2="' + y + '"/>';
      svg += '<text x="' + (L - 4) + '" y="' + (+y + 3) + '" text-anchor="end">' + esc(tickLabel(yv, opts.unit)) + '</text>';
    }
    var xstep = timeStep((x1 - x0) / 6);
    for (var xv = Math.ceil(x0 / xstep) * xstep; xv <= x1; xv += xstep) {
      svg += '<text x="' + sx(xv).toFixed(1) + '" y="' + (H - 6) + '" text-anchor="middle">' + esc(timeLabel(xv, xstep)) + '</text>';
    }
    svg += '<line class="axis" x1="' + L + '" x2="' + (W - R) + '" y1="' + (H - B) + '" y2="' + (H - B) + '"/>';
    // Events in the same second share one marker.
    var marks = {}, order = [];
    (opts.events || []).forEach(function (ev) {
      var key = Math.round(ev[0]);
      if (ev[0] < x0 || ev[0] > x1) return;
      if (!marks[key]) { marks[key] = { t: ev[0], kinds: [] }; order.push(key); }
      if (marks[key].kinds.indexOf(ev[1]) < 0) marks[key].kinds.push(ev[1]);
    });
    order.forEach(function (key) {
      var m = marks[key], x = sx(m.t).toFixed(1), label = m.kinds.join(", ");
      svg += '<line class="ev" x1="' + x + '" x2="' + x + '" y1="' + T + '" y2="' + (H - B) + '"><title>' + esc(label) + '</title></line>' +
        (+x > W / 2 ? '<text class="evl" text-anchor="end" x="' + (+x - 3) : '<text class="evl" x="' + (+x + 3)) +
        '" y="' + (T + 9) + '">' + esc(label) + '</text>';
    });
    series.forEach(function (s) {
      if (!s.points.length) return;
      var d = s.points.map(function (p, j) { return (j ? "L" : "M") + sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1); }).join("");
      if (s.points.length === 1) d += "h2";
      svg += '<path class="line" data-series="' + esc(s.name) + '" data-points="' + s.points.length + '" stroke="' + s.color + '"' +
        (s.dash ? ' stroke-dasharray="5 3"' : '') + ' d="' + d + '"><title>' + esc(s.name) + '</title></path>';
    });
    svg += "</svg>";
    var legend = '<div class="legend">' + series.map(function (s) {
      return '<span><i style="background:' + s.color + '"></i>' + esc(s.name) + '</span>';
    }).join("") + "</div>";
    return head + svg + legend + "</div>";
  }

  function table(cols, rows, attrs) {
    var h = '<div class="tablewrap"><table' + (attrs || "") + '><thead><tr>' + cols.map(function (c) {
      return '<th' + (c.n ? ' class="n"' : '') + '>' + esc(c.h) + '</th>';
    }).join("") + "</tr></thead><tbody>";
    rows.forEach(function (r) {
      h += "<tr" + (r.attrs || "") + ">" + r.cells.map(function (v, i) {
        return '<td' + (cols[i].n ? ' class="n"' : '') + '>' + v + '</td>';
      }).join("") + "</tr>";
    });
    return h + "</tbody></table></div>";
  }

  var STAT_COLS = [{ h: "requests", n: 1 }, { h: "failed", n: 1 }, { h: "error %", n: 1 }, { h: "rps", n: 1 },
    { h: "p50", n: 1 }, { h: "p95", n: 1 }, { h: "p99", n: 1 }, { h: "max", n: 1 }];
  function statCells(s) {
    var l = s.latency_us || {};
    return [
      '<span data-field="requests">' + int(s.requests) + '</span>',
      '<span data-field="failed">' + int(s.failed) + '</span>',
      pct(s.failed, s.requests), (s.rps || 0).toFixed(1),
      '<span data-field="p50">' + ms(l.p50) + '</span>', ms(l.p95),
      '<span data-field="p99">' + ms(l.p99) + '</span>', ms(l.max)];
  }
  function labelChips(labels) {
    return Object.keys(labels || {}).map(function (k) { return '<span class="lbl">' + esc(k + "=" + labels[k]) + '</span>'; }).join("");
  }

  function kpis(s, extra) {
    var l = s.latency_us || {};
    var items = [["requests", int(s.requests), s.requests], ["throughput", (s.rps || 0).toFixed(1) + " rps", s.rps],
      ["failed", int(s.failed) + " (" + pct(s.failed, s.requests) + ")", s.failed, s.failed > 0],
      ["p50", ms(l.p50), l.p50], ["p95", ms(l.p95), l.p95], ["p99", ms(l.p99), l.p99], ["max", ms(l.max), l.max],
      ["iterations", int(s.iterations), s.iterations], ["dropped", int(s.dropped_iterations), s.dropped_iterations, s.dropped_iterations > 0],
      ["received", bytes(s.bytes_received), s.bytes_received]].concat(extra || []);
    return '<div class="kpis">' + items.map(function (it) {
      return '<div class="kpi' + (it[3] ? " bad" : "") + '" id="kpi-' + it[0] + '" data-value="' + esc(it[2]) + '"><div class="v">' + esc(it[1]) + '</div><div class="k">' + esc(it[0]) + "</div></div>";
    }).join("") + "</div>";
  }

  // Metrics of step kinds other than HTTP (stats.metrics: ws_msg_rtt, ...), one row per
  // metric and scope: durations with percentiles, counters with their count and rate.
  function namedTable(scopes) {
    var rows = [];
    Object.keys(scopes).sort().forEach(function (scope) {
      var m = (scopes[scope] || {}).metrics || {};
      Object.keys(m).sort().forEach(function (name) {
        var v = m[name], d = v.p50 !== undefined;
        rows.push({ attrs: ' data-metric="' + esc(name) + '" data-scope="' + esc(scope) + '"', cells: ["<code>" + esc(name) + "</code>", esc(scope),
          '<span data-field="count">' + int(v.count) + "</span>", d ? "" : (v.rate || 0).toFixed(1) + " /s",
          d ? ms(v.p50) : "", d ? ms(v.p95) : "", d ? '<span data-field="p99">' + ms(v.p99) + "</span>" : "", d ? ms(v.max) : ""] });
      });
    });
    if (!rows.length) return "";
    return table([{ h: "metric" }, { h: "scope" }, { h: "count", n: 1 }, { h: "rate", n: 1 }, { h: "p50", n: 1 }, { h: "p95", n: 1 },
      { h: "p99", n: 1 }, { h: "max", n: 1 }], rows, ' class="named"');
  }

  // Events as chart markers: [t, kind].
  function marks(events) { return (events || []).map(function (x) { return [x.t || 0, x.kind]; }); }
  function pts(tl, f) { return (tl || []).map(function (p) { return [p.t, f(p)]; }); }
  // A count of a point as a rate per second: a point of a long run spans `width_s`
  // seconds (its percentiles are its bucket's, its counts the bucket's sums).
  function perSec(p, v) { return (v || 0) / (p.width_s || 1); }
  // The live view's coarse history of a run, then its last seconds at full resolution.
  function join(history, recent) {
    history = history || []; recent = recent || [];
    if (!recent.length) return history.slice();
    var from = recent[0].t;
    return history.filter(function (p) { return p.t + (p.width_s || 1) <= from; }).concat(recent);
  }
  // The resolution note under a chart section when some points span more than 1 s.
  function resolution(tl) {
    var w = {};
    (tl || []).forEach(function (p) { w[p.width_s || 1] = 1; });
    var ws = Object.keys(w).map(Number).sort(function (a, b) { return b - a; });
    if (ws.length < 2 && ws[0] !== undefined && ws[0] <= 1) return "";
    return '<p class="note" id="resolution">A long run: older points are buckets of ' + ws.map(function (x) { return timeLabel(x, x); }).join(", ") +
      " (oldest first), the newest at 1 s; a bucket's percentiles come from its merged histogram and its counts are shown per second.</p>";
  }

  // The four golden signals over time for the merged timeline.
  function mergedCharts(tl, evs, pre) {
    var classes = {};
    tl.forEach(function (p) { Object.keys(p.errors_by_class || {}).forEach(function (c) { classes[c] = 1; }); });
    var errSeries = [{ name: "all errors", color: "#c0262d", points: pts(tl, function (p) { return perSec(p, p.errors); }) }];
    Object.keys(classes).sort().forEach(function (c, i) {
      errSeries.push({ name: c, color: PALETTE[(i + 1) % PALETTE.length], dash: 1, points: pts(tl, function (p) { return perSec(p, (p.errors_by_class || {})[c]); }) });
    });
    return '<div class="charts">' +
      chart({ id: pre + "latency", title: "Latency percentiles (merged histograms)", unit: "us", events: evs }, [
        { name: "p50", color: PALETTE[0], points: pts(tl, function (p) { return p.p50_us; }) },
        { name: "p90", color: PALETTE[1], points: pts(tl, function (p) { return p.p90_us; }) },
        { name: "p99", color: PALETTE[3], points: pts(tl, function (p) { return p.p99_us; }) }]) +
      chart({ id: pre + "rps", title: "Throughput (requests per second)", events: evs }, [
        { name: "rps", color: PALETTE[0], points: pts(tl, function (p) { return p.rps; }) }]) +
      chart({ id: pre + "errors", title: "Errors per second by class", events: evs }, errSeries) +
      chart({ id: pre + "vus", title: "Active VUs and dropped iterations", events: evs }, [
        { name: "VUs", color: PALETTE[2], points: pts(tl, function (p) { return p.vus; }) },
        { name: "dropped iterations/s", color: PALETTE[1], points: pts(tl, function (p) { return perSec(p, p.dropped_iterations); }) }]) +
      chart({ id: pre + "lag", title: "Schedule lag p99 (generator saturation above 10 ms)", unit: "us", events: evs }, [
        { name: "schedule lag p99", color: PALETTE[4], points: pts(tl, function (p) { return p.schedule_lag_p99_us; }) },
        { name: "10 ms", color: "#c0262d", dash: 1, points: tl.length ? [[tl[0].t, LAG_SATURATED_US], [tl[tl.length - 1].t, LAG_SATURATED_US]] : [] }]) +
      chart({ id: pre + "bytes", title: "Received bytes per second", unit: "", events: evs }, [
        { name: "bytes/s", color: PALETTE[5], points: pts(tl, function (p) { return perSec(p, p.bytes_received); }) }]) +
      "</div>";
  }

  // One line per node, coloured by node (or by a label value when `colorOf` is given).
  function perNodeCharts(perNode, evs, pre, colorOf, suffix) {
    var names = Object.keys(perNode).sort();
    var col = colorOf || function (n, i) { return PALETTE[i % PALETTE.length]; };
    function lines(f) {
      return names.map(function (n, i) { return { name: n + (suffix ? suffix(n) : ""), color: col(n, i), points: pts(perNode[n], f) }; });
    }
    return '<div class="charts">' +
      chart({ id: pre + "p99", title: "p99 latency per node", unit: "us", events: evs }, lines(function (p) { return p.p99_us; })) +
      chart({ id: pre + "p50", title: "p50 latency per node", unit: "us", events: evs }, lines(function (p) { return p.p50_us; })) +
      chart({ id: pre + "rps", title: "Throughput per node (rps)", events: evs }, lines(function (p) { return p.rps; })) +
      chart({ id: pre + "errors", title: "Errors per second per node", events: evs }, lines(function (p) { return perSec(p, p.errors); })) +
      chart({ id: pre + "vus", title: "Active VUs per node", events: evs }, lines(function (p) { return p.vus; })) +
      chart({ id: pre + "lag", title: "Schedule lag p99 per node (generator saturation)", unit: "us", events: evs }, lines(function (p) { return p.schedule_lag_p99_us; })) +
      "</div>";
  }

  // Per label key: a table of exact merged stats per value, and charts of the summed
  // traffic and errors per value; latency is drawn per node coloured by value (node
  // percentiles cannot be merged from points).
  function labelSection(byLabel, nodes, perNode, evs, pre) {
    var keys = Object.keys(byLabel || {}).sort();
    if (!keys.length) return '<p class="note">No node labels (start nodes with <code>--label region=eu</code> to compare regions).</p>';
    return keys.map(function (k) {
      var vals = Object.keys(byLabel[k]).sort();
      var valueOf = {};
      nodes.forEach(function (n) { valueOf[n.name] = (n.labels || {})[k]; });
      var colorOfVal = function (v) { var i = vals.indexOf(v); return i < 0 ? "#999" : PALETTE[i % PALETTE.length]; };
      var sums = function (f) {
        return vals.map(function (v) {
          var acc = {};
          Object.keys(perNode).forEach(function (n) {
            if (valueOf[n] !== v) return;
            perNode[n].forEach(function (p) { acc[p.t] = (acc[p.t] || 0) + f(p); });
          });
          var ps = Object.keys(acc).map(Number).sort(function (a, b) { return a - b; }).map(function (t) { return [t, acc[t]]; });
          return { name: k + "=" + v, color: colorOfVal(v), points: ps };
        });
      };
      var rows = vals.map(function (v) {
        var members = nodes.filter(function (n) { return valueOf[n.name] === v; }).map(function (n) { return esc(n.name); }).join(", ");
        return { attrs: ' data-label="' + esc(k) + '" data-value="' + esc(v) + '"', cells: ['<span class="lbl">' + esc(k + "=" + v) + '</span>', members].concat(statCells(byLabel[k][v])) };
      });
      var latLines = Object.keys(perNode).sort().map(function (n) {
        return { name: n + " (" + k + "=" + (valueOf[n] || "?") + ")", color: colorOfVal(valueOf[n]), points: pts(perNode[n], function (p) { return p.p99_us; }) };
      });
      return "<h3>by " + esc(k) + "</h3>" +
        table([{ h: k }, { h: "nodes" }].concat(STAT_COLS), rows, ' class="by-label" data-label-key="' + esc(k) + '"') +
        '<div class="charts">' +
        chart({ id: pre + "label-" + k + "-rps", title: "Throughput by " + k + " (rps, summed over its nodes)", events: evs }, sums(function (p) { return p.rps; })) +
        chart({ id: pre + "label-" + k + "-errors", title: "Errors per second by " + k, events: evs }, sums(function (p) { return perSec(p, p.errors); })) +
        chart({ id: pre + "label-" + k + "-p99", title: "p99 latency per node, coloured by " + k, unit: "us", events: evs }, latLines) +
        "</div>";
    }).join("");
  }

  function nodeTable(nodes) {
    var sorted = nodes.slice().sort(function (a, b) { return a.name < b.name ? -1 : a.name > b.name ? 1 : 0; });
    return table([{ h: "node" }, { h: "labels" }, { h: "status" }].concat(STAT_COLS), sorted.map(function (n) {
      return { attrs: ' data-node="' + esc(n.name) + '"', cells: [esc(n.name), labelChips(n.labels), '<span class="state-' + esc(n.status) + '">' + esc(n.status) + '</span>'].concat(statCells(n.stats || {})) };
    }), ' class="nodes"');
  }

  function eventsTable(evs) {
    if (!evs || !evs.length) return '<p class="note">No events.</p>';
    return table([{ h: "t", n: 1 }, { h: "event" }, { h: "detail" }], evs.map(function (e) {
      var d = Object.keys(e).filter(function (k) { return k !== "t" && k !== "kind"; }).map(function (k) {
        var v = e[k]; return esc(k) + "=" + esc(typeof v === "string" ? v : JSON.stringify(v));
      }).join(" ");
      return { cells: [(e.t || 0).toFixed(1) + " s", "<b>" + esc(e.kind) + "</b>", d] };
    }), ' class="events"');
  }

  // Loud warnings: the generator (not the target) may be what the numbers describe.
  // `nodes` may carry `cpu` (fraction of the node's cores at its busiest second).
  function saturation(perNode, generator, nodes) {
    var out = [];
    ((generator && generator.warnings) || []).forEach(function (w) { out.push(w); });
    (nodes || []).forEach(function (n) {
      if (typeof n.cpu === "number" && n.cpu >= 0.9) out.push("node " + n.name + ": CPU at " + Math.round(n.cpu * 100) + " % of its cores");
    });
    Object.keys(perNode || {}).sort().forEach(function (n) {
      var bad = (perNode[n] || []).filter(function (p) { return p.schedule_lag_p99_us > LAG_SATURATED_US; });
      if (bad.length) {
        var worst = Math.max.apply(null, bad.map(function (p) { return p.schedule_lag_p99_us; }));
        var secs = bad.reduce(function (a, p) { return a + (p.width_s || 1); }, 0);
        out.push("node " + n + ": iterations started late (schedule lag p99 up to " + ms(worst) + ") in " + (secs === bad.length ? bad.length + " second(s)" : bad.length + " bucket(s) of " + secs + " s"));
      }
      var dropped = (perNode[n] || []).reduce(function (a, p) { return a + (p.dropped_iterations || 0); }, 0);
      if (dropped) out.push("node " + n + ": " + int(dropped) + " iteration(s) dropped (every VU busy)");
    });
    return out;
  }
  // `whole`: the run as a whole was saturated (not only some seconds of some nodes).
  function alarm(list, whole) {
    if (!list.length) return "";
    var head = whole ? "⚠ GENERATOR SATURATED — these numbers may describe the load generator, not the target." :
      "⚠ GENERATOR SATURATED at times — in the seconds below, the numbers may describe the load generator, not the target.";
    return '<div class="alarm" id="saturation">' + head + '<ul>' +
      list.map(function (w) { return "<li>" + esc(w) + "</li>"; }).join("") + "</ul></div>";
  }

  return { esc: esc, int: int, ms: ms, pct: pct, bytes: bytes, chart: chart, table: table, STAT_COLS: STAT_COLS, statCells: statCells,
    labelChips: labelChips, kpis: kpis, namedTable: namedTable, mergedCharts: mergedCharts, perNodeCharts: perNodeCharts, labelSection: labelSection,
    nodeTable: nodeTable, eventsTable: eventsTable, marks: marks, saturation: saturation, alarm: alarm, PALETTE: PALETTE,
    join: join, resolution: resolution };
})();
