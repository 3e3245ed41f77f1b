// The new-studio form says how long the studio it describes will take, before it starts: the server
// gives, per offered model, the seconds of everything but the gallery for each kind and quality (from the
// recipe and the speeds measured on this studio's workers, app/jobs/estimates.py) and the seconds per
// gallery picture; this script adds the pictures the form asks for and updates the sentence as it changes.
(function () {
  "use strict";

  var PERSON_NOUNS = ["person", "man", "woman", "boy", "girl", "child"];

  var formatDuration = window.StudioFormat.duration;  // format.js

  function checked(form, name) {
    var input = form.querySelector('input[name="' + name + '"]:checked');
    return input ? input.value : "";
  }

  function classNoun(form, kind) {
    if (kind === "dog" || kind === "cat") return kind;
    if (kind === "person") return checked(form, "class_noun_person") || "person";
    var field = form.querySelector('input[name="class_noun_animal"]');
    return field ? field.value.trim().toLowerCase().split(/\s+/).join(" ") : "";
  }

  function update(form, data, output) {
    var model = data.models[checked(form, "base_model") || data.default_model];
    var kindChoice = checked(form, "kind");
    var quality = checked(form, "quality") || "balanced";
    if (!model || !kindChoice) {
      output.hidden = true;
      return;
    }
    var kind = kindChoice === "person" || PERSON_NOUNS.indexOf(kindChoice) >= 0 ? "person" : "pet";
    var ownPrompts = 0;
    var prompts = form.querySelector('textarea[name="prompts"]');
    if (prompts) ownPrompts = prompts.value.split("\n").filter(function (line) { return line.trim(); }).length;
    var packSelect = form.querySelector('select[name="style_pack"]');
    var pack = packSelect && packSelect.value ? packSelect.value : (ownPrompts ? "" : data.default_packs[kind]);
    var perPrompt = parseInt((form.querySelector('select[name="images_per_prompt"]') || {}).value, 10) || 1;
    var pictures = ((data.pack_sizes[pack] || 0) + ownPrompts) * perPrompt;
    var seconds = model.fixed[kind][quality] + pictures * model.per_image;
    if (model.warm_classes.indexOf(classNoun(form, kindChoice)) >= 0) seconds -= model.priors[kind][quality];
    var basis = model.measured_jobs
      ? "measured on this studio's workers over the last " + (model.measured_jobs === 1 ? "studio" : model.measured_jobs + " studios")
      : "a first estimate until a studio has finished here";
    output.textContent = "This studio (" + pictures + " pictures) will take " + formatDuration(seconds) +
      " once a worker starts it (" + basis + ").";
    output.hidden = false;
  }

  function start() {
    var output = document.querySelector("[data-time-estimate]");
    var source = document.querySelector("[data-time-estimates]");
    if (!output || !source) return;
    var form = output.closest("form");
    var data;
    try {
      data = JSON.parse(source.textContent || "{}");
    } catch (error) {
      return;
    }
    if (!form || !data.models) return;
    var refresh = function () { update(form, data, output); };
    form.addEventListener("change", refresh);
    form.addEventListener("input", refresh);
    refresh();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
