// <tokenledger-balance src="https://api.example.com/dashboard/u/TOKEN"></tokenledger-balance>
// The navbar balance (the reference's TokenDisplay): shows the account's balance and
// follows it live (server-sent events on each balance_changed, with a poll as fallback).
// Works from any page: it reads only the signed link it is given, with no cookies.
(function () {
  "use strict";
  if (window.customElements === undefined || window.customElements.get("tokenledger-balance")) {
    return;
  }
  var STYLE = ":host{display:inline-flex;align-items:center;gap:6px;font:600 14px/1 " +
    "system-ui,sans-serif;padding:4px 10px;border-radius:999px;background:#fff4d6;" +
    "color:#6b4e00;border:1px solid #f0d48a}" +
    ":host([data-state=stale]){opacity:.6}" +
    ".coin{width:14px;height:14px;border-radius:50%;background:#f2b705;" +
    "box-shadow:inset 0 0 0 2px #d99a00}";

  class TokenLedgerBalance extends HTMLElement {
    connectedCallback() {
      if (this.value) { this.start(); return; }
      var root = this.attachShadow({ mode: "open" });
      if (root.adoptedStyleSheets !== undefined && window.CSSStyleSheet) {
        // A constructed sheet: allowed under a Content-Security-Policy without inline styles.
        var sheet = new CSSStyleSheet();
        sheet.replaceSync(STYLE);
        root.adoptedStyleSheets = [sheet];
      } else {
        var style = document.createElement("style");
        style.textContent = STYLE;
        root.appendChild(style);
      }
      var coin = document.createElement("span");
      coin.className = "coin";
      this.value = document.createElement("span");
      this.value.setAttribute("part", "value");
      this.value.textContent = "…";
      root.appendChild(coin);
      root.appendChild(this.value);
      this.setAttribute("title", "Tokens");
      this.start();
    }
    disconnectedCallback() { this.stop(); }
    get src() { return (this.getAttribute("src") || "").replace(/\/+$/, ""); }
    show(data) {
      if (typeof data.balance !== "number") { return; }
      this.value.textContent = data.balance.toLocaleString();
      this.setAttribute("data-balance", String(data.balance));
      this.setAttribute("data-state", "live");
      this.dispatchEvent(new CustomEvent("balance", { detail: data }));
    }
    poll() {
      var self = this;
      fetch(this.src + "/balance.json", { credentials: "omit", cache: "no-store" })
        .then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); })
        .then(function (data) { self.show(data); })
        .catch(function () { self.setAttribute("data-state", "stale"); });
    }
    start() {
      var self = this;
      if (!this.src) { return; }
      if (window.EventSource) {
        this.events = new EventSource(this.src + "/events");
        this.events.addEventListener("balance", function (e) { self.show(JSON.parse(e.data)); });
        this.events.addEventListener("expired", function () { self.stale(); });
        this.events.addEventListener("gone", function () { self.stale(); });
        this.events.onerror = function () {
          if (self.events && self.events.readyState === 2) { self.stale(); }
        };
      } else {
        this.poll();
        this.timer = window.setInterval(function () { self.poll(); }, 15000);
      }
    }
    stale() {
      this.setAttribute("data-state", "stale");
      if (this.events) { this.events.close(); this.events = null; }
    }
    stop() {
      if (this.events) { this.events.close(); this.events = null; }
      if (this.timer) { window.clearInterval(this.timer); this.timer = null; }
    }
  }
  window.customElements.define("tokenledger-balance", TokenLedgerBalance);
})();
