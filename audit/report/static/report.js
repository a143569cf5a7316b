/* zoo-audit report: sortable tables and row filters (vanilla JS, no dependencies).
   <table class="sortable">: click a header to sort; cells may carry data-v (a number).
   <input type="search" data-filter="TABLE_ID">: keep rows containing every word typed.
   <input type="number" data-min="TABLE_ID" data-col="N">: keep rows whose column N >= value. */
(function () {
  "use strict";
  function cellValue(td) {
    if (!td) return "";
    var v = td.getAttribute("data-v");
    if (v !== null && v !== "" && !isNaN(+v)) return +v;
    return td.textContent.trim().toLowerCase();
  }
  function sortBy(table, col, th) {
    var body = table.tBodies[0]; if (!body) return;
    var asc = !th.classList.contains("asc");
    Array.prototype.forEach.call(th.parentNode.children, function (h) { h.classList.remove("asc", "desc"); });
    th.classList.add(asc ? "asc" : "desc");
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = cellValue(a.cells[col]), y = cellValue(b.cells[col]);
      if (typeof x === "number" && typeof y === "number") return asc ? x - y : y - x;
      x = String(x); y = String(y);
      return asc ? x.localeCompare(y) : y.localeCompare(x);
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  function applyFilters(table) {
    var words = [], mins = [];
    document.querySelectorAll('[data-filter="' + table.id + '"]').forEach(function (inp) {
      words = words.concat(inp.value.toLowerCase().split(/\s+/).filter(Boolean));
    });
    document.querySelectorAll('[data-min="' + table.id + '"]').forEach(function (inp) {
      if (inp.value !== "") mins.push([+inp.getAttribute("data-col"), +inp.value]);
    });
    var shown = 0, body = table.tBodies[0];
    Array.prototype.forEach.call(body.rows, function (r) {
      var text = r.textContent.toLowerCase();
      var ok = words.every(function (w) { return text.indexOf(w) >= 0; }) &&
               mins.every(function (m) { var v = cellValue(r.cells[m[0]]); return typeof v === "number" && v >= m[1]; });
      r.style.display = ok ? "" : "none"; if (ok) shown++;
    });
    var counter = document.querySelector('[data-count="' + table.id + '"]');
    if (counter) counter.textContent = shown + " of " + body.rows.length + " rows";
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("table.sortable").forEach(function (table) {
      var head = table.tHead && table.tHead.rows[0]; if (!head) return;
      Array.prototype.forEach.call(head.cells, function (th, i) {
        th.addEventListener("click", function () { sortBy(table, i, th); });
      });
    });
    document.querySelectorAll("[data-filter],[data-min]").forEach(function (inp) {
      var table = document.getElementById(inp.getAttribute("data-filter") || inp.getAttribute("data-min"));
      if (!table) return;
      inp.addEventListener("input", function () { applyFilters(table); });
      var q = new URLSearchParams(window.location.search).get("q");
      if (q && inp.hasAttribute("data-filter")) { inp.value = q; }
      applyFilters(table);
    });
  });
})();
