// The "new studio" form: kind tiles that reveal their extra field, style packs filtered by kind,
// a photo drop zone with previews, removal and early checks, and an upload with a progress bar that
// shows every problem next to its field or photo. The server decides: these checks only save a
// wasted upload. Without this script the form still posts to /studios and comes back with errors.
(function () {
  "use strict";

  var ALLOWED_TYPES = ["image/jpeg", "image/png", "image/webp", "image/heic", "image/heif"];
  var ALLOWED_EXTENSIONS = /\.(jpe?g|png|webp|heic|heif)$/i;

  function onReady(callback) {
    if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", callback);
    else callback();
  }

  function element(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function megabytes(bytes) {
    var value = bytes / (1024 * 1024);
    return (value < 10 ? value.toFixed(1) : Math.round(value)) + " MB";
  }

  onReady(function () {
    var form = document.querySelector("form[data-new-studio]");
    if (!form) return;

    var minPhotos = parseInt(form.getAttribute("data-min-photos"), 10);
    var maxPhotos = parseInt(form.getAttribute("data-max-photos"), 10);
    var maxBytes = parseInt(form.getAttribute("data-max-photo-bytes"), 10);
    var maxSize = form.getAttribute("data-max-photo-size");
    var input = form.querySelector("input[type=file][name=photos]");
    var dropzone = form.querySelector("[data-dropzone]");
    var thumbs = form.querySelector("[data-thumbs]");
    var countLabel = form.querySelector("[data-photo-count]");
    var packSelect = form.querySelector("[data-style-pack]");
    var nameInput = form.querySelector("[data-subject-name]");
    var errorsBox = document.querySelector("[data-form-errors]");
    var submitButton = form.querySelector("[data-submit]");
    var progressBox = form.querySelector("[data-upload-progress]");
    var progressBar = form.querySelector("[data-upload-bar]");
    var progressLabel = form.querySelector("[data-upload-label]");
    var progressPercent = form.querySelector("[data-upload-percent]");

    // ---- kind, class noun, style pack ------------------------------------------------------------
    function currentKind() {
      var checked = form.querySelector("input[name=kind]:checked");
      return checked ? checked.value : "";
    }

    function packKind(kind) {
      return kind === "person" ? "person" : "pet";
    }

    function updateKind() {
      var kind = currentKind();
      form.querySelectorAll("[data-kind-only]").forEach(function (section) {
        section.hidden = section.getAttribute("data-kind-only") !== kind;
      });
      var wanted = packKind(kind);
      var selected = packSelect.options[packSelect.selectedIndex];
      packSelect.querySelectorAll("option[data-pack-kind]").forEach(function (option) {
        var fits = !kind || option.getAttribute("data-pack-kind") === wanted;
        option.hidden = !fits;
        option.disabled = !fits;
      });
      if (selected && selected.disabled) packSelect.value = "";
      updatePackPrompts();
      updateSubjectWords();
    }

    function updatePackPrompts() {
      var kind = currentKind();
      var chosen = packSelect.value;
      if (!chosen && kind) chosen = packSelect.getAttribute("data-default-" + packKind(kind));
      form.querySelectorAll("[data-pack-prompts]").forEach(function (details) {
        details.hidden = details.getAttribute("data-pack-prompts") !== chosen;
      });
    }

    function updateSubjectWords() {
      var name = nameInput.value.trim();
      var kind = currentKind();
      var noun = { dog: "dog", cat: "cat", person: "person", animal: "animal" }[kind];
      var words = name || (noun ? "your " + noun : "your subject");
      form.querySelectorAll("[data-prompt-subject]").forEach(function (span) { span.textContent = words; });
    }

    form.querySelectorAll("input[name=kind]").forEach(function (radio) {
      radio.addEventListener("change", updateKind);
    });
    packSelect.addEventListener("change", updatePackPrompts);
    nameInput.addEventListener("input", updateSubjectWords);
    updateKind();

    // ---- photos ----------------------------------------------------------------------------------
    var chosen = []; // {file, url, problem}

    function fileKey(file) {
      return file.name + "|" + file.size + "|" + file.lastModified;
    }

    function localProblem(file, index) {
      var typeOk = ALLOWED_TYPES.indexOf((file.type || "").toLowerCase()) !== -1 || ALLOWED_EXTENSIONS.test(file.name);
      if (!typeOk) return "not a photo we can read; use JPEG, PNG, WebP or HEIC";
      if (file.size > maxBytes) return megabytes(file.size) + " is over the " + maxSize + " limit";
      if (file.size === 0) return "empty (0 bytes)";
      if (index >= maxPhotos) return "over the limit of " + maxPhotos + " photos";
      return null;
    }

    function syncInput() {
      // Keeps the input's files equal to the list, so a plain submit sends exactly what is shown.
      try {
        var transfer = new DataTransfer();
        chosen.forEach(function (entry) { transfer.items.add(entry.file); });
        input.files = transfer.files;
      } catch (error) {
        /* very old browsers: the upload below sends the list itself */
      }
    }

    function addFiles(files) {
      var known = {};
      chosen.forEach(function (entry) { known[fileKey(entry.file)] = true; });
      Array.prototype.forEach.call(files, function (file) {
        if (known[fileKey(file)]) return;
        known[fileKey(file)] = true;
        chosen.push({ file: file, url: URL.createObjectURL(file), problem: null });
      });
      recheck();
    }

    function removeAt(index) {
      URL.revokeObjectURL(chosen[index].url);
      chosen.splice(index, 1);
      recheck();
    }

    function recheck() {
      chosen.forEach(function (entry, index) { entry.problem = localProblem(entry.file, index); });
      syncInput();
      renderThumbs();
    }

    function renderThumbs() {
      thumbs.textContent = "";
      chosen.forEach(function (entry, index) {
        var item = element("li", "thumb" + (entry.problem ? " thumb--problem" : ""));
        var image = element("img");
        image.alt = entry.file.name;
        image.src = entry.url;
        image.addEventListener("error", function () {
          // HEIC and friends: most browsers cannot preview them; the server can still read them.
          item.replaceChild(element("span", "thumb__placeholder", entry.file.name), image);
        });
        item.appendChild(image);
        item.appendChild(element("span", "thumb__name", entry.file.name));
        if (entry.problem) item.appendChild(element("span", "thumb__note", entry.problem));
        var remove = element("button", "thumb__remove", "×");
        remove.type = "button";
        remove.setAttribute("aria-label", "Remove " + entry.file.name);
        remove.addEventListener("click", function () { removeAt(index); });
        item.appendChild(remove);
        thumbs.appendChild(item);
      });
      thumbs.hidden = chosen.length === 0;
      var problems = chosen.filter(function (entry) { return entry.problem; }).length;
      var text;
      if (!chosen.length) text = "No photos chosen yet";
      else text = chosen.length + " of " + maxPhotos + " photos chosen";
      if (chosen.length && chosen.length < minPhotos) text += " · add at least " + (minPhotos - chosen.length) + " more";
      if (problems) text += " · " + problems + (problems === 1 ? " needs" : " need") + " replacing";
      countLabel.textContent = text;
    }

    input.addEventListener("change", function () {
      addFiles(input.files);
    });
    ["dragenter", "dragover"].forEach(function (name) {
      dropzone.addEventListener(name, function (event) {
        event.preventDefault();
        dropzone.classList.add("is-dragover");
      });
    });
    ["dragleave", "drop"].forEach(function (name) {
      dropzone.addEventListener(name, function () { dropzone.classList.remove("is-dragover"); });
    });
    dropzone.addEventListener("drop", function (event) {
      event.preventDefault();
      if (event.dataTransfer && event.dataTransfer.files) addFiles(event.dataTransfer.files);
    });

    // ---- problems --------------------------------------------------------------------------------
    function clearErrors() {
      errorsBox.textContent = "";
      form.querySelectorAll("[data-client-error]").forEach(function (node) { node.remove(); });
      form.querySelectorAll(".field--invalid").forEach(function (node) { node.classList.remove("field--invalid"); });
      var stale = form.querySelector("[data-server-file-problems]");
      if (stale) stale.remove();
    }

    function showSummary(title, sentences) {
      var box = element("div", "alert alert--error");
      box.setAttribute("role", "alert");
      box.appendChild(element("strong", "", title));
      if (sentences.length) {
        var list = element("ul");
        sentences.forEach(function (sentence) { list.appendChild(element("li", "", sentence)); });
        box.appendChild(list);
      }
      errorsBox.appendChild(box);
      errorsBox.scrollIntoView({ behavior: "smooth", block: "start" });
    }

    function fieldContainer(name) {
      var kind = currentKind();
      var selectors = {
        name: "#name",
        kind: "input[name=kind]",
        class_noun: kind === "person" ? "input[name=class_noun_person]" : "#class_noun_animal",
        style_pack: "#style_pack",
        prompts: "#prompts",
        images_per_prompt: "#images_per_prompt",
        quality: "input[name=quality]",
        base_model: "input[name=base_model]",
        consent: "input[name=consent]",
        photos: "#photos"
      };
      var target = selectors[name] ? form.querySelector(selectors[name]) : null;
      return target ? target.closest(".field, .fieldset") : null;
    }

    function showProblems(body) {
      var fields = body.fields || {};
      var files = body.files || [];
      var sentences = [];
      Object.keys(fields).forEach(function (name) {
        sentences.push(fields[name]);
        var container = fieldContainer(name);
        if (!container) return;
        container.classList.add("field--invalid");
        var note = element("p", "field__error", fields[name]);
        note.setAttribute("data-client-error", "");
        container.appendChild(note);
      });
      files.forEach(function (problem) {
        sentences.push(problem.name + ": " + problem.reason);
        chosen.forEach(function (entry) {
          if (entry.file.name === problem.name) entry.problem = problem.reason;
        });
      });
      renderThumbs();
      showSummary(body.detail || "Please check the form.", sentences);
    }

    // ---- upload ----------------------------------------------------------------------------------
    function setBusy(busy) {
      submitButton.disabled = busy;
      progressBox.hidden = !busy;
    }

    function classNoun() {
      var kind = currentKind();
      if (kind === "animal") return form.querySelector("#class_noun_animal").value;
      if (kind === "person") {
        var picked = form.querySelector("input[name=class_noun_person]:checked");
        return picked ? picked.value : "person";
      }
      return "";
    }

    form.addEventListener("submit", function (event) {
      event.preventDefault();
      clearErrors();
      var local = chosen.filter(function (entry) { return entry.problem; });
      if (local.length) {
        showSummary("Remove or replace the photos marked in red first.", local.map(function (entry) {
          return entry.file.name + ": " + entry.problem;
        }));
        return;
      }
      if (chosen.length < minPhotos) {
        showSummary("Add at least " + minPhotos + " photos.", []);
        return;
      }

      var data = new FormData(form);
      data.delete("photos");
      chosen.forEach(function (entry) { data.append("photos", entry.file, entry.file.name); });
      data.set("class_noun", classNoun());

      var request = new XMLHttpRequest();
      request.open("POST", form.getAttribute("data-api-url"));
      request.setRequestHeader("Accept", "application/json");
      request.setRequestHeader("X-CSRF-Token", form.querySelector("input[name=csrf_token]").value);
      request.responseType = "json";
      request.upload.addEventListener("progress", function (progress) {
        if (!progress.lengthComputable) return;
        var fraction = progress.loaded / progress.total;
        progressBar.value = fraction;
        progressPercent.textContent = Math.round(fraction * 100) + "%";
        if (fraction >= 1) {
          progressBar.removeAttribute("value"); // indeterminate while the server checks the photos
          progressLabel.textContent = "Checking your photos…";
          progressPercent.textContent = "";
        }
      });
      request.addEventListener("load", function () {
        var body = request.response || {};
        if (request.status === 201 && body.subject) {
          progressLabel.textContent = "Done. Opening your studio…";
          window.location.assign(body.subject.page_url);
          return;
        }
        setBusy(false);
        if (request.status === 401) {
          window.location.assign("/login?next=" + encodeURIComponent("/studios/new"));
        } else if (request.status === 422 || (request.status === 413 && (body.fields || body.files))) {
          showProblems(body);
        } else {
          var detail = typeof body.detail === "string" ? body.detail : "Something went wrong. Please try again.";
          showSummary(detail, []);
        }
      });
      request.addEventListener("error", function () {
        setBusy(false);
        showSummary("The upload did not reach the studio. Check your connection and try again.", []);
      });
      progressBar.value = 0;
      progressLabel.textContent = "Uploading " + chosen.length + " photos…";
      progressPercent.textContent = "0%";
      setBusy(true);
      request.send(data);
    });
  });
})();
