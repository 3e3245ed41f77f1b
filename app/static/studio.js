// Photo Studio: small behaviours every page shares. No inline scripts anywhere (the CSP forbids them),
// so pages opt in with data attributes:
//   data-nav-toggle            the top bar's menu button on phones
//   data-dismiss               closes the flash message it sits in
//   data-copy="#selector"      copies that input's value to the clipboard
//   data-confirm="question"    on a <form>: asks before submitting
//   data-submit-once           on a <form>: disables its submit buttons after the first submit
//   <time datetime=ISO data-when="date|datetime">  shown in the browser's time zone (StudioDates)
(function () {
  "use strict";

  // Dates as app/templating.py writes them: "1 Dec 2026" and "1 Dec 2026, 14:11 UTC+1", in the
  // browser's time zone. The zone goes into a cookie so the server writes the next page in it too.
  var MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
  var TZ_COOKIE = "studio_tz";

  function browserZone() {
    try {
      return Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
    } catch (error) {
      return "UTC";
    }
  }

  function localParts(date, zone) {
    var parts = {};
    new Intl.DateTimeFormat("en-US", {
      timeZone: zone, year: "numeric", month: "numeric", day: "numeric",
      hour: "numeric", minute: "numeric", second: "numeric", hourCycle: "h23"
    }).formatToParts(date).forEach(function (part) { parts[part.type] = parseInt(part.value, 10); });
    return parts;
  }

  function offsetLabel(minutes) {
    if (minutes === 0) return "UTC";
    var sign = minutes > 0 ? "+" : "-";
    var hours = Math.floor(Math.abs(minutes) / 60);
    var rest = Math.abs(minutes) % 60;
    return "UTC" + sign + hours + (rest ? ":" + (rest < 10 ? "0" : "") + rest : "");
  }

  function formatWhen(iso, kind, zone) {
    var date = new Date(iso);
    if (isNaN(date.getTime())) return "";
    zone = zone || browserZone();
    var parts;
    try {
      parts = localParts(date, zone);
    } catch (error) {
      zone = "UTC";
      parts = localParts(date, zone);
    }
    var day = parts.day + " " + MONTHS[parts.month - 1] + " " + parts.year;
    if (kind === "date") return day;
    var wall = Date.UTC(parts.year, parts.month - 1, parts.day, parts.hour % 24, parts.minute, parts.second);
    var offset = Math.round((wall - Math.floor(date.getTime() / 1000) * 1000) / 60000);
    var pad = function (n) { return (n < 10 ? "0" : "") + n; };
    return day + ", " + pad(parts.hour % 24) + ":" + pad(parts.minute) + " " + offsetLabel(offset);
  }

  function rememberZone() {
    var zone = browserZone();
    var current = document.cookie.split("; ").filter(function (item) { return item.indexOf(TZ_COOKIE + "=") === 0; })[0];
    if (current !== TZ_COOKIE + "=" + zone) {
      document.cookie = TZ_COOKIE + "=" + zone + "; path=/; max-age=31536000; SameSite=Lax";
    }
  }

  function localizeTimes(root) {
    (root || document).querySelectorAll("time[data-when]").forEach(function (element) {
      var text = formatWhen(element.getAttribute("datetime"), element.getAttribute("data-when"));
      if (text && element.textContent !== text) element.textContent = text;
    });
  }

  window.StudioDates = { format: formatWhen, localize: localizeTimes, zone: browserZone };

  function onReady(callback) {
    if (document.readyState === "loading") {
      document.addEventListener("DOMContentLoaded", callback);
    } else {
      callback();
    }
  }

  onReady(function () {
    rememberZone();
    localizeTimes(document);

    var toggle = document.querySelector("[data-nav-toggle]");
    if (toggle) {
      var nav = document.getElementById(toggle.getAttribute("aria-controls"));
      toggle.addEventListener("click", function () {
        var open = nav.classList.toggle("is-open");
        toggle.setAttribute("aria-expanded", open ? "true" : "false");
      });
    }

    // Close an open account menu when clicking elsewhere or pressing Escape.
    document.addEventListener("click", function (event) {
      document.querySelectorAll("details.menu[open]").forEach(function (menu) {
        if (!menu.contains(event.target)) menu.removeAttribute("open");
      });
    });
    document.addEventListener("keydown", function (event) {
      if (event.key !== "Escape") return;
      document.querySelectorAll("details.menu[open]").forEach(function (menu) { menu.removeAttribute("open"); });
    });

    document.querySelectorAll("[data-dismiss]").forEach(function (button) {
      button.addEventListener("click", function () {
        var box = button.closest(".flash, .alert");
        if (box) box.remove();
      });
    });

    document.querySelectorAll("[data-copy]").forEach(function (button) {
      button.addEventListener("click", function () {
        var field = document.querySelector(button.getAttribute("data-copy"));
        if (!field) return;
        var done = function () {
          var label = button.textContent;
          button.textContent = "Copied";
          setTimeout(function () { button.textContent = label; }, 1600);
        };
        if (navigator.clipboard && window.isSecureContext) {
          navigator.clipboard.writeText(field.value).then(done);
        } else {
          field.select();
          document.execCommand("copy");
          done();
        }
      });
    });

    document.querySelectorAll("form[data-confirm]").forEach(function (form) {
      form.addEventListener("submit", function (event) {
        if (!window.confirm(form.getAttribute("data-confirm"))) event.preventDefault();
      });
    });

    document.querySelectorAll("form[data-submit-once]").forEach(function (form) {
      form.addEventListener("submit", function (event) {
        if (event.defaultPrevented) return;
        form.querySelectorAll("button[type=submit], input[type=submit]").forEach(function (button) {
          button.disabled = true;
        });
      });
    });
  });
})();
