// The Data Exchange window's only script. The page works without it; with it:
// - every <time datetime="..."> shows the viewer's local time with its zone;
// - while a sync or retry runs, only the sync part is redrawn every second (no full-page
//   refresh that would reset the keyboard focus); when the job ends the rest is redrawn once,
//   and the focused control, if it has an id, keeps the focus.
"use strict";
(function () {
  var FORMAT = new Intl.DateTimeFormat(undefined, {dateStyle: "medium", timeStyle: "long"});

  function localTimes(root) {
    root.querySelectorAll("time[datetime]").forEach(function (el) {
      var t = new Date(el.getAttribute("datetime"));
      if (isNaN(t.getTime())) return;
      if (!el.title) el.title = el.getAttribute("datetime");
      el.textContent = FORMAT.format(t);
    });
  }

  function swap(oldEl, newEl) {
    // replace oldEl by newEl; a focused element inside with an id is focused again in the new one
    var active = document.activeElement;
    var focusId = active && active.id && oldEl.contains(active) ? active.id : null;
    localTimes(newEl);
    oldEl.replaceWith(newEl);
    if (focusId) {
      var again = document.getElementById(focusId);
      if (again) again.focus();
    }
  }

  var failures = 0;

  function poll() {
    fetch(window.location.href, {credentials: "same-origin", headers: {"Accept": "text/html"}})
      .then(function (r) {
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.text();
      })
      .then(function (html) {
        failures = 0;
        var doc = new DOMParser().parseFromString(html, "text/html");
        var running = doc.body.dataset.running === "1";
        if (running) {
          var now = document.getElementById("sync"), next = doc.getElementById("sync");
          if (now && next) swap(now, next);
          window.setTimeout(poll, 1000);
          return;
        }
        // the job is over: redraw the page's content once (tables, cards, counts), keep the focus
        var main = document.querySelector("main"), newMain = doc.querySelector("main");
        if (main && newMain) swap(main, newMain);
        var head = document.querySelector("header.top"), newHead = doc.querySelector("header.top");
        if (head && newHead) swap(head, newHead);
        document.body.dataset.running = "0";
      })
      .catch(function () {
        failures += 1;  // the server restarting, or gone: try again, less and less often
        if (failures < 120) window.setTimeout(poll, Math.min(10000, 1000 * failures));
      });
  }

  document.addEventListener("DOMContentLoaded", function () {
    localTimes(document);
    if (document.body.dataset.running === "1") window.setTimeout(poll, 1000);
  });
})();
