// The gallery without reloads: a full-view lightbox (a <dialog>) with previous/next, the arrow keys
// and Escape, and favourites toggled through PATCH /api/v1/images/{id}. Every link and form also
// works without this script: the links open the image page, the heart posts its form.
(function () {
  "use strict";

  function onReady(callback) {
    if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", callback);
    else callback();
  }

  function setFavouriteState(item, favourite) {
    item.setAttribute("data-favourite", favourite ? "true" : "false");
    var button = item.querySelector("[data-favourite-button]");
    if (button) {
      button.classList.toggle("is-active", favourite);
      button.setAttribute("aria-pressed", favourite ? "true" : "false");
    }
    var field = item.querySelector('input[name="favourite"]');
    if (field) field.value = favourite ? "false" : "true"; // what the next press of the no-script form asks for
  }

  function sendFavourite(gallery, apiUrl, favourite) {
    return fetch(apiUrl, {
      method: "PATCH",
      credentials: "same-origin",
      headers: {
        "Content-Type": "application/json",
        Accept: "application/json",
        "X-CSRF-Token": gallery.getAttribute("data-csrf-token")
      },
      body: JSON.stringify({ favourite: favourite })
    }).then(function (response) {
      if (!response.ok) throw new Error("status " + response.status);
      return response.json();
    });
  }

  onReady(function () {
    var gallery = document.querySelector("[data-gallery]");
    if (!gallery) return;
    var items = Array.prototype.slice.call(gallery.querySelectorAll(".gallery__item"));
    items.forEach(function (item) {
      var button = item.querySelector("[data-favourite-button]");
      setFavouriteState(item, !!button && button.getAttribute("aria-pressed") === "true");
    });

    function toggleFavourite(item) {
      var next = item.getAttribute("data-favourite") !== "true";
      var form = item.querySelector("[data-favourite-form]");
      setFavouriteState(item, next); // optimistic; undone if the server says no
      syncLightbox();
      return sendFavourite(gallery, form.getAttribute("data-api-url"), next).catch(function () {
        setFavouriteState(item, !next);
        syncLightbox();
      });
    }

    gallery.querySelectorAll("[data-favourite-form]").forEach(function (form) {
      form.addEventListener("submit", function (event) {
        event.preventDefault();
        toggleFavourite(form.closest(".gallery__item"));
      });
    });

    // --- the lightbox ---------------------------------------------------------------------------
    var dialog = document.querySelector("[data-lightbox]");
    if (!dialog || typeof dialog.showModal !== "function") return; // old browsers keep the image pages
    var image = dialog.querySelector("[data-lightbox-image]");
    var caption = dialog.querySelector("[data-lightbox-caption]");
    var counter = dialog.querySelector("[data-lightbox-counter]");
    var download = dialog.querySelector("[data-lightbox-download]");
    var favourite = dialog.querySelector("[data-lightbox-favourite]");
    var links = Array.prototype.slice.call(gallery.querySelectorAll("[data-lightbox-item]"));
    var current = -1;

    function syncLightbox() {
      if (!favourite || current < 0) return; // no lightbox on this browser, or it is closed
      var item = links[current].closest(".gallery__item");
      var on = item.getAttribute("data-favourite") === "true";
      favourite.classList.toggle("is-active", on);
      favourite.setAttribute("aria-pressed", on ? "true" : "false");
    }

    function show(index) {
      if (!links.length) return;
      current = (index + links.length) % links.length;
      var link = links[current];
      image.src = link.getAttribute("data-full");
      image.alt = link.querySelector("img").alt;
      caption.textContent = link.getAttribute("data-caption");
      counter.textContent = current + 1 + " / " + links.length;
      download.href = link.getAttribute("data-download");
      syncLightbox();
      // Fetch the neighbours now so that "next" shows at once.
      [current + 1, current - 1].forEach(function (near) {
        var neighbour = links[(near + links.length) % links.length];
        new Image().src = neighbour.getAttribute("data-full");
      });
    }

    links.forEach(function (link, index) {
      link.addEventListener("click", function (event) {
        if (event.metaKey || event.ctrlKey || event.shiftKey || event.button !== 0) return; // new tab: the page
        event.preventDefault();
        show(index);
        dialog.showModal();
      });
    });
    dialog.querySelector("[data-lightbox-prev]").addEventListener("click", function () { show(current - 1); });
    dialog.querySelector("[data-lightbox-next]").addEventListener("click", function () { show(current + 1); });
    dialog.querySelector("[data-lightbox-close]").addEventListener("click", function () { dialog.close(); });
    favourite.addEventListener("click", function () {
      if (current >= 0) toggleFavourite(links[current].closest(".gallery__item"));
    });
    dialog.addEventListener("click", function (event) {
      if (event.target === dialog) dialog.close(); // a click on the backdrop
    });
    dialog.addEventListener("close", function () {
      if (current >= 0) links[current].focus();
      current = -1;
      image.removeAttribute("src");
    });
    dialog.addEventListener("keydown", function (event) {
      if (event.key === "ArrowRight") { event.preventDefault(); show(current + 1); }
      else if (event.key === "ArrowLeft") { event.preventDefault(); show(current - 1); }
      else if (event.key === "f" || event.key === "F") { favourite.click(); }
    });

    // Touch: swipe left or right to move through the pictures.
    var touchStartX = null;
    dialog.addEventListener("touchstart", function (event) { touchStartX = event.touches[0].clientX; }, { passive: true });
    dialog.addEventListener("touchend", function (event) {
      if (touchStartX === null) return;
      var dx = event.changedTouches[0].clientX - touchStartX;
      touchStartX = null;
      if (Math.abs(dx) > 50) show(dx < 0 ? current + 1 : current - 1);
    });
  });
})();
