/* Flask-Offload dashboard: keep the page's <main> up to date by polling the same URL for its
   JSON ({"main": html}) every few seconds, only while the tab is visible; and ask before a
   destructive action. No inline script anywhere, so a strict Content-Security-Policy holds. */
(function () {
  "use strict";
  var EVERY_MS = 2000;
  var main = document.getElementById("main");
  var badge = document.getElementById("live-status");
  var timer = null;
  var busy = false;
  var last = null;

  document.addEventListener("submit", function (event) {
    var button = event.submitter || event.target.querySelector("button");
    if (button && button.classList.contains("danger") && !button.id) {
      if (!window.confirm(button.textContent.trim() + ": are you sure?")) {
        event.preventDefault();
      }
    }
  });

  if (!main || !main.hasAttribute("data-live")) {
    if (badge) { badge.hidden = true; }
    return;
  }

  function show(text, off) {
    if (badge) {
      badge.textContent = text;
      badge.className = off ? "live off" : "live";
    }
  }

  function poll() {
    if (document.hidden || busy) { return; }
    busy = true;
    fetch(window.location.pathname + window.location.search, {
      headers: { "X-Offload-Live": "1", "Accept": "application/json" },
      credentials: "same-origin",
      cache: "no-store"
    }).then(function (response) {
      if (!response.ok) { throw new Error("HTTP " + response.status); }
      return response.json();
    }).then(function (data) {
      if (data.main !== last) {
        var open = [];
        main.querySelectorAll("details[open][id]").forEach(function (d) { open.push(d.id); });
        main.innerHTML = data.main;
        open.forEach(function (id) {
          var again = document.getElementById(id);
          if (again) { again.open = true; }
        });
        last = data.main;
      }
      show("live", false);
    }).catch(function () {
      show("offline", true);
    }).finally(function () {
      busy = false;
    });
  }

  function schedule() {
    if (timer !== null) { window.clearInterval(timer); timer = null; }
    if (document.hidden) {
      show("paused", true);
      return;
    }
    show("live", false);
    timer = window.setInterval(poll, EVERY_MS);
  }

  document.addEventListener("visibilitychange", function () {
    schedule();
    if (!document.hidden) { poll(); }
  });
  schedule();
}());
