// The console's only script: follows a "Sync now" request's state on the instances page until it is answered.
// Without it the page shows the state as of its last load.
(function () {
  "use strict";
  var WAITING_POLL_MS = 2000;
  function follow(element) {
    var url = element.getAttribute("data-poll-url");
    if (!url) { return; }
    function poll() {
      fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
        .then(function (response) { return response.ok ? response.json() : null; })
        .then(function (answer) {
          if (!answer) { return; }
          element.textContent = answer.state;
          element.setAttribute("data-state", answer.state);
          if (answer.waiting) { setTimeout(poll, WAITING_POLL_MS); }
        })
        .catch(function () { setTimeout(poll, WAITING_POLL_MS * 5); });
    }
    setTimeout(poll, WAITING_POLL_MS);
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll(".sync-request-state[data-poll-url]").forEach(follow);
  });
})();
