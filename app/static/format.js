/* Words for a duration, shared by the studio page's progress and the new-studio form's estimate,
   the same as the server writes them (app/jobs/service.py). */
(function () {
  "use strict";

  function duration(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds) || seconds < 0) return "";
    if (seconds < 60) return "under a minute";
    var minutes = Math.round(seconds / 60);
    if (minutes < 60) return "about " + minutes + " min";
    var hours = Math.floor(minutes / 60);
    minutes = minutes % 60;
    return minutes ? "about " + hours + " h " + minutes + " min" : "about " + hours + " h";
  }

  window.StudioFormat = { duration: duration };
})();
