// margin dashboard: draws the charts the server describes in data-chart, refreshes the overview,
// and a few form niceties. No inline scripts (the Content-Security-Policy forbids them).
(function () {
  "use strict";
  var PALETTE = ["#2563eb", "#f59e0b", "#10b981", "#ef4444", "#8b5cf6", "#06b6d4", "#ec4899", "#84cc16",
                 "#f97316", "#64748b"];
  var OTHER = "#cbd5e1";

  function money(v) {
    if (v === null || v === undefined) { return ""; }
    var a = Math.abs(v);
    var places = a >= 1 || a === 0 ? 2 : a >= 0.01 ? 4 : 6;
    return (v < 0 ? "-$" : "$") + a.toLocaleString("en-US", {minimumFractionDigits: places, maximumFractionDigits: places});
  }

  function moneyTick(v) {  // axis labels: no trailing zeros ($0.0035, not $0.003500)
    var a = Math.abs(v);
    var s = a.toLocaleString("en-US", {minimumFractionDigits: a >= 0.01 || a === 0 ? 2 : 0, maximumFractionDigits: 6});
    return (v < 0 ? "-$" : "$") + s;
  }

  function colorOf(d, i) {
    if (d.color === "limit") { return "#dc2626"; }
    if (d.color === "actual") { return "#0f172a"; }
    if (d.color === "forecast") { return "#2563eb"; }
    if (d.color === "threshold") { return "#d97706"; }
    if (typeof d.color === "number") { return PALETTE[d.color % PALETTE.length]; }
    if (d.label === "other") { return OTHER; }
    return PALETTE[i % PALETTE.length];
  }

  function points(spec) {
    var n = 0;
    spec.datasets.forEach(function (d) {
      if (d.flat) { return; }
      d.data.forEach(function (v) { if (v !== null && v !== 0) { n += 1; } });
    });
    return n;
  }

  function datasetsOf(spec) {
    var single = spec.datasets.length === 1 && spec.type !== "line";
    return spec.datasets.map(function (d, i) {
      var c = colorOf(d, i);
      var out = {label: d.label, data: d.data, borderColor: c, backgroundColor: c, borderWidth: spec.type === "bar" ? 0 : 2,
                 pointRadius: spec.type === "line" && !d.flat && d.points !== false ? 2 : 0, spanGaps: false,
                 tension: 0};
      if (single && spec.type === "bar") {
        out.backgroundColor = d.data.map(function (v, j) { return v < 0 ? "#ef4444" : PALETTE[j % PALETTE.length]; });
      }
      if (spec.type === "doughnut") {
        out.backgroundColor = d.data.map(function (v, j) { return PALETTE[j % PALETTE.length]; });
        out.borderColor = "#fff";
      }
      if (d.dashed) { out.borderDash = [6, 4]; }
      if (d.flat) { out.borderWidth = 1.5; }
      if ((d.flat || d.dashed) && spec.labels && spec.labels.length === 1) {  // one bucket: no line to draw
        out.pointRadius = 12; out.pointStyle = "line"; out.borderWidth = 2;
      }
      if (d.band === "low") { out.borderWidth = 0; out.pointRadius = 0; out.fill = false; }
      if (d.band === "high") { out.borderWidth = 0; out.pointRadius = 0; out.fill = "-1"; out.backgroundColor = "rgba(37, 99, 235, 0.15)"; }
      return out;
    });
  }

  function optionsOf(spec) {
    var fmt = spec.money ? money : function (v) { return v.toLocaleString("en-US"); };
    var o = {responsive: true, maintainAspectRatio: false, animation: false, normalized: true,
             interaction: {mode: spec.type === "doughnut" ? "nearest" : "index", intersect: false},
             plugins: {legend: {position: spec.type === "doughnut" ? "right" : "bottom",
                                display: spec.datasets.length > 1 || spec.type === "doughnut",
                                labels: {boxWidth: 12, filter: function (item, data) {
                                  return item.text !== "forecast low";
                                }}},
                       tooltip: {callbacks: {label: function (ctx) {
                         var v = ctx.parsed && typeof ctx.parsed === "object" ? (spec.horizontal ? ctx.parsed.x : ctx.parsed.y) : ctx.parsed;
                         if (v === null || v === undefined) { return null; }
                         return (ctx.dataset.label || "") + ": " + fmt(v);
                       }}}}};
    if (spec.type !== "doughnut") {
      var tick = spec.money ? moneyTick : fmt;
      var value = {beginAtZero: !spec.log, stacked: !!spec.stacked, ticks: {callback: function (v) { return tick(v); }},
                   grid: {color: "#eef2f7"}};
      if (spec.log) {
        value.type = "logarithmic";
        // Whole decades around every value (baselines included), so no point sits on an edge or
        // beyond it: a $3 human baseline and a $0.00008 agent run both stay in sight.
        var vals = [];
        spec.datasets.forEach(function (d) { d.data.forEach(function (v) { if (v > 0) { vals.push(v); } }); });
        if (vals.length) {
          value.min = Math.pow(10, Math.floor(Math.log10(Math.min.apply(null, vals)) - 1e-9));
          value.max = Math.pow(10, Math.ceil(Math.log10(Math.max.apply(null, vals)) + 1e-9));
        }
      }
      if (spec.ymax) { value.max = spec.ymax; }
      var cat = {stacked: !!spec.stacked, grid: {display: false}, ticks: {autoSkip: true, maxRotation: 0},
                 offset: spec.type === "bar" || (spec.labels || []).length === 1};  // one bucket: centred
      o.scales = spec.horizontal ? {x: value, y: cat} : {x: cat, y: value};
      if (spec.horizontal) { o.indexAxis = "y"; }
    }
    return o;
  }

  function draw(canvas, spec) {
    var old = window.Chart.getChart(canvas);
    if (old) { old.destroy(); }
    var n = points(spec);
    canvas.dataset.points = String(n);
    var empty = canvas.parentNode.querySelector(".empty");
    if (empty) { empty.classList.toggle("hidden", n > 0); }
    canvas.classList.toggle("hidden", n === 0);
    return new window.Chart(canvas, {type: spec.type, data: {labels: spec.labels, datasets: datasetsOf(spec)},
                                     options: optionsOf(spec)});
  }

  document.querySelectorAll("canvas[data-chart]").forEach(function (canvas) {
    draw(canvas, JSON.parse(canvas.dataset.chart));
  });

  // Live refresh of the overview: the same figures from /ui/api/overview every 10 s.
  var live = document.querySelector("[data-live]");
  if (live) {
    var tick = function () {
      fetch(live.dataset.live, {credentials: "same-origin", headers: {"Accept": "application/json"}})
        .then(function (r) { if (!r.ok) { throw new Error("HTTP " + r.status); } return r.json(); })
        .then(function (body) {
          Object.keys(body.fields).forEach(function (k) {
            document.querySelectorAll('[data-field="' + k + '"]').forEach(function (el) { el.textContent = body.fields[k]; });
          });
          body.levers.forEach(function (x) {
            var el = document.querySelector('[data-lever="' + x.lever + '"]');
            if (el) { el.textContent = x.saved; }
          });
          var spend = document.getElementById("chart-spend");
          if (spend) { draw(spend, body.charts.spend); }
          var levers = document.getElementById("chart-levers");
          if (levers) { draw(levers, body.charts.levers); }
          var when = live.querySelector("[data-updated]");
          if (when) { when.textContent = "updated " + body.updated.slice(11, 19) + " UTC"; }
          live.classList.remove("stale");
        })
        .catch(function () { live.classList.add("stale"); });
    };
    window.setInterval(tick, 10000);
    live.addEventListener("click", tick);
  }

  // Custom dates only when "Custom dates" is picked.
  document.querySelectorAll("[data-period]").forEach(function (sel) {
    var custom = sel.form.querySelector("[data-custom]");
    sel.addEventListener("change", function () { if (custom) { custom.classList.toggle("hidden", sel.value !== "custom"); } });
  });
  document.querySelectorAll("[data-autosubmit]").forEach(function (sel) {
    sel.addEventListener("change", function () { sel.form.submit(); });
  });
  document.querySelectorAll("form[data-confirm]").forEach(function (f) {
    f.addEventListener("submit", function (e) { if (!window.confirm(f.dataset.confirm)) { e.preventDefault(); } });
  });
})();
