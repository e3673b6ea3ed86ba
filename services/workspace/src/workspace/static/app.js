// Progressive enhancement for the note form: background saves, phrases inserted at the cursor.
// Everything here also works without this file (each button posts the whole form).
"use strict";
(function () {
  const form = document.getElementById("note-form");
  if (!form) return;
  const status = document.getElementById("autosave-status");
  const summary = document.getElementById("session-summary");
  let timer = null;
  let inFlight = null;
  let lastSection = null;
  // The buttons are named "action", which shadows form.action: read the attribute instead.
  const target = () => form.getAttribute("action");

  function say(text) { if (status) status.textContent = text; }

  async function save() {
    timer = null;
    const body = new FormData(form);
    body.set("action", "save");
    const run = (async () => {
      const response = await fetch(target(), {method: "POST", body: body,
        headers: {"X-Autosave": "1"}, credentials: "same-origin"});
      const answer = await response.json().catch(() => ({}));
      if (!response.ok) { say(answer.error || "Not saved: the server refused the draft."); return; }
      form.elements["version"].value = answer.version;
      form.elements["encounter"].value = answer.encounter;
      if (target() !== answer.url) {
        form.setAttribute("action", answer.url);
        history.replaceState(null, "", answer.url);
      }
      if (summary && answer.summary) summary.textContent = answer.summary;
      say("Draft saved at " + answer.saved + " (version " + answer.version + ")");
    })();
    inFlight = run.catch(() => {});
    try { await run; } catch (e) { say("Not saved: no connection. Your text is still here."); }
    inFlight = null;
  }

  function schedule() {
    if (timer) clearTimeout(timer);
    say("Unsaved changes");
    timer = setTimeout(save, 1500);
  }

  form.addEventListener("input", (event) => {
    if (event.target.type === "radio" || event.target.name === "new_phrase") return;
    schedule();
  });
  form.addEventListener("focusin", (event) => {
    if (event.target.classList && event.target.classList.contains("section")) lastSection = event.target;
  });
  // A button press waits for a background save in flight, so it posts the newest version.
  form.addEventListener("submit", (event) => {
    if (timer) { clearTimeout(timer); timer = null; }  // this post saves everything anyway
    if (!inFlight) return;
    event.preventDefault();
    const submitter = event.submitter;
    inFlight.finally(() => form.requestSubmit(submitter));
  });

  for (const button of form.querySelectorAll("button.phrase")) {
    button.addEventListener("click", (event) => {
      event.preventDefault();
      const chosen = form.elements["phrase_section"].value;
      const atCursor = lastSection && lastSection.dataset.section === chosen;
      const target = atCursor ? lastSection
        : form.querySelector('textarea.section[data-section="' + chosen + '"]');
      if (!target) return;
      const text = button.dataset.phrase;
      // At the cursor of the section last typed in; otherwise at the end of the chosen one.
      const start = atCursor ? target.selectionStart : target.value.length;
      const end = atCursor ? target.selectionEnd : start;
      const before = target.value.slice(0, start);
      const joiner = before && !/\s$/.test(before) ? " " : "";
      target.value = before + joiner + text + target.value.slice(end);
      const caret = (before + joiner + text).length;
      target.focus();
      target.setSelectionRange(caret, caret);
      schedule();
    });
  }
})();
