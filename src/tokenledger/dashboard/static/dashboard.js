// tokenledger dashboard: the little a page does by itself (no framework, no network
// beyond this server). <body data-refresh="N"> reloads the page every N seconds;
// <div data-fragment="/path"> is filled with that fragment once the page has loaded.
(function () {
  "use strict";
  var refresh = parseInt(document.body.getAttribute("data-refresh") || "0", 10);
  if (refresh > 0) {
    window.setTimeout(function () { window.location.reload(); }, refresh * 1000);
  }
  var fragments = document.querySelectorAll("[data-fragment]");
  Array.prototype.forEach.call(fragments, function (el) {
    fetch(el.getAttribute("data-fragment"), { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (html) { el.innerHTML = html; el.setAttribute("data-loaded", "1"); })
      .catch(function (status) {
        el.textContent = "could not load (" + status + ")";
        el.setAttribute("data-loaded", "error");
      });
  });
})();
