// genserve web UI: wires the form, the results column and the lightbox to the public API.

import { api } from "./api.js";
import { GenerateForm } from "./form.js";
import { JobBoard } from "./jobs.js";
import { Lightbox } from "./lightbox.js";

const $ = (selector) => document.querySelector(selector);

const announcer = $("#announcer");
function announce(message) {
  // Re-set the text so screen readers repeat identical messages.
  announcer.textContent = "";
  requestAnimationFrame(() => {
    announcer.textContent = message;
  });
}

const form = new GenerateForm($("#generate-form"), { onSubmit: submit });
const lightbox = new Lightbox($("#lightbox"), { form, announce });
const board = new JobBoard({
  list: $("#jobs"),
  loadMore: $("#load-more"),
  empty: $("#empty"),
  count: $("#job-count"),
  form,
  lightbox,
  announce,
});

let submitting = false;

async function submit() {
  if (submitting) return;
  const unreadable = form.inputErrors();
  if (unreadable.length) return form.showErrors(unreadable);
  submitting = true;
  form.setBusy(true);
  form.clearErrors();
  try {
    // A fresh key per click: a retried request cannot queue the same job twice.
    const body = { ...form.read(), request_id: newRequestId() };
    const job = await api.submit(body);
    board.add(job);
    form.setLastSeed(job.params.seed);
    announce(job.state === "queued" ? "Queued." : "Started.");
  } catch (error) {
    form.showErrors(error.fields ?? [], error.message);
  } finally {
    submitting = false;
    form.setBusy(false);
  }
}

function newRequestId() {
  if (crypto.randomUUID) return `web-${crypto.randomUUID()}`;
  const bytes = crypto.getRandomValues(new Uint8Array(16)); // plain http on a LAN address
  return `web-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}

const STATUS_TEXT = { ready: "Ready", warming: "Warming up", offline: "Server unreachable" };

async function updateServerStatus() {
  const state = await api.ready();
  const pill = $("#server-status");
  if (pill.dataset.state === state) return; // a live region: speak only on change
  pill.dataset.state = state;
  pill.textContent = STATUS_TEXT[state];
  pill.title =
    state === "warming"
      ? "No worker has the default model loaded yet; jobs wait in the queue until one has."
      : state === "offline"
        ? "The page cannot reach genserve."
        : "A worker is ready.";
}

async function boot() {
  updateServerStatus();
  try {
    const [models, openapi] = await Promise.all([api.models(), api.openapi()]);
    form.setup({ models, schema: openapi.components?.schemas?.JobCreate });
  } catch (error) {
    form.showFormError(`Could not load the models: ${error.message}`);
  }
  try {
    await board.start();
    const newest = board.entries.get($("#jobs").firstElementChild?.dataset.jobId);
    form.setLastSeed(newest ? newest.job.params.seed : null);
  } catch (error) {
    announce(`Could not load the jobs: ${error.message}`);
  }
  board.onPoll = updateServerStatus;
  document.body.dataset.ready = "true"; // for tests and for styles that wait for data
}

boot();
