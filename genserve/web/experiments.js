// Experiments tab: an A/B experiment's spec (written from a few fields, or pasted as YAML or JSON) is
// sent to POST /v1/experiments/text, followed with GET /v1/experiments/{id} and, once done, its
// self-contained HTML report is shown in a frame (the same page `genserve ab` writes).

import { api } from "./api.js";
import { h } from "./format.js";

const POLL_MS = 1000;
const NAMES = "ABCDEFGHIJKLMNOPQRSTUVWXYZ";

/** YAML for the fields: each prompt line a variant (A, B, ...), the shared settings in `base`. */
export function specText({ name, prompts, seeds, steps, size, target }) {
  const quote = (text) => JSON.stringify(text); // a JSON string is a YAML string
  const lines = [`name: ${quote(name || "experiment")}`, "base:"];
  if (size) lines.push(`  size: ${quote(size)}`);
  lines.push(`  steps: ${Number(steps) || 20}`, "variants:");
  prompts.slice(0, NAMES.length).forEach((prompt, i) => lines.push(`  - {name: ${NAMES[i]}, prompt: ${quote(prompt)}}`));
  lines.push(`seeds: ${Number(seeds) || 4}`);
  if (target) lines.push(`target: ${quote(target)}`);
  return `${lines.join("\n")}\n`;
}

export class ExperimentLab {
  /** @param {{form: HTMLFormElement, text: HTMLTextAreaElement, status: HTMLElement, error: HTMLElement,
   *  progress: HTMLProgressElement, frame: HTMLIFrameElement, link: HTMLAnchorElement, list: HTMLElement,
   *  announce: (m: string) => void, onUnauthorized: (e: Error) => void}} parts */
  constructor(parts) {
    Object.assign(this, parts);
    this.timer = null;
    this.started = false;
    this.form.querySelector("[data-action=write]").addEventListener("click", () => this.writeSpec());
    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.run();
    });
    if (!this.text.value.trim()) this.writeSpec();
  }

  /** The first time the tab opens: the recent experiments. */
  start() {
    if (this.started) return;
    this.started = true;
    this.refreshList();
  }

  fields() {
    const value = (name) => this.form.elements[name].value.trim();
    return {
      name: value("experiment_name"),
      prompts: value("experiment_prompts").split("\n").map((line) => line.trim()).filter(Boolean),
      seeds: value("experiment_seeds"),
      steps: value("experiment_steps"),
      size: value("experiment_size"),
      target: value("experiment_target"),
    };
  }

  writeSpec() {
    this.text.value = specText(this.fields());
  }

  fail(message) {
    this.error.textContent = message;
    this.error.hidden = false;
  }

  async run() {
    this.error.hidden = true;
    clearTimeout(this.timer);
    try {
      const experiment = await api.submitExperimentText(this.text.value);
      this.announce(`Experiment started: ${experiment.counts.total} images.`);
      this.follow(experiment);
      this.refreshList();
    } catch (error) {
      if (error.status === 401) return this.onUnauthorized(error);
      const lines = error.fields?.length ? error.fields.map((f) => f.message) : [error.message];
      this.fail(lines.join("\n"));
      this.status.textContent = `${lines.length} problem${lines.length === 1 ? "" : "s"} in the spec.`;
    }
  }

  /** Show an experiment's progress until it is done, then its report. */
  follow(experiment) {
    clearTimeout(this.timer);
    const { counts } = experiment;
    const finished = (counts.succeeded ?? 0) + (counts.failed ?? 0) + (counts.canceled ?? 0);
    this.progress.max = counts.total;
    this.progress.value = finished;
    this.progress.hidden = false;
    const failed = counts.failed ? ` · ${counts.failed} failed` : "";
    this.status.textContent = `${experiment.name}: ${finished} / ${counts.total} images${failed}`;
    this.link.href = experiment.report_url;
    this.link.hidden = false;
    if (experiment.done) {
      this.status.textContent += " · done";
      this.frame.src = `${experiment.report_url}?t=${Date.now()}`;
      this.frame.hidden = false;
      this.announce("Experiment done: the report is below.");
      this.refreshList();
      return;
    }
    this.timer = setTimeout(async () => {
      try {
        this.follow(await api.experiment(experiment.id));
      } catch (error) {
        this.fail(error.message);
      }
    }, POLL_MS);
  }

  async refreshList() {
    try {
      const recent = await api.experiments();
      this.list.replaceChildren(
        ...recent.slice(0, 10).map((experiment) =>
          h("li", {},
            h("button", { type: "button", class: "link-button", onclick: () => this.follow(experiment) }, experiment.name),
            h("span", { class: "muted" }, ` ${experiment.variants.length} × ${experiment.seeds.length}`,
              experiment.done ? "" : " · running")),  // prettier-ignore
        ),
      );
    } catch {
      // the list is a convenience; the form still works
    }
  }
}
