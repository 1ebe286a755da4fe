// webhoster pages: progressive enhancement only. Every page works without
// this file; it adds copy buttons and live progress on the dashboard.
(function () {
  'use strict';

  function setupCopy() {
    document.querySelectorAll('button.copy[data-copy]').forEach(function (b) {
      var target = document.getElementById(b.getAttribute('data-copy'));
      if (!target || !navigator.clipboard) { return; }
      b.hidden = false;
      var label = b.textContent;
      b.addEventListener('click', function () {
        navigator.clipboard.writeText(target.textContent).then(function () {
          b.textContent = document.documentElement.lang === 'ko' ? '복사됨' : 'Copied';
          setTimeout(function () { b.textContent = label; }, 1500);
        });
      });
    });
  }

  // While the hosting changes (creating, starting, ...), poll its status and
  // update the state, the progress bar and the step; reload when it settles
  // so every detail on the page is fresh.
  function setupLive() {
    var box = document.getElementById('hosting');
    if (!box || box.getAttribute('data-live') !== '1') { return; }
    var first = box.getAttribute('data-state');
    // The page again, without the notice of the action that started it.
    function fresh() { location.replace(location.pathname); }
    function text(id, value) {
      var el = document.getElementById(id);
      if (el && value != null && el.textContent !== value) { el.textContent = value; }
    }
    function tick() {
      fetch('/dashboard/status', { credentials: 'same-origin', headers: { 'Accept': 'application/json' } })
        .then(function (r) {
          if (r.status === 401 || r.status === 404) { fresh(); return null; }
          return r.ok ? r.json() : null;
        })
        .then(function (s) {
          if (!s) { setTimeout(tick, 2000); return; }
          text('state', s.state_label);
          var st = document.getElementById('state');
          if (st) { st.className = 'state state-' + s.state; }
          var p = document.getElementById('progress');
          if (p && s.step_done != null) { p.value = s.step_done; p.max = s.steps_total; }
          text('step', s.step_label);
          box.setAttribute('data-state', s.state);
          if (s.state !== first || !s.live) { fresh(); return; }
          setTimeout(tick, 1000);
        })
        .catch(function () { setTimeout(tick, 3000); });
    }
    setTimeout(tick, 1000);
  }

  document.addEventListener('DOMContentLoaded', function () {
    setupCopy();
    setupLive();
  });
})();
