// The results column: one card per job from /v1/jobs, live over SSE while queued or running.

import { api, followJob, isTerminal } from "./api.js";
import { formatDuration, formatTime, h, pictureSummary, requestBody, samplerLabel } from "./format.js";

const PAGE_SIZE = 24;
const MAX_STREAMS = 4; // browsers allow ~6 connections per host; leave room for fetches and images
const POLL_ACTIVE_MS = 1500;
const POLL_IDLE_MS = 5000;
const STATE_LABELS = { queued: "Queued", running: "Running", succeeded: "Done", failed: "Failed", canceled: "Canceled" };
const RANK = { queued: 0, running: 1, succeeded: 2, failed: 2, canceled: 2 };

export class JobBoard {
  constructor({ list, loadMore, empty, count, form, lightbox, announce }) {
    this.list = list;
    this.loadMoreButton = loadMore;
    this.empty = empty;
    this.count = count;
    this.form = form;
    this.lightbox = lightbox;
    this.announce = announce;
    /** @type {Map<string, {job: object, el: HTMLElement, live: object, stop: Function|null}>} */
    this.entries = new Map();
    this.total = 0;
    this.pollTimer = null;
    this.onPoll = null;
    this.onUnauthorized = null; // the key was revoked, or forgotten in another tab
    this.upscaler = null; // the first upscaler of /v1/models: "Upscale ×2" on finished images
    loadMore.addEventListener("click", () => this.loadMore());
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) this.poll();
    });
  }

  // Loading ------------------------------------------------------------------------------------

  async start() {
    try {
      await this.refresh();
    } finally {
      this.schedulePoll(); // keep trying if the server was away
    }
  }

  /** The newest page, merged into what is shown (new jobs from any client appear too). */
  async refresh() {
    const page = await api.jobs({ limit: PAGE_SIZE });
    this.total = page.total;
    for (const job of [...page.items].reverse()) this.upsert(job, { atTop: true });
    this.afterChange();
  }

  async loadMore() {
    this.loadMoreButton.disabled = true;
    try {
      const page = await api.jobs({ limit: PAGE_SIZE, offset: this.entries.size });
      this.total = page.total;
      for (const job of page.items) this.upsert(job, { atTop: false });
    } catch (error) {
      this.announce(error.message);
    } finally {
      this.loadMoreButton.disabled = false;
      this.afterChange();
    }
  }

  schedulePoll() {
    clearTimeout(this.pollTimer);
    const active = [...this.entries.values()].some((e) => !isTerminal(e.job.state));
    this.pollTimer = setTimeout(() => this.poll(), active ? POLL_ACTIVE_MS : POLL_IDLE_MS);
  }

  async poll() {
    if (!document.hidden) {
      try {
        await this.refresh();
      } catch (error) {
        // The status pill says when the server is away; keep the last view.
        if (error.status === 401) this.onUnauthorized?.(error);
      }
      this.onPoll?.();
    }
    this.schedulePoll();
  }

  /** A job just submitted from the form: shown first, and scrolled to (on phones it is below the form). */
  add(job) {
    this.upsert(job, { atTop: true });
    this.total += 1;
    this.afterChange();
    this.entries.get(job.id)?.el.scrollIntoView({ block: "nearest" });
  }

  upsert(job, { atTop }) {
    const entry = this.entries.get(job.id);
    if (!entry) {
      const created = { job, el: h("li", { class: "job", tabindex: "-1" }), live: {}, stop: null, upscale: null };
      this.entries.set(job.id, created);
      if (atTop) this.list.prepend(created.el);
      else this.list.append(created.el);
      this.render(created);
      return;
    }
    // A poll can be older than the stream; never move a job backwards unless nothing streams it.
    if (entry.stop && RANK[job.state] < RANK[entry.job.state]) return;
    const changed = job.state !== entry.job.state || job.images.length !== entry.job.images.length;
    entry.job = { ...entry.job, ...job };
    if (changed) this.render(entry);
    else if (job.state === "queued") this.updateQueued(entry);
  }

  afterChange() {
    this.follow();
    this.empty.hidden = this.entries.size > 0;
    this.loadMoreButton.hidden = this.entries.size >= this.total;
    const active = [...this.entries.values()].filter((e) => !isTerminal(e.job.state)).length;
    this.count.textContent = active
      ? `${active} in progress · ${this.total} total`
      : `${this.total} job${this.total === 1 ? "" : "s"}`;
    this.updateTitle();
  }

  // Live updates -------------------------------------------------------------------------------

  /** Stream the oldest active jobs (they run first); the rest are kept fresh by polling. */
  follow() {
    const active = [...this.entries.values()]
      .filter((e) => !isTerminal(e.job.state))
      .sort((a, b) => a.job.created_at.localeCompare(b.job.created_at));
    let streams = active.filter((e) => e.stop).length;
    for (const entry of active) {
      if (streams >= MAX_STREAMS) break;
      if (entry.stop) continue;
      entry.stop = followJob(
        entry.job.id,
        (type, data) => this.onEvent(entry, type, data),
        () => {
          entry.stop = null; // the poll keeps it fresh
        },
      );
      streams += 1;
    }
  }

  onEvent(entry, type, data) {
    const job = entry.job;
    switch (type) {
      case "queued": // only ever first: it never moves a running job back (a replay starts with it)
        if (data.queue_position !== undefined) job.queue_position = data.queue_position;
        this.updateQueued(entry);
        break;
      case "requeued": // the worker died: back in the queue
        entry.live = { requeued: data.reason || "the worker stopped" };
        job.queue_position = data.queue_position ?? null;
        this.setState(entry, "queued");
        break;
      case "started":
        entry.live = { step: 0, steps: job.params.steps, percent: 0, canceling: entry.live.canceling };
        if (job.state !== "running") this.setState(entry, "running");
        break;
      case "progress":
        if (job.state !== "running") this.setState(entry, "running");
        Object.assign(entry.live, { step: data.step, steps: data.steps, percent: data.percent, eta: data.eta_s });
        this.updateProgress(entry);
        break;
      case "preview":
        if (job.state !== "running") this.setState(entry, "running");
        entry.live.previews = data.images ?? [];
        entry.live.previewStep = data.step;
        this.updatePreviews(entry);
        break;
      case "succeeded":
      case "failed":
      case "canceled":
        this.finish(entry, type, data);
        break;
    }
  }

  async finish(entry, state, data) {
    entry.stop = null;
    const prompt = entry.job.params.prompt;
    const short = prompt.length > 40 ? `${prompt.slice(0, 40)}…` : prompt;
    if (state === "succeeded") this.announce(`Finished: ${short}`);
    if (state === "failed") this.announce(`Failed: ${data.error ?? "unknown error"}`);
    if (state === "canceled") this.announce(`Canceled: ${short}`);
    try {
      entry.job = await api.job(entry.job.id);
    } catch {
      entry.job = { ...entry.job, state, error: data.error ?? entry.job.error, images: data.images ?? entry.job.images };
    }
    entry.live = {};
    this.render(entry);
    this.poll(); // a finished job frees the worker: refresh positions and start the next stream
  }

  setState(entry, state) {
    entry.job = { ...entry.job, state };
    this.render(entry);
  }

  cancel(entry) {
    entry.live.canceling = true;
    this.render(entry);
    api
      .cancel(entry.job.id)
      .then((job) => this.upsert(job, { atTop: false }))
      .catch((error) => {
        entry.live.canceling = false;
        this.render(entry);
        this.announce(`Could not cancel: ${error.message}`);
      })
      .finally(() => this.afterChange());
  }

  updateTitle() {
    const running = [...this.entries.values()].find((e) => e.job.state === "running");
    const percent = running?.live.percent;
    document.title = running ? `(${Math.round(percent ?? 0)}%) genserve` : "genserve";
  }

  // Rendering ----------------------------------------------------------------------------------

  render(entry) {
    const { job, el } = entry;
    const focusedAction = el.contains(document.activeElement) ? document.activeElement.dataset.action : null;
    const p = job.params;
    el.dataset.state = job.state;
    el.dataset.jobId = job.id;
    el.replaceChildren(
      ...[this.renderMedia(entry)].filter(Boolean),
      h(
        "div",
        { class: "job-body" },
        h(
          "div",
          { class: "job-head" },
          h("span", { class: `badge badge-${job.state}` }, STATE_LABELS[job.state] ?? job.state),
          h("time", { datetime: job.created_at, class: "muted" }, formatTime(job.created_at)),
        ),
        this.renderStatus(entry),
        h("p", { class: "job-prompt", title: p.prompt }, p.prompt),
        p.negative_prompt ? h("p", { class: "job-negative muted", title: p.negative_prompt }, `Not: ${p.negative_prompt}`) : null,
        h(
          "p",
          { class: "job-params muted" },
          [
            p.model,
            `${p.width}×${p.height}`,
            `${p.steps} steps`,
            `CFG ${p.cfg_scale}`,
            samplerLabel(p.sampler),
            `seed ${p.seed}`,
            p.num_images > 1 ? `${p.num_images} images` : null,
            ...pictureSummary(p),
          ]
            .filter(Boolean)
            .join(" · "),
        ),
        this.renderActions(entry),
        this.renderUpscale(entry),
      ),
    );
    if (focusedAction) (el.querySelector(`[data-action="${focusedAction}"]`) ?? el).focus();
    this.updateTitle();
  }

  renderMedia(entry) {
    const { job } = entry;
    const p = job.params;
    const count = Math.max(p.num_images, job.images.length, 1);
    if (isTerminal(job.state) && !job.images.length) return null; // failed or canceled: no picture
    const media = h("div", { class: `job-media count-${Math.min(count, 4)}` });
    for (let index = 0; index < count; index += 1) {
      const image = job.images[index];
      const style = { aspectRatio: `${p.width} / ${p.height}` };
      if (image) {
        const label = `Open image ${index + 1} of ${count} full size (seed ${p.seed + index})`;
        media.append(
          h(
            "button",
            {
              type: "button",
              class: "thumb",
              style,
              "aria-label": label,
              dataset: { action: `open-${index}` },
              onclick: () => this.openLightbox(job.id, index),
            },
            h("img", { src: image.url, alt: `${p.prompt} (seed ${p.seed + index})`, loading: "lazy", decoding: "async" }),
          ),
        );
      } else {
        const preview = entry.live.previews?.[index];
        media.append(
          h(
            "div",
            { class: `thumb placeholder${isTerminal(job.state) ? "" : " pending"}`, style },
            preview ? h("img", { class: "preview", src: preview, alt: `Live preview ${index + 1}` }) : null,
          ),
        );
      }
    }
    return media;
  }

  renderStatus(entry) {
    const { job, live } = entry;
    if (job.state === "queued") return h("p", { class: "job-note queue-note" }, queueText(job, live));
    if (job.state === "running") {
      const percent = Math.round(live.percent ?? 0);
      const bar = h(
        "div",
        {
          class: `progress${live.step ? "" : " indeterminate"}`,
          role: "progressbar",
          "aria-label": "Progress",
          // In steps; aria-valuetext says it in words (step, percent, time left).
          "aria-valuemin": "0",
          "aria-valuemax": String(live.steps ?? job.params.steps),
          "aria-valuenow": live.step ? String(live.step) : undefined, // none while indeterminate
          "aria-valuetext": progressText(live),
        },
        h("div", { class: "progress-fill", style: { width: `${percent}%` } }),
      );
      return h("div", { class: "job-progress" }, bar, h("p", { class: "progress-text" }, progressText(live)));
    }
    if (job.state === "failed") {
      const text = job.error ? `The job failed: ${job.error}` : "The job failed.";
      // Long errors are clamped; hover or focus shows all of it.
      return h("p", { class: "job-error", title: text, tabindex: "0" }, h("span", { class: "clamp" }, text));
    }
    if (job.state === "canceled") return h("p", { class: "job-note muted" }, "Canceled before it finished.");
    return null;
  }

  renderActions(entry) {
    const { job, live } = entry;
    const p = job.params;
    const actions = h("div", { class: "job-actions" });
    if (!isTerminal(job.state)) {
      actions.append(
        h(
          "button",
          {
            type: "button",
            class: "danger",
            dataset: { action: "cancel" },
            disabled: live.canceling,
            onclick: () => this.cancel(entry),
          },
          live.canceling ? "Canceling…" : "Cancel",
        ),
      );
    }
    actions.append(
      h(
        "button",
        {
          type: "button",
          dataset: { action: "seed" },
          title: `Put seed ${p.seed} in the form`,
          onclick: () => {
            this.form.setSeed(p.seed);
            this.announce(`Seed ${p.seed} is in the form.`);
          },
        },
        "Reuse seed",
      ),
      h(
        "button",
        {
          type: "button",
          dataset: { action: "send" },
          title: "Put every parameter of this job in the form",
          onclick: () => {
            this.form.fill(p);
            this.form.focusPrompt();
            this.announce("Parameters sent to the form.");
          },
        },
        "Send to form",
      ),
      job.images.length
        ? h(
            "button",
            {
              type: "button",
              dataset: { action: "use" },
              title:
                job.images.length > 1
                  ? "Start from the first image (img2img, inpainting); open another image to use that one"
                  : "Start from this image (img2img, inpainting)",
              onclick: () => this.form.useAsInput(job.images[0], `result of seed ${p.seed}`),
            },
            "Use as input",
          )
        : null,
      job.images.length && job.state === "succeeded" && this.upscaler
        ? h(
            "button",
            {
              type: "button",
              dataset: { action: "upscale" },
              title: `Upscale the first image to twice its size with ${this.upscaler}`,
              disabled: entry.upscale && !isTerminal(entry.upscale.state),
              onclick: () => this.upscale(entry),
            },
            "Upscale ×2",
          )
        : null,
      h(
        "button",
        {
          type: "button",
          dataset: { action: "copy" },
          title: "Copy the parameters as the JSON body for POST /v1/jobs",
          onclick: () => this.copy(p),
        },
        "Copy",
      ),
    );
    return actions;
  }

  /** The upscaled image of this card, or its progress, or why it failed. */
  renderUpscale(entry) {
    const up = entry.upscale;
    if (!up) return null;
    if (up.url) {
      return h(
        "div",
        { class: "job-upscale" },
        h("a", { href: up.url, target: "_blank", rel: "noopener" }, h("img", { class: "upscaled", src: up.url, alt: "Upscaled ×2" })),
      );
    }
    if (up.error) return h("p", { class: "job-error job-upscale" }, `Upscale failed: ${up.error}`);
    const percent = Math.round(up.percent ?? 0);
    return h(
      "div",
      { class: "job-upscale job-progress" },
      h(
        "div",
        { class: `progress${up.percent ? "" : " indeterminate"}`, role: "progressbar", "aria-label": "Upscale progress", "aria-valuemin": "0", "aria-valuemax": "100", "aria-valuenow": up.percent ? String(percent) : undefined },
        h("div", { class: "progress-fill", style: { width: `${percent}%` } }),
      ),
      h("p", { class: "progress-text" }, up.percent ? `Upscaling · ${percent}%` : "Upscaling…"),
    );
  }

  /** "Upscale ×2": the first image as a data URL to POST /v1/upscale, followed over SSE to its result. */
  async upscale(entry) {
    const image = entry.job.images[0];
    if (!image || !this.upscaler) return;
    entry.upscale = { state: "queued", percent: 0 };
    this.render(entry);
    const fail = (message) => {
      entry.upscale = { state: "failed", error: message };
      this.render(entry);
      this.announce(`Upscale failed: ${message}`);
    };
    let job;
    try {
      const blob = await api.picture(image.url);
      const data = await new Promise((resolve, reject) => {
        const reader = new FileReader();
        reader.onload = () => resolve(reader.result);
        reader.onerror = () => reject(new Error("The browser could not read the image."));
        reader.readAsDataURL(blob);
      });
      job = await api.upscale({ image: data, upscale: { model: this.upscaler, scale: 2 } });
    } catch (error) {
      return fail(error.message);
    }
    const done = async (state, data) => {
      if (state !== "succeeded") return fail(data?.error ?? (state === "canceled" ? "canceled" : "unknown error"));
      try {
        const finished = await api.upscaleJob(job.id);
        const url = finished.images[0]?.url;
        if (!url) return fail("no image came back");
        entry.upscale = { state, url };
        this.render(entry);
        this.announce("Upscaled.");
      } catch (error) {
        fail(error.message);
      }
    };
    const poll = async () => {
      try {
        const current = await api.upscaleJob(job.id);
        if (isTerminal(current.state)) return done(current.state, current);
      } catch (error) {
        return fail(error.message);
      }
      setTimeout(poll, POLL_ACTIVE_MS);
    };
    if (isTerminal(job.state)) return done(job.state, job);
    followJob(
      job.id,
      (type, data) => {
        if (type === "progress") {
          entry.upscale = { ...entry.upscale, state: "running", percent: data.percent };
          this.render(entry);
        } else if (isTerminal(type)) {
          done(type, data);
        }
      },
      poll,
    );
  }

  updateQueued(entry) {
    const note = entry.el.querySelector(".queue-note");
    if (note) note.textContent = queueText(entry.job, entry.live);
  }

  updateProgress(entry) {
    const bar = entry.el.querySelector(".progress");
    if (!bar) return this.render(entry);
    const percent = Math.round(entry.live.percent ?? 0);
    bar.classList.remove("indeterminate");
    bar.setAttribute("aria-valuemax", String(entry.live.steps));
    bar.setAttribute("aria-valuenow", String(entry.live.step));
    bar.setAttribute("aria-valuetext", progressText(entry.live));
    bar.firstElementChild.style.width = `${percent}%`;
    entry.el.querySelector(".progress-text").textContent = progressText(entry.live);
    this.updateTitle();
  }

  updatePreviews(entry) {
    const slots = entry.el.querySelectorAll(".thumb.placeholder");
    entry.live.previews.forEach((src, index) => {
      const slot = slots[index];
      if (!slot) return;
      let img = slot.querySelector("img.preview");
      if (!img) {
        img = h("img", { class: "preview", alt: `Live preview ${index + 1}` });
        slot.append(img);
      }
      img.src = src;
    });
  }

  async copy(params) {
    const text = JSON.stringify(requestBody(params), null, 2);
    try {
      await navigator.clipboard.writeText(text);
      this.announce("Parameters copied as a JSON request body.");
    } catch {
      this.announce("The browser did not allow copying; use Send to form instead.");
    }
  }

  openLightbox(jobId, index) {
    const items = [];
    let start = 0;
    for (const el of this.list.children) {
      const entry = this.entries.get(el.dataset.jobId);
      if (!entry || entry.job.state !== "succeeded") continue;
      entry.job.images.forEach((image, i) => {
        if (entry.job.id === jobId && i === index) start = items.length;
        items.push({ image, index: i, job: entry.job });
      });
    }
    this.lightbox.open(items, start);
  }
}

function queueText(job, live) {
  const position = job.queue_position;
  const where =
    position === null || position === undefined
      ? "waiting for a worker"
      : position === 0
        ? "next in line"
        : `position ${position + 1} in the queue (${position} ahead)`;
  return live.requeued ? `Back in the queue (${live.requeued}): ${where}.` : `Queued: ${where}.`;
}

function progressText(live) {
  if (!live.step) return "Starting (loading the model if needed)…";
  const parts = [`Step ${live.step} of ${live.steps}`, `${Math.round(live.percent ?? 0)}%`];
  if (live.step < live.steps && Number.isFinite(live.eta)) {
    parts.push(live.eta < 1 ? "almost done" : `about ${formatDuration(live.eta)} left`);
  }
  return parts.join(" · ");
}
