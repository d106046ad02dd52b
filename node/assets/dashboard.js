// The live dashboard: renders /api/live (embedded at load, then polled every second).
"use strict";
(function () {
  var e = ST.esc;
  var state = { data: JSON.parse(document.getElementById("initial").textContent), updates: 0, error: "" };

  function members(rows) {
    return ST.table([{ h: "name" }, { h: "id" }, { h: "state" }, { h: "doing" }, { h: "labels" }, { h: "targets allowed" }, { h: "capacity", n: 1 }, { h: "last heard", n: 1 }],
      rows.map(function (r) {
        return { attrs: ' data-member="' + e(r.name) + '"', cells: ["<b>" + e(r.name) + "</b>" + (r["self"] ? ' <span class="note">(this node)</span>' : ""),
          "<code>" + e(String(r.id).slice(-8)) + "</code>", '<span class="state-' + e(r.state) + '">' + e(r.state) + "</span>", e(r.node_state || ""),
          ST.labelChips(r.labels), e((r.allow_targets || []).join(", ")), e(r.capacity === null || r.capacity === undefined ? "" : r.capacity),
          r["self"] ? "" : (r.last_heard_ms / 1000).toFixed(1) + " s"] };
      }), ' class="members"');
  }

  function run(r, current) {
    var evs = ST.marks(r.events);
    // The whole run: its coarse history, then its last minutes at 1 s.
    var recentTl = r.timeline || [];
    var tl = ST.join(r.history, recentTl);
    var last = recentTl.length ? recentTl[recentTl.length - 1] : null;
    var perNode = {};
    Object.keys(r.per_node || {}).concat(Object.keys(r.per_node_history || {})).forEach(function (n) {
      perNode[n] = ST.join((r.per_node_history || {})[n], (r.per_node || {})[n]);
    });
    var h = '<section class="run" id="run-' + e(r.run_id) + '" data-run="' + e(r.run_id) + '" data-phase="' + e(r.phase) + '"><h2>' + (current ? "Current run" : "Last run") +
      ": " + e(r.plan) + ' <span class="note">run <code>' + e(r.run_id) + "</code> · phase <b>" + e(r.phase) + "</b> · leader " + e(r.leader) +
      " · " + (r.members || []).length + " node(s)" + (last ? " · second " + last.t : "") + "</span></h2>";
    h += ST.alarm((r.saturation || []).slice(), false);
    var extra = last ? [["rps now", last.rps.toFixed(0), last.rps], ["p99 now", ST.ms(last.p99_us), last.p99_us], ["VUs now", ST.int(last.vus), last.vus]] : [];
    h += r.totals ? ST.kpis(r.totals, extra) : '<p class="note">No measurements yet.</p>';
    if (r.totals) h += ST.namedTable({ "all nodes": r.totals });
    h += "<h3>All nodes merged</h3>" + ST.mergedCharts(tl, evs, "live-merged-") + ST.resolution(tl);
    var names = (r.nodes || []).map(function (n) { return n.name; });
    (r.members || []).forEach(function (m) { if (names.indexOf(m.name) < 0) r.nodes.push({ name: m.name, labels: m.labels, status: m.status, stats: {} }); });
    (r.nodes || []).forEach(function (n) {
      var m = (r.members || []).filter(function (x) { return x.name === n.name; })[0];
      if (m) n.status = m.status;
    });
    h += "<h3>Per node</h3>" + ST.nodeTable(r.nodes || []) + ST.perNodeCharts(perNode, evs, "live-node-");
    h += "<h3>Per label</h3>" + ST.labelSection(r.by_label, r.nodes || [], perNode, evs, "live-");
    h += "<h3>Events</h3>" + ST.eventsTable(r.events);
    return h + "</section>";
  }

  function recent(list) {
    if (!list.length) return '<p class="note">No finished run started from this node yet.</p>';
    return ST.table([{ h: "run" }, { h: "plan" }, { h: "started" }, { h: "duration", n: 1 }, { h: "nodes", n: 1 }, { h: "requests", n: 1 }, { h: "failed", n: 1 },
      { h: "rps", n: 1 }, { h: "p99", n: 1 }, { h: "thresholds" }, { h: "" }], list.map(function (s) {
      return { attrs: ' data-run="' + e(s.run_id) + '"', cells: ['<a href="' + e(s.report) + '"><code>' + e(s.run_id) + "</code></a>", e(s.plan), e(s.started_at),
        (s.duration_s || 0).toFixed(1) + " s", e(s.nodes), ST.int(s.requests), ST.int(s.failed), (s.rps || 0).toFixed(1), ST.ms(s.p99_us),
        s.thresholds_passed ? '<span class="badge pass">pass</span>' : '<span class="badge fail">fail</span>',
        (s.saturated ? '<span class="badge fail">generator saturated</span> ' : "") + '<a href="' + e(s.report) + '">report</a> · <a href="' + e(s.summary) + '">json</a>'] };
    }), ' class="recent"');
  }

  function render() {
    var d = state.data;
    var runs = d.runs || [];
    var going = runs.filter(function (r) { return r.phase !== "done" && r.started_unix_ms > 0; });
    var shown = going.length ? going : runs.slice(0, 1);
    var h = '<header class="top"><h1>stampede · ' + e(d.node.name) + '</h1><span class="sub">node <code>' + e(String(d.node.id).slice(-8)) + "</code> · " +
      (d.members || []).filter(function (m) { return m.state === "alive"; }).length + " alive member(s) · updated " +
      new Date(d.now_unix_ms).toISOString().slice(11, 19) + " UTC</span>" +
      '<span class="sub verdict" id="status" data-updates="' + state.updates + '">' + (state.error ? "⚠ " + e(state.error) : going.length ? "● live" : "idle") + "</span></header><main>";
    h += shown.length ? shown.map(function (r) { return run(r, r.phase !== "done"); }).join("") :
      '<section><h2>No run yet</h2><p class="note">Start one with <code>stampede run --mesh PLAN</code>; it shows here live.</p></section>';
    h += '<section id="mesh"><h2>Mesh</h2>' + members(d.members || []) + "</section>";
    h += '<section id="recent"><h2>Recent runs</h2>' + recent(d.recent || []) + "</section>";
    h += '<p class="note">Data: <a href="/api/live">/api/live</a> (also as server-sent events on <code>/events</code>) · <a href="/metrics">/metrics</a> (Prometheus) · <a href="/health">/health</a></p></main>';
    document.getElementById("app").innerHTML = h;
  }

  function poll() {
    var x = new XMLHttpRequest();
    x.open("GET", "/api/live");
    x.timeout = 5000;
    x.onload = function () {
      if (x.status === 200) { take(x.responseText); } else { state.error = "node answered " + x.status; render(); }
    };
    x.onerror = x.ontimeout = function () { state.error = "node unreachable"; render(); };
    x.send();
  }
  function take(text) {
    try { state.data = JSON.parse(text); state.updates++; state.error = ""; } catch (err) { state.error = "bad update"; }
    render();
  }
  render();
  if (location.protocol === "file:") return;
  // Polling, not /events: a page holding a stream open never lets headless browsers
  // (and their virtual time) settle, and once a second on loopback costs nothing.
  setInterval(poll, 1000);
})();
