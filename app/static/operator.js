// The operator console updates itself: every few seconds, while the tab is visible and nobody is
// typing in one of its forms, it fetches the same page and swaps in the fresh [data-console-live] part.
(function () {
  "use strict";

  var live = document.querySelector("[data-console-live]");
  if (!live || !window.fetch || !window.DOMParser) return;
  var seconds = parseFloat(live.getAttribute("data-refresh-seconds")) || 5;

  function busy() {
    var active = document.activeElement;
    return active && live.contains(active) && /^(INPUT|SELECT|TEXTAREA)$/.test(active.tagName);
  }

  function refresh() {
    if (document.hidden || busy()) return;
    fetch(window.location.href, { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (response) { return response.ok ? response.text() : null; })
      .then(function (html) {
        if (!html || busy()) return;
        var fresh = new DOMParser().parseFromString(html, "text/html").querySelector("[data-console-live]");
        if (fresh) live.innerHTML = fresh.innerHTML;
      })
      .catch(function () { /* the next tick tries again */ });
  }

  window.setInterval(refresh, seconds * 1000);
})();
