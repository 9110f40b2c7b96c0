// The generation form: model-aware size presets, keyboard submit, per-field errors, remembered values.

import { familyLabel, h, samplerLabel, sizePresets } from "./format.js";

const FIELDS = [
  "prompt",
  "negative_prompt",
  "model",
  "width",
  "height",
  "steps",
  "cfg_scale",
  "sampler",
  "num_images",
  "seed",
  "preview_every",
  "priority",
];
const NUMBER_FIELDS = new Set(["width", "height", "steps", "cfg_scale", "num_images", "seed", "preview_every", "priority"]);
// Fields whose default comes with the model (GET /v1/models), else from the API contract. They follow
// the model as it changes, unless the user has set them to something else.
const MODEL_DEFAULTS = { cfg_scale: "default_cfg_scale", steps: "default_steps", sampler: "default_sampler" };
const STORAGE_KEY = "genserve.form.v1";

export class GenerateForm {
  /** @param {HTMLFormElement} form */
  constructor(form, { onSubmit }) {
    this.form = form;
    this.models = [];
    this.lastSeed = null;
    this.baseDefaults = { steps: 20, cfg_scale: 7, sampler: "euler" };
    /** Model-default fields the user has set to a value of their own (see MODEL_DEFAULTS). */
    this.ownValues = new Set();
    this.restored = false; // nothing is saved before the remembered values are read back
    this.el = Object.fromEntries(FIELDS.map((name) => [name, form.elements.namedItem(name)]));
    this.presets = form.querySelector("#size-presets");
    this.formError = form.querySelector("#form-error");
    this.submitButton = form.querySelector("#generate");
    this.lastSeedButton = form.querySelector("#seed-last");

    form.addEventListener("submit", (event) => {
      event.preventDefault();
      onSubmit();
    });
    // Enter generates from the prompt (Shift+Enter is a new line); Ctrl/Cmd+Enter from anywhere in the form.
    this.el.prompt.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.altKey && !event.isComposing) {
        event.preventDefault();
        form.requestSubmit();
      }
    });
    form.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        form.requestSubmit();
      }
    });
    form.addEventListener("input", (event) => {
      this.clearError(event.target.name);
      this.noteOwnValue(event.target.name);
      if (event.target === this.el.width || event.target === this.el.height) this.syncPresetChoice();
      this.save();
    });
    form.addEventListener("change", (event) => {
      if (event.target !== this.el.model) this.noteOwnValue(event.target.name);
      this.save();
    });
    this.el.model.addEventListener("change", () => this.onModelChange());
    form.querySelector("#swap-size").addEventListener("click", () => {
      [this.el.width.value, this.el.height.value] = [this.el.height.value, this.el.width.value];
      this.syncPresetChoice();
      this.clearError("width");
      this.clearError("height");
      this.save();
    });
    form.querySelector("#seed-random").addEventListener("click", () => {
      this.el.seed.value = "";
      this.clearError("seed");
      this.save();
    });
    this.lastSeedButton.addEventListener("click", () => {
      if (this.lastSeed !== null) this.setSeed(this.lastSeed);
    });
  }

  /** Fill the pickers from /v1/models and the OpenAPI contract, then restore the last-used values. */
  setup({ models, schema }) {
    this.models = models;
    const props = schema?.properties ?? {};
    const samplers = props.sampler?.enum ?? ["euler"];
    this.el.sampler.replaceChildren(...samplers.map((name) => h("option", { value: name }, samplerLabel(name))));
    this.el.model.replaceChildren(
      ...models.map((m) =>
        h(
          "option",
          { value: m.name },
          `${m.name} — ${familyLabel(m.family)}, ${m.native_width}×${m.native_height}${m.loaded ? ", loaded" : ""}`,
        ),
      ),
    );
    if (!props.preview_every) this.form.querySelector("#preview-every-field").hidden = true;
    const defaults = { steps: 20, cfg_scale: 7, sampler: samplers[0], num_images: 1 };
    for (const key of Object.keys(defaults)) {
      if (props[key]?.default != null) defaults[key] = props[key].default;
      this.el[key].value = defaults[key];
    }
    this.baseDefaults = { steps: defaults.steps, cfg_scale: defaults.cfg_scale, sampler: defaults.sampler };
    const fallback = models.find((m) => m.default) ?? models[0];
    if (fallback) this.el.model.value = fallback.name;
    this.applyModel({ keepSize: false });
    this.applyModelDefaults();
    this.restore();
    this.restored = true;
  }

  /** What `name` is for the chosen model when the user has not set it: the model's, else the API's. */
  modelDefault(name) {
    return this.model()?.[MODEL_DEFAULTS[name]] ?? this.baseDefaults[name];
  }

  /** Each model has its own best settings (the built-in shapes model draws best at a CFG of 4). */
  applyModelDefaults() {
    for (const name of Object.keys(MODEL_DEFAULTS)) {
      if (this.ownValues.has(name)) continue;
      const value = String(this.modelDefault(name));
      if (name === "sampler" && ![...this.el.sampler.options].some((o) => o.value === value)) continue;
      this.el[name].value = value;
      this.clearError(name);
    }
  }

  /** A value the user typed is theirs, unless it is the model's default (then it follows the model). */
  noteOwnValue(name) {
    if (!(name in MODEL_DEFAULTS)) return;
    const raw = this.el[name].value.trim();
    const fallback = this.modelDefault(name);
    const same = raw === "" || (NUMBER_FIELDS.has(name) ? Number(raw) === Number(fallback) : raw === String(fallback));
    if (same) this.ownValues.delete(name);
    else this.ownValues.add(name);
  }

  model() {
    return this.models.find((m) => m.name === this.el.model.value);
  }

  onModelChange() {
    this.clearError("model");
    this.applyModel({ keepSize: false });
    this.applyModelDefaults();
    this.save();
  }

  /** New model: its family's presets; the size moves to the same aspect ratio at the new native size. */
  applyModel({ keepSize }) {
    const previous = this.presets.querySelector("input:checked")?.dataset.label ?? "1:1";
    const presets = sizePresets(this.model());
    this.presets.replaceChildren(
      ...presets.map((p) =>
        h(
          "label",
          { class: "chip" },
          h("input", {
            type: "radio",
            name: "size-preset",
            value: `${p.width}x${p.height}`,
            dataset: { label: p.label, width: p.width, height: p.height },
            onchange: () => this.choosePreset(p),
          }),
          h("span", { class: "chip-ratio" }, p.label),
          h("span", { class: "chip-size" }, `${p.width}×${p.height}`),
        ),
      ),
    );
    if (!keepSize) {
      const same = presets.find((p) => p.label === previous) ?? presets[0];
      if (same) this.choosePreset(same);
    }
    this.syncPresetChoice();
  }

  choosePreset(preset) {
    this.el.width.value = preset.width;
    this.el.height.value = preset.height;
    this.clearError("width");
    this.clearError("height");
    this.syncPresetChoice();
    this.save();
  }

  syncPresetChoice() {
    const key = `${this.el.width.value}x${this.el.height.value}`;
    for (const radio of this.presets.querySelectorAll("input")) radio.checked = radio.value === key;
  }

  /** The POST /v1/jobs body. Empty fields are left out, so the server's defaults apply. */
  read() {
    const body = {};
    for (const name of FIELDS) {
      const el = this.el[name];
      if (!el || el.closest("[hidden]")) continue;
      const raw = el.value.trim();
      if (raw === "") continue;
      body[name] = NUMBER_FIELDS.has(name) ? Number(raw) : el.value;
    }
    if (body.negative_prompt === undefined) body.negative_prompt = "";
    if (body.priority === 0) delete body.priority;
    return body;
  }

  /** Number fields whose text the browser could not read as a number (the API never sees it). */
  inputErrors() {
    return FIELDS.filter((name) => this.el[name]?.validity?.badInput).map((field) => ({
      field,
      message: "Must be a number.",
    }));
  }

  /** "Send to form": every parameter of a job back into the form. */
  fill(params) {
    if (params.model && this.models.some((m) => m.name === params.model)) {
      this.el.model.value = params.model;
      this.applyModel({ keepSize: true });
    }
    for (const name of FIELDS) {
      if (name === "model" || params[name] === undefined || params[name] === null || !this.el[name]) continue;
      this.el[name].value = params[name];
    }
    // The job's values are the user's choice where they differ from the model's defaults.
    for (const name of Object.keys(MODEL_DEFAULTS)) this.noteOwnValue(name);
    this.syncPresetChoice();
    this.clearErrors();
    this.save();
  }

  setSeed(seed) {
    this.el.seed.value = seed;
    this.clearError("seed");
    this.save();
  }

  setLastSeed(seed) {
    this.lastSeed = seed;
    this.lastSeedButton.disabled = seed === null;
    this.lastSeedButton.title = seed === null ? "No result yet" : `Use seed ${seed} from the last job`;
  }

  setBusy(busy) {
    this.submitButton.disabled = busy;
    this.submitButton.setAttribute("aria-busy", String(busy));
  }

  focusPrompt() {
    this.el.prompt.focus();
  }

  // Errors -----------------------------------------------------------------------------------------

  /** Show 422 errors next to their fields; anything without a field goes above the button. */
  showErrors(fields, fallback = "") {
    this.clearErrors();
    const general = [];
    let first = null;
    for (const { field, message } of fields) {
      const box = this.form.querySelector(`#${CSS.escape(field)}-error`);
      const input = this.el[field];
      if (!box || !input || input.closest("[hidden]")) {
        general.push(message);
        continue;
      }
      box.textContent = box.textContent ? `${box.textContent} ${message}` : message;
      box.hidden = false;
      input.setAttribute("aria-invalid", "true");
      input.closest("details")?.setAttribute("open", "");
      if (!first || first.compareDocumentPosition(input) & Node.DOCUMENT_POSITION_PRECEDING) first = input;
    }
    if (!fields.length && fallback) general.push(fallback);
    if (general.length) this.showFormError(general.join(" "));
    (first ?? this.formError).focus?.();
  }

  showFormError(message) {
    this.formError.textContent = message;
    this.formError.hidden = !message;
  }

  clearError(field) {
    if (!field) return;
    const box = this.form.querySelector(`#${CSS.escape(field)}-error`);
    if (box) {
      box.textContent = "";
      box.hidden = true;
    }
    this.el[field]?.removeAttribute("aria-invalid");
    this.showFormError("");
  }

  clearErrors() {
    for (const name of FIELDS) this.clearError(name);
  }

  // Remembered values ------------------------------------------------------------------------------

  save() {
    if (!this.restored) return;
    const values = Object.fromEntries(FIELDS.map((name) => [name, this.el[name]?.value ?? ""]));
    values.own_values = [...this.ownValues];
    try {
      localStorage.setItem(STORAGE_KEY, JSON.stringify(values));
    } catch {
      // Private mode or storage full: remembering the form is a convenience only.
    }
  }

  restore() {
    let values;
    try {
      values = JSON.parse(localStorage.getItem(STORAGE_KEY) ?? "null");
    } catch {
      values = null;
    }
    if (!values) return;
    if (values.model && this.models.some((m) => m.name === values.model)) {
      this.el.model.value = values.model;
      this.applyModel({ keepSize: true });
    }
    // Saved before the form told the user's values from the model's defaults: the old global default
    // (CFG 7) was never the user's choice, anything else that differs from the model's default was.
    const legacy = !Array.isArray(values.own_values);
    const own = new Set(legacy ? [] : values.own_values.filter((name) => name in MODEL_DEFAULTS));
    for (const name of FIELDS) {
      if (name === "model" || values[name] === undefined || !this.el[name]) continue;
      if (name === "sampler" && ![...this.el.sampler.options].some((o) => o.value === values.sampler)) continue;
      if (name in MODEL_DEFAULTS) {
        const raw = String(values[name]).trim();
        const notOld = !(name === "cfg_scale" && Number(raw) === 7) && !(name === "steps" && Number(raw) === 20);
        if (legacy && raw !== "" && notOld && raw !== String(this.modelDefault(name))) own.add(name);
        if (!own.has(name)) continue;
      }
      this.el[name].value = values[name];
    }
    this.ownValues = own;
    this.applyModelDefaults();
    this.syncPresetChoice();
  }
}
