// The Video tab: a form for POST /v1/video/jobs (model, mode, keyframes, length, size, post, output,
// long clips) and the clips it makes, followed over each job's events: the stage, segment k of K,
// step i of S, filmstrip previews, each segment's player, then the video with its report.

import { ApiError, api, followJob, isTerminal } from "./api.js";
import { formatTime, h } from "./format.js";

const MODE_LABELS = {
  t2v: "Text to video",
  i2v: "Image to video",
  flf2v: "First and last frame",
  keyframes: "Through keyframes",
  v2v: "Restyle a video",
};
// How many keyframes each mode takes: [at least, at most] (null: no limit).
const KEYFRAMES = { t2v: [0, 0], i2v: [1, 1], flf2v: [2, 2], keyframes: [1, null], v2v: [0, 0] };
const KEYFRAME_HINTS = {
  i2v: "The clip starts from this picture.",
  flf2v: "The clip goes from the first picture to the last.",
  keyframes: "The clip passes through each picture at its frame (0 is the first).",
};
const STAGE_LABELS = {
  denoise: "Denoising",
  stitch: "Stitching the segments",
  post: "Post-processing",
  interpolate: "Interpolating frames",
  encode: "Encoding",
};
const STATE_LABELS = {
  queued: "Queued",
  waiting: "Waiting",
  running: "Running",
  succeeded: "Done",
  failed: "Failed",
  canceled: "Canceled",
};
const VIDEO_EVENTS = ["stage", "segment_ready", "video_ready"];
const NUMBER_FIELDS = ["num_frames", "fps", "width", "height", "steps", "seed"];
const POLL_MS = 2000;

