// sidecar dashboard: refreshes the overview's counts in place. Everything else works without it.
"use strict";

(function () {
  const source = document.querySelector("[data-live-source]");
  if (!source) {
    return;
  }
  const url = source.getAttribute("data-live-source");
  const everyMs = 2000;

  function setText(selector, text) {
    for (const el of document.querySelectorAll(selector)) {
      if (el.textContent !== text) {
        el.textContent = text;
      }
    }
  }

  function rate(r) {
    return r === null || r === undefined ? "-" : r.toFixed(1) + "/s";
  }

  async function refresh() {
    try {
      const response = await fetch(url, { headers: { Accept: "application/json" }, cache: "no-store" });
      if (!response.ok) {
        throw new Error("HTTP " + response.status);
      }
      const view = await response.json();
      for (const [name, n] of Object.entries(view.counts)) {
        setText('[data-count="' + name + '"]', String(n));
      }
      for (const [queue, counts] of Object.entries(view.queues || {})) {
        for (const [name, n] of Object.entries(counts)) {
          setText('[data-queue-count="' + queue + ":" + name + '"]', String(n));
        }
      }
      for (const [name, r] of Object.entries(view.rates)) {
        setText('[data-rate="' + name + '"]', rate(r));
      }
      setText('[data-live="mode"]', view.mode);
      setText('[data-live="health"]', view.health);
      setText('[data-live="usage"]', Math.round(view.usage * 100) + "%");
      setText('[data-live="items"]', String(view.items));
      setText('[data-live="breaker"]', view.breaker_open ? "open" : "closed");
      const meter = document.getElementById("usage-meter");
      if (meter) {
        meter.value = view.usage;
      }
      source.textContent = "Updated " + new Date().toLocaleTimeString() + ".";
    } catch (err) {
      source.textContent = "Refresh failed (" + err.message + "); retrying.";
    }
    window.setTimeout(refresh, everyMs);
  }

  window.setTimeout(refresh, everyMs);
})();
