// The studio page follows its job without reloading: it polls GET /api/v1/jobs/{id} (the session
// cookie authenticates it) every 1.5 s while the tab is visible, updates the label, the bars, the
// stepper, the loss sparkline and the previews, and stops once the job has finished.
(function () {
  "use strict";

  var POLL_MS = 1500;
  var MAX_BACKOFF_MS = 30000;
  var STEP_CLASSES = { done: "is-done", active: "is-current", failed: "is-failed", cancelled: "is-cancelled", pending: "" };

  var formatDuration = window.StudioFormat.duration;  // format.js

  function setText(element, text) {
    if (element && element.textContent !== text) element.textContent = text;
  }

  function drawSparkline(svg, values) {
    if (!svg) return;
    var line = svg.querySelector("[data-sparkline-line]");
    if (!line || values.length < 2) {
      svg.hidden = true;
      return;
    }
    var min = Math.min.apply(null, values);
    var max = Math.max.apply(null, values);
    var span = max - min || 1;
    var box = svg.viewBox.baseVal;
    var points = values.map(function (value, index) {
      var x = (index / (values.length - 1)) * box.width;
      var y = box.height - 2 - ((value - min) / span) * (box.height - 4);
      return x.toFixed(1) + "," + y.toFixed(1);
    });
    line.setAttribute("points", points.join(" "));
    svg.hidden = false;
  }

  function updatePreviews(root, urls) {
    var box = root.querySelector("[data-previews]");
    var grid = root.querySelector("[data-preview-grid]");
    if (!box || !grid) return;
    var current = Array.prototype.map.call(grid.querySelectorAll("img"), function (img) {
      return img.getAttribute("src");
    });
    if (current.join("|") === urls.join("|")) return;
    grid.textContent = "";
    urls.forEach(function (url, index) {
      var img = document.createElement("img");
      img.src = url;
      img.alt = "Training preview " + (index + 1);
      img.width = 128;
      img.height = 128;
      grid.appendChild(img);
    });
    box.hidden = urls.length === 0;
  }

  function updateNotes(root, notes) {
    var list = root.querySelector("[data-notes]");
    if (!list) return;
    list.replaceChildren.apply(list, notes.map(function (note) {
      var item = document.createElement("li");
      item.textContent = note;
      return item;
    }));
    list.hidden = notes.length === 0;
  }

  function updateSteps(root, stages) {
    stages.forEach(function (stage) {
      var item = root.querySelector('[data-step="' + stage.key + '"]');
      if (!item) return;
      Object.keys(STEP_CLASSES).forEach(function (state) {
        if (STEP_CLASSES[state]) item.classList.toggle(STEP_CLASSES[state], state === stage.state);
      });
      setText(item.querySelector("[data-step-detail]"), stage.detail);
      var bar = item.querySelector("[data-step-bar]");
      if (bar) {
        bar.value = stage.fraction;
        bar.hidden = stage.state !== "active";
      }
    });
  }

  // The card's title for the job's kind and status (the template's job_title says the same).
  var TITLES = {
    train: { done: "Your studio is trained", failed: "Training stopped", cancelled: "Training cancelled", other: "Training your studio" },
    generate: { done: "Your new pictures are ready", failed: "Generating stopped", cancelled: "Generating cancelled", other: "Generating more pictures" }
  };

  // The time left as shown: it counts down between polls and moves a quarter of the way to each new figure
  // from the server, so one odd reading (a stage starting, a slow step) does not make it jump.
  var shownEta = null;
  var shownAt = 0;

  function smoothEta(target) {
    var now = Date.now();
    if (target === null || target === undefined || !isFinite(target)) {
      shownEta = null;
    } else if (shownEta === null) {
      shownEta = target;
    } else {
      var counted = Math.max(0, shownEta - (now - shownAt) / 1000);
      shownEta = counted + (target - counted) * 0.25;
    }
    shownAt = now;
    return shownEta;
  }

  // The gallery's picture count, asked once the job is done: "generate more" and the first
  // training change it, and the button should say so without a reload.
  function refreshCount(link) {
    var url = link.getAttribute("data-subject-url");
    if (!url) return;
    fetch(url, { credentials: "same-origin", cache: "no-store", headers: { Accept: "application/json" } })
      .then(function (response) { return response.ok ? response.json() : null; })
      .then(function (subject) {
        if (!subject || !subject.counts) return;
        var count = subject.counts.images;
        setText(link.querySelector("[data-gallery-count]"), count ? " (" + count + ")" : "");
      })
      .catch(function () { /* the count stays as it was */ });
  }

  function render(root, status) {
    root.setAttribute("data-status", status.status);
    var titles = TITLES[root.getAttribute("data-job-kind")] || TITLES.train;
    setText(root.querySelector("[data-job-title]"), titles[status.status] || titles.other);
    setText(root.querySelector("[data-stage-label]"), status.stage_label);
    var badge = root.querySelector("[data-status-badge]");
    if (badge) {
      badge.className = "badge badge--" + status.status;
      setText(badge, status.status);
    }
    var percent = Math.round(status.fraction * 100);
    var overall = root.querySelector("[data-overall]");
    if (overall) overall.value = status.fraction;
    setText(root.querySelector("[data-percent]"), percent + "% done");

    var eta = root.querySelector("[data-eta]");
    if (eta) {
      var left = status.finished ? "" : formatDuration(smoothEta(status.eta_seconds));
      eta.hidden = !left;
      setText(eta, left ? left + " left" : "");
    }
    updateSteps(root, status.stages);

    var lossFact = root.querySelector('[data-fact="loss"]');
    if (lossFact) {
      lossFact.hidden = status.loss === null;
      if (status.loss !== null) setText(lossFact.querySelector("[data-loss]"), status.loss.toFixed(4));
      drawSparkline(lossFact.querySelector("[data-sparkline]"), status.loss_history || []);
    }
    var attemptFact = root.querySelector('[data-fact="attempt"]');
    if (attemptFact) {
      attemptFact.hidden = status.attempts <= 1;
      setText(attemptFact.querySelector("[data-attempt]"), status.attempts + " of " + status.max_attempts);
    }
    var startedBox = root.querySelector("[data-started]");
    if (status.started_at && startedBox) {
      // A <time> as the server writes it, in the same words and zone (studio.js: StudioDates).
      var time = startedBox.querySelector("time") || document.createElement("time");
      time.setAttribute("datetime", status.started_at);
      time.setAttribute("data-when", "datetime");
      setText(time, window.StudioDates ? window.StudioDates.format(status.started_at, "datetime") : status.started_at);
      if (time.parentNode !== startedBox) startedBox.replaceChildren(time);
    }
    updatePreviews(root, status.preview_urls || []);
    updateNotes(root, status.notes || []);

    var cancelForm = root.querySelector("[data-cancel-form]");
    if (cancelForm) cancelForm.hidden = status.finished || status.cancel_requested;
    root.querySelectorAll("[data-outcome]").forEach(function (box) {
      box.hidden = box.getAttribute("data-outcome") !== status.status;
    });
    setText(root.querySelector("[data-failure-reason]"), status.failure_reason || "It stopped without a reason.");
    // The worker says which model it loaded once the job starts; the page may predate that.
    var demoNotice = document.querySelector("[data-demo-notice]");
    if (demoNotice && status.demo_model) demoNotice.hidden = false;
    if (status.status === "done") {
      var galleryLink = document.querySelector("[data-gallery-link]");
      if (galleryLink) {
        galleryLink.hidden = false;
        if (!root.hasAttribute("data-counted")) {
          root.setAttribute("data-counted", "");
          refreshCount(galleryLink);
        }
      }
    }
  }

  function start(root) {
    var url = root.getAttribute("data-status-url");
    var delay = POLL_MS;
    var timer = null;
    var stopped = root.getAttribute("data-finished") === "true";

    var history = root.querySelector("[data-loss-history]");
    if (history) {
      try {
        drawSparkline(root.querySelector("[data-sparkline]"), JSON.parse(history.textContent || "[]"));
      } catch (error) { /* a page without a history draws nothing */ }
    }
    if (stopped) return;

    function schedule() {
      clearTimeout(timer);
      if (!stopped && !document.hidden) timer = setTimeout(poll, delay);
    }

    function poll() {
      fetch(url, { credentials: "same-origin", cache: "no-store", headers: { Accept: "application/json" } })
        .then(function (response) {
          if (response.status === 401 || response.status === 404) {
            // Signed out, or the studio was deleted in another tab: nothing more to follow.
            stopped = true;
            return null;
          }
          if (!response.ok) throw new Error("status " + response.status);
          return response.json();
        })
        .then(function (status) {
          if (status) {
            delay = POLL_MS;
            render(root, status);
            if (status.finished) {
              stopped = true;
              // For whoever waits for the end on this page (studio-notify.js: the browser notification).
              root.dispatchEvent(new CustomEvent("studio:job-finished", { bubbles: true, detail: status }));
            }
          }
          schedule();
        })
        .catch(function () {
          // The server is restarting or the network dropped: wait longer each time, then carry on.
          delay = Math.min(delay * 2, MAX_BACKOFF_MS);
          schedule();
        });
    }

    // A hidden tab stops asking; coming back asks at once.
    document.addEventListener("visibilitychange", function () {
      if (!document.hidden && !stopped) {
        clearTimeout(timer);
        poll();
      }
    });
    schedule();
  }

  function onReady(callback) {
    if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", callback);
    else callback();
  }

  onReady(function () {
    var root = document.querySelector("[data-job-progress]");
    if (root) start(root);
  });
})();
