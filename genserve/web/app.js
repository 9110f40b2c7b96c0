// genserve web UI: wires the form, the results column and the lightbox to the public API; the Video
// tab (video.js) has a form and results of its own.

import { api, hasApiKey, looksLikeKey, setApiKey } from "./api.js";
import { ExperimentLab } from "./experiments.js";
import { GenerateForm } from "./form.js";
import { JobBoard } from "./jobs.js";
import { Lightbox } from "./lightbox.js";
import { VideoStudio } from "./video.js";
import { WorkflowRunner } from "./workflows.js";

const $ = (selector) => document.querySelector(selector);

const announcer = $("#announcer");
function announce(message) {
  // Re-set the text so screen readers repeat identical messages.
  announcer.textContent = "";
  requestAnimationFrame(() => {
    announcer.textContent = message;
  });
}

const form = new GenerateForm($("#generate-form"), { onSubmit: submit, announce });
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

const video = new VideoStudio({
  form: $("#video-form"),
  list: $("#video-jobs"),
  empty: $("#video-empty"),
  count: $("#video-count"),
  announce,
  onUnauthorized: (error) => askForKey(error.message),
});

new WorkflowRunner({
  form: $("#workflow-form"),
  text: $("#workflow-json"),
  file: $("#workflow-file"),
  nodes: $("#workflow-nodes"),
  images: $("#workflow-images"),
  status: $("#workflow-status"),
  error: $("#workflow-error"),
  announce,
});

const lab = new ExperimentLab({
  form: $("#experiment-form"),
  text: $("#experiment-spec"),
  status: $("#experiment-status"),
  error: $("#experiment-error"),
  progress: $("#experiment-progress"),
  frame: $("#experiment-report"),
  link: $("#experiment-report-link"),
  list: $("#experiment-list"),
  announce,
  onUnauthorized: (error) => askForKey(error.message),
});

// Tabs: Image, Video, Workflows and Experiments, each a page of its own; #video, #workflows or
// #experiments in the address opens it

const TABS = ["image", "video", "workflows", "experiments"];

function showTab(name, { focus = false } = {}) {
  for (const tab of TABS) {
    const selected = tab === name;
    const button = $(`#tab-${tab}`);
    button.setAttribute("aria-selected", String(selected));
    button.tabIndex = selected ? 0 : -1;
    $(`#${tab}-page`).hidden = !selected;
    if (selected && focus) button.focus();
  }
  document.body.dataset.tab = name;
  const hash = name === "image" ? "" : `#${name}`;
  if (location.hash !== hash) history.replaceState(null, "", `${location.pathname}${location.search}${hash}`);
  if (name === "video" && booted) video.start();
  if (name === "experiments" && booted) lab.start();
}

for (const tab of TABS) {
  const button = $(`#tab-${tab}`);
  button.addEventListener("click", () => showTab(tab));
  button.addEventListener("keydown", (event) => {
    const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
    if (!step) return;
    event.preventDefault();
    showTab(TABS[(TABS.indexOf(tab) + step + TABS.length) % TABS.length], { focus: true });
  });
}

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
    const body = { ...(await form.body()), request_id: newRequestId() };
    const job = await api.submit(body);
    board.add(job);
    form.setLastSeed(job.params.seed);
    announce(job.state === "queued" ? "Queued." : "Started.");
  } catch (error) {
    if (error.status === 401) askForKey(error.message);
    else form.showErrors(error.fields ?? [], error.message);
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

// API key: asked for when the server answers 401 ----------------------------------------------

const keyForm = $("#key-form");
const keyInput = $("#api-key");
const keyError = $("#api-key-error");
const forgetKey = $("#forget-key");

function askForKey(message) {
  keyForm.hidden = false;
  forgetKey.hidden = !hasApiKey();
  keyError.hidden = !message;
  keyError.textContent = message ?? "";
  keyInput.setAttribute("aria-invalid", message ? "true" : "false");
  keyInput.focus();
  document.body.dataset.needsKey = "true";
}

keyForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = keyInput.value.trim();
  if (!looksLikeKey(key)) {
    askForKey(key ? "That is not an API key: they look like gs_… with letters, digits, - and _." : "Paste a key first.");
    return;
  }
  setApiKey(key);
  try {
    await api.models(); // any call that needs a key tells whether this one works
  } catch (error) {
    if (error.status === 401) {
      setApiKey("");
      askForKey(`That key was not accepted: ${error.message}`);
    } else {
      askForKey(error.message);
    }
    return;
  }
  if (booted) {
    location.reload(); // a key replaced mid-session may see other jobs: start from a clean page
    return;
  }
  keyInput.value = "";
  keyForm.hidden = true;
  delete document.body.dataset.needsKey;
  announce("Key accepted.");
  boot();
});

forgetKey.addEventListener("click", () => {
  setApiKey("");
  location.reload();
});

let booted = false;

async function boot() {
  updateServerStatus();
  forgetKey.hidden = !hasApiKey();
  try {
    // LoRAs and controls are extras: the form works without them (an older server, a limited key).
    const optional = (promise, fallback) => promise.catch(() => fallback);
    const [models, openapi, loras, controls, preprocessors] = await Promise.all([
      api.models(),
      api.openapi(),
      optional(api.loras(), []),
      optional(api.controls(), []),
      optional(api.preprocessors(), null),
    ]);
    const schemas = openapi.components?.schemas ?? {};
    const extras = { loras, controls, preprocessors };
    form.setup({ models: models.filter((m) => m.kind === "image"), schema: schemas.JobCreate, schemas, extras });
    board.upscaler = models.find((m) => m.kind === "upscaler")?.name ?? null;
    video.setup(models.filter((m) => m.kind === "video"));
  } catch (error) {
    // Without a key nothing else loads either: ask for one, and start again when it works.
    if (error.status === 401) return askForKey(hasApiKey() ? `The saved key no longer works: ${error.message}` : null);
    form.showFormError(`Could not load the models: ${error.message}`);
  }
  booted = true;
  const opened = location.hash.slice(1);
  if (TABS.includes(opened) && opened !== "image") showTab(opened);
  try {
    await board.start();
    const newest = board.entries.get($("#jobs").firstElementChild?.dataset.jobId);
    form.setLastSeed(newest ? newest.job.params.seed : null);
  } catch (error) {
    announce(`Could not load the jobs: ${error.message}`);
  }
  board.onPoll = updateServerStatus;
  board.onUnauthorized = (error) => {
    if (keyForm.hidden) askForKey(`The key no longer works: ${error.message}`);
  };
  document.body.dataset.ready = "true"; // for tests and for styles that wait for data
}

boot();
