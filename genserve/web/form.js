// The generation form: model-aware size presets, keyboard submit, per-field errors, remembered values,
// the picture in (picture.js) and the hires fix.

import { familyLabel, h, samplerLabel, sizePresets } from "./format.js";
import { ControlsPanel } from "./controls.js";
import { PictureInput } from "./picture.js";

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
const UPSCALER_LABELS = {
  latent: "Latent",
  latent_bilinear: "Latent (bilinear)",
  latent_bicubic: "Latent (bicubic)",
  latent_nearest: "Latent (nearest)",
  latent_antialiased: "Latent (antialiased)",
  lanczos: "Lanczos",
  nearest: "Nearest",
};

/** An API field name ("outpaint.left") as the page's element id ("outpaint-left"). */
const idOf = (field) => field.replaceAll(".", "-");

export class GenerateForm {
  /** @param {HTMLFormElement} form */
  constructor(form, { onSubmit, announce }) {
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
    this.pictureSize = null; // the size a job starts from with a picture in: its own plus outpaint
    this.picture = new PictureInput(form.querySelector("#picture-field"), {
      dropTarget: form,
      onCanvas: (size, options) => this.onPicture(size, options),
      steps: () => Number(this.el.steps.value) || this.modelDefault("steps"),
      announce,
    });
    this.hires = {
      toggle: form.querySelector("#hires"),
      options: form.querySelector("#hires-options"),
      scale: form.querySelector("#hires-scale"),
      steps: form.querySelector("#hires-steps"),
      strength: form.querySelector("#hires-strength"),
      upscaler: form.querySelector("#hires-upscaler"),
      size: form.querySelector("#hires-size"),
    };
    this.resizeField = form.querySelector("#resize-mode-field");
    this.controls = new ControlsPanel(form, { announce });

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
      if (event.target === this.el.steps) this.picture.showStrength();
      this.showHiresSize();
      this.save();
    });
    this.hires.toggle.addEventListener("change", () => {
      this.hires.options.hidden = !this.hires.toggle.checked;
      this.showHiresSize();
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
  setup({ models, schema, schemas = {}, extras = {} }) {
    this.models = models;
    this.controls.setup(extras);
    const props = schema?.properties ?? {};
    this.picture.setDefaults({ strength: props.strength?.default });
    const upscalerSchema = schemas.HiresOptions?.properties?.upscaler;
    const upscalers = (upscalerSchema?.anyOf ?? [upscalerSchema ?? {}]).flatMap((part) => part.enum ?? []);
    this.hires.upscaler.replaceChildren(
      ...(upscalers.length ? upscalers : ["latent"]).map((name) =>
        h("option", { value: name }, UPSCALER_LABELS[name] ?? name),
      ),
    );
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
    this.controls.setFamily(this.model()?.family ?? null);
    // With a picture in, the first choice is its own size: width and height left out of the request.
    const picture = this.pictureSize && { label: "Picture", width: "", height: "", shown: this.pictureSize };
    this.presets.replaceChildren(
      ...(picture ? [picture, ...presets] : presets).map((p) =>
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
          h("span", { class: "chip-size" }, p.shown ? `${p.shown.width}×${p.shown.height}` : `${p.width}×${p.height}`),
        ),
      ),
    );
    if (!keepSize) {
      const same = previous === "Picture" && picture ? picture : (presets.find((p) => p.label === previous) ?? presets[0]);
      if (same) this.choosePreset(same);
    }
    this.syncPresetChoice();
  }

  /** A picture came, went, or its outpaint margins changed: the "Picture" size preset follows it. */
  onPicture(size, { keepSize = true } = {}) {
    const had = this.pictureSize;
    this.pictureSize = size;
    for (const name of ["width", "height"]) this.el[name].placeholder = size ? String(size[name]) : "";
    this.applyModel({ keepSize: true });
    if (size && !keepSize) this.choosePreset({ width: "", height: "" }); // the picture's own size
    if (!size && had && (!this.el.width.value || !this.el.height.value)) {
      this.choosePreset(sizePresets(this.model())[0]);
    }
    this.showHiresSize();
  }

  showHiresSize() {
    const scale = Number(this.hires.scale.value);
    const width = Number(this.el.width.value) || this.pictureSize?.width || this.model()?.native_width;
    const height = Number(this.el.height.value) || this.pictureSize?.height || this.model()?.native_height;
    const round8 = (value) => Math.round(value / 8) * 8;
    this.hires.size.textContent =
      scale > 1 && width && height
        ? `${width}×${height}, then ${round8(width * scale)}×${round8(height * scale)}.`
        : "";
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
    // The resize mode matters only when a picture meets a size of its own.
    this.resizeField.hidden = !this.pictureSize || key === "x";
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
    if (this.picture.has()) {
      const mode = this.form.querySelector("#resize_mode").value;
      if (mode !== "resize") body.resize_mode = mode;
    }
    if (this.hires.toggle.checked) {
      const number = (el) => (el.value.trim() === "" ? undefined : Number(el.value));
      body.hires = { scale: number(this.hires.scale), steps: number(this.hires.steps), strength: number(this.hires.strength) };
      if (this.hires.upscaler.value !== "latent") body.hires.upscaler = this.hires.upscaler.value;
      for (const [key, value] of Object.entries(body.hires)) if (value === undefined) delete body.hires[key];
    }
    return body;
  }

  /** The whole POST /v1/jobs body: the fields above and the picture's (uploaded first if need be). */
  async body() {
    return { ...this.read(), ...this.controls.fields(), ...(await this.picture.fields()) };
  }

  /** Number fields whose text the browser could not read as a number (the API never sees it). */
  inputErrors() {
    return [...this.form.querySelectorAll("input[type=number]")]
      .filter((input) => input.validity.badInput && !input.closest("[hidden]"))
      .map((input) => ({ field: input.name, message: "Must be a number." }));
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
    this.form.querySelector("#resize_mode").value = params.resize_mode ?? "resize";
    const hires = params.hires;
    this.hires.toggle.checked = Boolean(hires);
    this.hires.options.hidden = !hires;
    if (hires) {
      const scale = hires.scale ?? (hires.width && params.width ? hires.width / params.width : 2);
      this.hires.scale.value = Math.round(scale * 100) / 100;
      this.hires.steps.value = hires.steps ?? "";
      this.hires.strength.value = hires.strength ?? 0.55;
      this.hires.upscaler.value = hires.upscaler ?? "latent";
    }
    this.controls.fill(params);
    this.syncPresetChoice();
    this.showHiresSize();
    this.clearErrors();
    this.save();
    this.picture.fill(params).catch((error) => this.showErrors([{ field: "init_image", message: error.message }]));
  }

  /** "Use as input": a result image into the picture slot, and the form into view. */
  async useAsInput(image, label) {
    this.picture.root.scrollIntoView({ block: "nearest" });
    this.picture.fileInput.focus({ preventScroll: true });
    await this.picture.useUrl(image.url, { label });
    if (this.picture.has()) this.picture.announce("The image is the input picture now.");
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
      const { box, input, label } = this.errorPlace(field);
      if (!box || !input || input.closest("[hidden]")) {
        general.push(message);
        continue;
      }
      const text = label ? `${label}: ${message.charAt(0).toLowerCase()}${message.slice(1)}` : message;
      box.textContent = box.textContent ? `${box.textContent} ${text}` : text;
      box.hidden = false;
      input.setAttribute("aria-invalid", "true");
      input.closest("details")?.setAttribute("open", "");
      if (!first || first.compareDocumentPosition(input) & Node.DOCUMENT_POSITION_PRECEDING) first = input;
    }
    if (!fields.length && fallback) general.push(fallback);
    if (general.length) this.showFormError(general.join(" "));
    (first ?? this.formError).focus?.();
  }

  /**
   * Where an error about `field` shows: its own box, else its group's ("outpaint.left" under the
   * outpaint options, naming Left); the input it marks and focuses.
   */
  errorPlace(field) {
    if (!field) return {};
    const byId = (id) => this.form.querySelector(`#${CSS.escape(id)}`);
    const input = this.el[field] ?? byId(idOf(field));
    const own = byId(`${idOf(field)}-error`);
    if (own) return { box: own, input: input ?? own.closest("fieldset, details, .field")?.querySelector("input, select") };
    const group = field.includes(".") ? field.split(".")[0] : null;
    const box = group && byId(`${group}-error`);
    if (!box) return {};
    const label = input ? this.form.querySelector(`label[for="${CSS.escape(input.id)}"]`)?.textContent.trim() : null;
    return { box, input: input ?? box.closest("fieldset, details")?.querySelector("input, select"), label };
  }

  showFormError(message) {
    this.formError.textContent = message;
    this.formError.hidden = !message;
  }

  clearError(field) {
    if (!field) return;
    const names = field.includes(".") ? [field, field.split(".")[0]] : [field];
    for (const name of names) {
      const box = this.form.querySelector(`#${CSS.escape(idOf(name))}-error`);
      if (box) {
        box.textContent = "";
        box.hidden = true;
      }
    }
    (this.el[field] ?? this.form.querySelector(`#${CSS.escape(idOf(field))}`))?.removeAttribute("aria-invalid");
    this.showFormError("");
  }

  clearErrors() {
    for (const box of this.form.querySelectorAll(".error[id$='-error']")) {
      if (box === this.formError) continue;
      box.textContent = "";
      box.hidden = true;
    }
    for (const input of this.form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
    this.showFormError("");
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
    // Saved while a picture gave the size: without the picture, the model's native size again.
    if (!this.pictureSize && (!this.el.width.value || !this.el.height.value)) {
      this.choosePreset(sizePresets(this.model())[0]);
    }
    this.syncPresetChoice();
  }
}