/** "keyframes[1].frame_index" (a limit's field) or ["keyframes", 1, "image"]: the form's name for it. */
function errorField({ field, loc }) {
  const parts = Array.isArray(loc) ? loc.slice(loc[0] === "body" ? 1 : 0) : [];
  const names = [];
  for (const part of parts) {
    if (typeof part !== "string") break;
    const words = part.split(/[.[]/);
    for (const word of words) {
      if (!/^[A-Za-z_]\w*$/.test(word)) break;
      names.push(word);
    }
    if (words.length > 1 || names.length === 0) break;
  }
  return names.join(".") || field;
}

export class VideoStudio {
  constructor({ form, list, empty, count, announce, onUnauthorized }) {
    this.form = form;
    this.list = list;
    this.empty = empty;
    this.count = count;
    this.announce = announce;
    this.onUnauthorized = onUnauthorized;
    this.models = [];
    this.entries = new Map();
    this.started = false;
    this.submitting = false;
    const $ = (selector) => form.querySelector(selector);
    this.el = {
      model: $("#video-model"),
      modelInfo: $("#video-model-info"),
      mode: $("#video-mode"),
      prompt: $("#video-prompt"),
      interpolate: $("#video-post-interpolate"),
      deflicker: $("#video-post-deflicker"),
      container: $("#video-output-container"),
      long: $("#video-long"),
      longOptions: $("#video-long-options"),
      segmentFrames: $("#video-long-segment_frames"),
      overlap: $("#video-long-overlap"),
      strategy: $("#video-long-strategy"),
      keyframesField: $("#video-keyframes-field"),
      keyframesHint: $("#video-keyframes-hint"),
      keyframes: $("#video-keyframes"),
      addKeyframe: $("#video-keyframe-add"),
      inputField: $("#video-input-field"),
      input: $("#video-input"),
      length: $("#video-length"),
      formError: $("#video-form-error"),
      submit: $("#video-generate"),
    };
    for (const name of NUMBER_FIELDS) this.el[name] = $(`#video-${name}`);
    /** @type {{el: HTMLElement, index: HTMLInputElement, ref: string|null, pending: Promise|null, auto: boolean}[]} */
    this.rows = [];
    this.inputVideo = { ref: null, pending: null };

    form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.submit();
    });
    form.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        form.requestSubmit();
      }
    });
    form.addEventListener("input", (event) => {
      this.clearError(event.target.name);
      if (event.target === this.el.num_frames) this.placeLastKeyframe();
      this.showLength();
    });
    this.el.model.addEventListener("change", () => this.applyModel());
    this.el.mode.addEventListener("change", () => this.applyMode());
    this.el.long.addEventListener("change", () => {
      this.el.longOptions.hidden = !this.el.long.checked;
    });
    this.el.addKeyframe.addEventListener("click", () => {
      const last = this.rows.at(-1);
      this.addRow(last ? Number(last.index.value || 0) + 8 : 0).file.focus();
    });
    this.el.input.addEventListener("change", () => {
      const file = this.el.input.files?.[0];
      this.inputVideo = { ref: null, pending: null };
      if (file) this.inputVideo.pending = this.upload(file, (ref) => (this.inputVideo.ref = ref), "video");
    });
  }

  // The form ---------------------------------------------------------------------------------------

  /** The video models from /v1/models; the default one chosen. */
  setup(models) {
    this.models = models;
    this.el.model.replaceChildren(
      ...models.map((m) => h("option", { value: m.name }, `${m.name} — ${m.family}, ${m.native_width}×${m.native_height}`)),
    );
    if (!models.length) {
      this.showFormError("This server has no video models yet.");
      this.el.submit.disabled = true;
      return;
    }
    this.el.model.value = (models.find((m) => m.default) ?? models[0]).name;
    this.applyModel();
  }

  model() {
    return this.models.find((m) => m.name === this.el.model.value);
  }

  /** A new model: its modes, and its frames, fps, size and steps as the starting values. */
  applyModel() {
    const model = this.model();
    if (!model) return;
    const previous = this.el.mode.value;
    const modes = model.video_modes?.length ? model.video_modes : ["t2v"];
    this.el.mode.replaceChildren(...modes.map((mode) => h("option", { value: mode }, MODE_LABELS[mode] ?? mode)));
    this.el.mode.value = modes.includes(previous) ? previous : modes[0];
    const defaults = {
      num_frames: model.default_frames,
      fps: model.default_fps,
      width: model.native_width,
      height: model.native_height,
      steps: model.default_steps,
    };
    for (const [name, value] of Object.entries(defaults)) this.el[name].value = value ?? "";
    this.el.modelInfo.textContent = [model.family, model.license && `licence: ${model.license}`, model.base_model && `on ${model.base_model}`]
      .filter(Boolean)
      .join(" · ");
    this.clearErrors();
    this.applyMode();
  }

  /** Keyframe slots for the mode: i2v one, flf2v first and last, keyframes any number. */
  applyMode() {
    const mode = this.el.mode.value;
    const [least, most] = KEYFRAMES[mode] ?? [0, 0];
    this.el.keyframesField.hidden = most === 0;
    this.el.inputField.hidden = mode !== "v2v";
    this.el.keyframesHint.textContent = KEYFRAME_HINTS[mode] ?? "";
    this.el.addKeyframe.hidden = most !== null;
    while (most !== null && this.rows.length > most) this.removeRow(this.rows.at(-1));
    while (this.rows.length < least) this.addRow(this.rows.length ? this.lastFrame() : 0);
    this.rows.forEach((row, position) => {
      // i2v and flf2v fix where their pictures go; keyframes lets each be placed.
      row.auto = mode === "i2v" || mode === "flf2v";
      row.index.readOnly = row.auto;
      if (row.auto) row.index.value = position === 0 ? 0 : this.lastFrame();
      row.remove.hidden = most !== null;
    });
    this.clearError("keyframes");
    this.showLength();
  }

  lastFrame() {
    return Math.max(0, (Number(this.el.num_frames.value) || 1) - 1);
  }

  placeLastKeyframe() {
    if (this.el.mode.value === "flf2v" && this.rows[1]) this.rows[1].index.value = this.lastFrame();
  }

  addRow(frameIndex) {
    const number = this.rows.length + 1;
    const id = `video-keyframe-${Date.now().toString(36)}-${number}`;
    const row = { ref: null, pending: null, auto: false };
    row.file = h("input", { type: "file", id: `${id}-file`, accept: "image/png,image/jpeg,image/webp,image/*", class: "visually-hidden" });
    row.thumb = h("img", { class: "keyframe-thumb", alt: "", hidden: true });
    row.index = h("input", { type: "number", id: `${id}-index`, min: "0", step: "1", inputmode: "numeric", value: String(frameIndex) });
    row.label = h("label", { for: `${id}-file`, class: "button small" }, "Choose picture…");
    row.remove = h("button", { type: "button", class: "small danger", onclick: () => this.removeRow(row) }, "Remove");
    row.el = h(
      "li",
      { class: "keyframe-row" },
      row.thumb,
      row.file,
      row.label,
      h("label", { class: "keyframe-index", for: `${id}-index` }, h("span", {}, "at frame"), row.index),
      row.remove,
    );
    row.file.addEventListener("change", () => {
      const file = row.file.files?.[0];
      if (!file) return;
      row.ref = null;
      row.thumb.src = URL.createObjectURL(file);
      row.thumb.alt = `Keyframe: ${file.name}`;
      row.thumb.hidden = false;
      row.label.textContent = "Replace…";
      row.pending = this.upload(file, (ref) => (row.ref = ref), "keyframes");
    });
    this.rows.push(row);
    this.el.keyframes.append(row.el);
    return row;
  }

  removeRow(row) {
    row.el.remove();
    this.rows = this.rows.filter((r) => r !== row);
  }

  /** POST /v1/uploads once per picture; the job names it by its id. */
  async upload(file, done, field) {
    this.clearError(field);
    try {
      const stored = await api.upload(file, file.name);
      done(stored.id);
    } catch (error) {
      this.showErrors(error.fields?.length ? error.fields.map((f) => ({ ...f, field })) : [{ field, message: error.message }]);
    }
  }

  showLength() {
    const frames = Number(this.el.num_frames.value);
    const fps = Number(this.el.fps.value);
    const times = Number(this.el.interpolate.value) || 1;
    if (!(frames > 0 && fps > 0)) {
      this.el.length.textContent = "";
      return;
    }
    const seconds = ((frames - 1) * times + 1) / (fps * times); // interpolation adds frames between pairs
    this.el.length.textContent =
      `${seconds.toFixed(2)} s of video` + (times > 1 ? ` at ${fps * times} fps after interpolation.` : ".");
  }

  /** The POST /v1/video/jobs body; empty fields are left out, so the model's defaults apply. */
  async body() {
    await Promise.all([...this.rows.map((row) => row.pending), this.inputVideo.pending]);
    const body = { prompt: this.el.prompt.value, model: this.el.model.value, mode: this.el.mode.value };
    for (const name of NUMBER_FIELDS) {
      const raw = this.el[name].value.trim();
      if (raw !== "") body[name] = Number(raw);
    }
    const interpolate = Number(this.el.interpolate.value);
    if (interpolate > 1 || this.el.deflicker.checked) body.post = { interpolate, deflicker: this.el.deflicker.checked };
    body.output = { container: this.el.container.value };
    if (this.el.long.checked) {
      body.long = { strategy: this.el.strategy.value, overlap: Number(this.el.overlap.value) || 0 };
      if (this.el.segmentFrames.value.trim() !== "") body.long.segment_frames = Number(this.el.segmentFrames.value);
    }
    if (!this.el.keyframesField.hidden) {
      const missing = this.rows.findIndex((row) => !row.ref);
      if (missing >= 0) throw formError("keyframes", `Keyframe ${missing + 1} has no picture yet.`);
      body.keyframes = this.rows.map((row) => ({ image: row.ref, frame_index: Number(row.index.value) || 0 }));
    }
    if (body.mode === "v2v") {
      if (!this.inputVideo.ref) throw formError("video", "Choose the video to restyle.");
      body.video = this.inputVideo.ref;
    }
    return body;
  }

  async submit() {
    if (this.submitting) return;
    this.submitting = true;
    this.el.submit.disabled = true;
    this.el.submit.setAttribute("aria-busy", "true");
    this.clearErrors();
    try {
      const body = { ...(await this.body()), request_id: newRequestId() };
      const job = await api.submitVideo(body);
      this.add(job, { atTop: true });
      this.announce(job.state === "queued" ? "Video queued." : "Video started.");
    } catch (error) {
      if (error.status === 401) this.onUnauthorized?.(error);
      else this.showErrors(error.fields ?? [], error.message);
    } finally {
      this.submitting = false;
      this.el.submit.disabled = false;
      this.el.submit.setAttribute("aria-busy", "false");
    }
  }

  // Errors -----------------------------------------------------------------------------------------

  /** 422 errors next to their fields ("post.interpolate", "keyframes[1].frame_index"); the rest above the button. */
  showErrors(fields, fallback = "") {
    const general = [];
    let first = null;
    for (const item of fields) {
      const name = errorField(item);
      const parts = name ? name.split(".") : [];
      let box = null;
      for (let n = parts.length; n > 0 && !box; n -= 1) box = this.byId(`video-${parts.slice(0, n).join("-")}-error`);
      if (!box || box.parentElement.closest("[hidden]")) { // the box is hidden until it speaks; its field must not be
        general.push(item.message);
        continue;
      }
      box.textContent = box.textContent ? `${box.textContent} ${item.message}` : item.message;
      box.hidden = false;
      box.closest("details")?.setAttribute("open", "");
      const input = this.byId(`video-${parts.join("-")}`) ?? box.closest("fieldset, details, .field, .grid-2")?.querySelector("input, select, textarea");
      input?.setAttribute("aria-invalid", "true");
      first ??= input ?? box;
    }
    if (!fields.length && fallback) general.push(fallback);
    if (general.length) this.showFormError(general.join(" "));
    (first ?? this.el.formError).focus?.();
  }

  byId(id) {
    return this.form.querySelector(`#${CSS.escape(id)}`);
  }

  showFormError(message) {
    this.el.formError.textContent = message;
    this.el.formError.hidden = !message;
  }

  clearError(field) {
    if (!field) return;
    const box = this.byId(`video-${field.split(".")[0]}-error`) ?? this.byId(`video-${field.replaceAll(".", "-")}-error`);
    if (box) {
      box.textContent = "";
      box.hidden = true;
    }
  }

  clearErrors() {
    for (const box of this.form.querySelectorAll(".error")) {
      box.textContent = "";
      box.hidden = true;
    }
    for (const input of this.form.querySelectorAll("[aria-invalid=true]")) input.setAttribute("aria-invalid", "false");
  }

  // The clips ----------------------------------------------------------------------------------------

  /** The first time the tab opens: the latest video jobs, the unfinished ones followed live. */
  async start() {
    if (this.started) return;
    this.started = true;
    try {
      const page = await api.videoJobs({ limit: 10 });
      for (const job of page.items) this.add(job, { atTop: false });
    } catch (error) {
      if (error.status === 401) this.onUnauthorized?.(error);
      else this.announce(`Could not load the videos: ${error.message}`);
    }
    this.afterChange();
  }

  add(job, { atTop }) {
    if (this.entries.has(job.id)) return;
    const entry = { job, live: { stages: [], percent: 0, segmentsReady: [] }, stop: null, el: h("li", { class: "job video-job", tabindex: "-1" }) };
    this.entries.set(job.id, entry);
    if (atTop) this.list.prepend(entry.el);
    else this.list.append(entry.el);
    this.render(entry);
    if (!isTerminal(job.state)) this.follow(entry);
    this.afterChange();
    if (atTop) entry.el.scrollIntoView({ block: "nearest" });
  }

  afterChange() {
    this.empty.hidden = this.entries.size > 0;
    const active = [...this.entries.values()].filter((e) => !isTerminal(e.job.state)).length;
    const total = this.entries.size;
    this.count.textContent = active ? `${active} in progress · ${total} shown` : `${total} video${total === 1 ? "" : "s"}`;
  }

  follow(entry) {
    entry.stop = followJob(
      entry.job.id,
      (type, data) => this.onEvent(entry, type, data),
      () => {
        entry.stop = null;
        this.poll(entry);
      },
      VIDEO_EVENTS,
    );
  }

  /** Without a stream (it was lost): read the job until it ends. */
  async poll(entry) {
    try {
      const job = await api.videoJob(entry.job.id);
      if (isTerminal(job.state)) return this.finish(entry, job.state, {});
      entry.job = job;
    } catch {
      // keep the last view; try again
    }
    setTimeout(() => this.poll(entry), POLL_MS);
  }

  onEvent(entry, type, data) {
    const live = entry.live;
    switch (type) {
      case "started":
        this.setState(entry, "running");
        break;
      case "stage":
        this.setState(entry, "running");
        live.stage = data.stage;
        if (!live.stages.includes(data.stage)) live.stages.push(data.stage);
        if (data.segments !== undefined) live.segments = data.segments;
        live.segment = data.segment;
        if (data.stage !== "denoise") live.step = undefined;
        this.updateStatus(entry);
        break;
      case "progress":
        this.setState(entry, "running");
        Object.assign(live, { stage: data.stage ?? live.stage, step: data.step, steps: data.steps, segment: data.segment });
        if (data.segments !== undefined) live.segments = data.segments;
        live.percent = data.percent ?? Math.round((100 * data.step) / data.steps);
        live.best = Math.max(live.best ?? 0, live.percent);
        this.updateStatus(entry);
        break;
      case "preview":
        live.filmstrip = data.filmstrip;
        this.updatePreview(entry);
        break;
      case "segment_ready":
        live.segmentsReady.push(data);
        live.segments = data.segments;
        this.updateSegments(entry);
        break;
      case "video_ready":
        live.stage = "encode";
        live.percent = 100;
        live.ready = data;
        this.updateStatus(entry);
        break;
      case "requeued":
        live.step = undefined;
        this.setState(entry, "queued");
        break;
      case "succeeded":
      case "failed":
      case "canceled":
        this.finish(entry, type, data);
        break;
    }
  }

  setState(entry, state) {
    if (entry.job.state === state) return;
    entry.job = { ...entry.job, state };
    this.render(entry);
  }

  async finish(entry, state, data) {
    entry.stop = null;
    const short = entry.job.params.prompt.slice(0, 40);
    if (state === "succeeded") this.announce(`Video finished: ${short}`);
    if (state === "failed") this.announce(`Video failed: ${data.error ?? "unknown error"}`);
    try {
      entry.job = await api.videoJob(entry.job.id);
    } catch {
      entry.job = { ...entry.job, state, error: data.error ?? entry.job.error };
    }
    this.render(entry);
    this.afterChange();
  }

  cancel(entry) {
    entry.live.canceling = true;
    this.render(entry);
    api
      .cancelVideo(entry.job.id)
      .then((job) => {
        if (isTerminal(job.state)) this.finish(entry, job.state, job);
      })
      .catch((error) => {
        entry.live.canceling = false;
        this.render(entry);
        this.announce(`Could not cancel: ${error.message}`);
      });
  }

  // Rendering ----------------------------------------------------------------------------------------

  render(entry) {
    const { job, el } = entry;
    const p = job.params;
    el.dataset.jobId = job.id;
    el.dataset.state = job.state;
    el.replaceChildren(
      h("div", { class: "job-media video-media" }, this.renderMedia(entry)),
      h(
        "div",
        { class: "job-body" },
        h(
          "div",
          { class: "job-head" },
          h("span", { class: `badge badge-${job.state === "waiting" ? "queued" : job.state}` }, STATE_LABELS[job.state] ?? job.state),
          h("time", { datetime: job.created_at, class: "muted" }, formatTime(job.created_at)),
        ),
        h("div", { class: "video-status" }),
        p.prompt ? h("p", { class: "job-prompt", title: p.prompt }, p.prompt) : null,
        h(
          "p",
          { class: "job-params muted" },
          [
            p.model,
            MODE_LABELS[p.mode] ?? p.mode,
            `${p.width}×${p.height}`,
            `${p.num_frames} frames at ${p.fps} fps`,
            `${p.steps} steps`,
            `seed ${p.seed}`,
            p.post?.interpolate > 1 ? `interpolated ×${p.post.interpolate}` : null,
            p.long ? `segments of ${p.long.segment_frames} (${p.long.strategy})` : null,
            p.output?.container,
          ]
            .filter(Boolean)
            .join(" · "),
        ),
        h("ul", { class: "video-segments", "aria-label": "Segments" }),
        job.state === "succeeded" ? this.renderReport(job.report) : null,
        this.renderActions(entry),
      ),
    );
    this.updateStatus(entry);
    this.updateSegments(entry);
  }

  renderMedia(entry) {
    const { job, live } = entry;
    const video = job.outputs?.video;
    if (job.state === "succeeded" && video) {
      const label = `Video: ${job.params.prompt || job.params.mode}`;
      return video.media_type.startsWith("video/")
        ? mutedVideo({ class: "video-player", src: video.url, controls: true, autoplay: true, loop: true, playsinline: true, "aria-label": label })
        : h("img", { class: "video-player", src: video.url, alt: label });
    }
    if (isTerminal(job.state)) return null;
    const strip = h("img", { class: "filmstrip", alt: "Live preview frames", hidden: !live.filmstrip });
    if (live.filmstrip) strip.src = live.filmstrip;
    return h("div", { class: "filmstrip-slot placeholder pending" }, strip);
  }

  renderReport(report) {
    if (!report) return null;
    const rows = [
      ["Frames", report.frames],
      ["FPS", report.fps],
      ["Seconds", report.seconds],
      ["Size", report.width && `${report.width}×${report.height}`],
      ["Codec", report.codec && `${report.codec} (${report.container})`],
      ...Object.entries(report.metrics ?? {})
        .filter(([name]) => name !== "frames") // already above
        .map(([name, value]) => [name.replaceAll("_", " "), value]),
    ].filter(([, value]) => value !== undefined && value !== null);
    return h(
      "dl",
      { class: "video-report" },
      rows.flatMap(([name, value]) => [h("dt", {}, name), h("dd", {}, typeof value === "number" ? String(Math.round(value * 1000) / 1000) : String(value))]),
    );
  }

  renderActions(entry) {
    const { job, live } = entry;
    const actions = h("div", { class: "job-actions" });
    if (!isTerminal(job.state)) {
      actions.append(
        h(
          "button",
          { type: "button", class: "danger", dataset: { action: "cancel" }, disabled: live.canceling, onclick: () => this.cancel(entry) },
          live.canceling ? "Canceling…" : "Cancel",
        ),
      );
    }
    const video = job.outputs?.video;
    if (job.state === "succeeded" && video) {
      actions.append(h("a", { class: "button", href: video.url, download: video.id, dataset: { action: "download" } }, "Download"));
    }
    return actions;
  }

  updateStatus(entry) {
    const { job, live, el } = entry;
    const box = el.querySelector(".video-status");
    if (!box) return;
    el.dataset.stages = live.stages.join(" ");
    el.dataset.percent = String(Math.round(live.best ?? 0)); // the furthest a progress event got
    if (job.state === "failed") {
      const text = job.error ? `The video failed: ${job.error}` : "The video failed.";
      return box.replaceChildren(h("p", { class: "job-error", title: text, tabindex: "0" }, h("span", { class: "clamp" }, text)));
    }
    if (job.state === "canceled") return box.replaceChildren(h("p", { class: "job-note muted" }, "Canceled before it finished."));
    if (job.state === "succeeded") return box.replaceChildren();
    if (job.state === "queued" || job.state === "waiting") {
      return box.replaceChildren(h("p", { class: "job-note" }, job.state === "waiting" ? "Waiting for its segments…" : "Queued: waiting for a worker."));
    }
    const percent = Math.round(live.percent ?? 0);
    const text = statusText(live);
    let bar = box.querySelector(".progress");
    if (!bar) {
      bar = h(
        "div",
        { class: "progress", role: "progressbar", "aria-label": "Video progress", "aria-valuemin": "0", "aria-valuemax": "100" },
        h("div", { class: "progress-fill" }),
      );
      box.replaceChildren(bar, h("p", { class: "progress-text" }));
    }
    bar.classList.toggle("indeterminate", !live.step && live.stage !== "encode" && percent === 0);
    bar.setAttribute("aria-valuenow", String(percent));
    bar.setAttribute("aria-valuetext", text);
    bar.firstElementChild.style.width = `${percent}%`;
    box.querySelector(".progress-text").textContent = text;
  }

  updatePreview(entry) {
    const strip = entry.el.querySelector("img.filmstrip");
    if (!strip) return;
    strip.src = entry.live.filmstrip;
    strip.hidden = false;
  }

  updateSegments(entry) {
    const list = entry.el.querySelector(".video-segments");
    if (!list) return;
    const shown = list.children.length;
    for (const ready of entry.live.segmentsReady.slice(shown)) {
      list.append(
        h(
          "li",
          { class: "video-segment" },
          mutedVideo({ src: ready.url, controls: true, loop: true, playsinline: true, preload: "metadata", "aria-label": `Segment ${ready.segment + 1} of ${ready.segments}` }),
          h("a", { href: ready.url, download: "" }, `Segment ${ready.segment + 1} of ${ready.segments}`),
        ),
      );
    }
  }
}

function statusText(live) {
  if (!live.stage) return "Starting (loading the model if needed)…";
  const parts = [STAGE_LABELS[live.stage] ?? live.stage];
  if (live.segment !== undefined && live.segments) parts.push(`segment ${live.segment + 1} of ${live.segments}`);
  if (live.step) parts.push(`step ${live.step} of ${live.steps}`);
  if (live.stage === "denoise" || live.stage === "interpolate" || live.ready) parts.push(`${Math.round(live.percent ?? 0)}%`);
  return parts.join(" · ");
}

/** A <video> that starts muted: the attribute alone does not mute one made by script, and browsers
 * autoplay only muted videos. */
function mutedVideo(attrs) {
  const video = h("video", { ...attrs, muted: true });
  video.muted = true;
  return video;
}

/** A problem the page finds before sending: shown like the server's 422s. */
function formError(field, message) {
  return new ApiError(422, message, [{ field, message }]);
}

function newRequestId() {
  if (crypto.randomUUID) return `web-${crypto.randomUUID()}`;
  const bytes = crypto.getRandomValues(new Uint8Array(16)); // plain http on a LAN address
  return `web-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}
