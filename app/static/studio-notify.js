// "Tell me when it's ready": a browser notification when the job this studio page follows ends,
// while the page is open (in a background tab too). The person turns it on with the button, which
// asks the browser's permission; studio-progress.js announces the end with "studio:job-finished".
(function () {
  "use strict";

  var MESSAGES = {
    done: function (name) { return name + "'s pictures are ready"; },
    failed: function (name) { return name + "'s studio stopped: it needs a look"; },
    cancelled: function (name) { return name + "'s job was cancelled"; }
  };

  function onReady(callback) {
    if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", callback);
    else callback();
  }

  onReady(function () {
    var box = document.querySelector("[data-notify]");
    var progress = document.querySelector("[data-job-progress]");
    if (!box || !progress || !("Notification" in window)) return;
    if (progress.getAttribute("data-finished") === "true") return;
    var button = box.querySelector("[data-notify-button]");
    var state = box.querySelector("[data-notify-state]");
    var name = box.getAttribute("data-subject-name") || "Your studio";
    var wanted = Notification.permission === "granted";

    function show() {
      box.hidden = false;
      button.hidden = wanted || Notification.permission === "denied";
      state.textContent = wanted ? "We will tell you here when it is ready, even in another tab."
        : Notification.permission === "denied" ? "Notifications are blocked for this site in your browser." : "";
    }

    button.addEventListener("click", function () {
      Notification.requestPermission().then(function (permission) {
        wanted = permission === "granted";
        show();
      });
    });

    progress.addEventListener("studio:job-finished", function (event) {
      box.hidden = true;
      if (!wanted || Notification.permission !== "granted") return;
      var status = event.detail || {};
      var title = (MESSAGES[status.status] || MESSAGES.done)(name);
      var note = new Notification(title, { body: status.stage_label || "", tag: "studio-" + progress.getAttribute("data-status-url") });
      note.onclick = function () { window.focus(); note.close(); };
    });
    show();
  });
})();
