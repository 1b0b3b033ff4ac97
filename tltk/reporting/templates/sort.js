// Sorts a table by the column whose header button is clicked; clicking again reverses the order.
// Numeric columns sort by each cell's exact value (data-value); cells without one go last.
document.querySelectorAll("table.sortable").forEach(function (table) {
  var headers = table.querySelectorAll("thead th");
  headers.forEach(function (header, column) {
    var button = header.querySelector("button");
    if (!button) { return; }
    button.addEventListener("click", function () {
      var ascending = header.getAttribute("aria-sort") !== "ascending";
      var numeric = header.classList.contains("num");
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[column], y = b.cells[column];
        if (numeric) {
          var u = x.hasAttribute("data-value") ? parseFloat(x.getAttribute("data-value")) : NaN;
          var v = y.hasAttribute("data-value") ? parseFloat(y.getAttribute("data-value")) : NaN;
          if (isNaN(u) || isNaN(v)) { return isNaN(u) - isNaN(v); }
          return ascending ? u - v : v - u;
        }
        var order = x.textContent.localeCompare(y.textContent);
        return ascending ? order : -order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
      headers.forEach(function (other) { other.removeAttribute("aria-sort"); });
      header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    });
  });
});
