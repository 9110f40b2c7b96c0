// Extras of the image form, each in a collapsed panel: LoRAs (GET /v1/loras), ControlNet units
// (GET /v1/controls, GET /v1/preprocessors, POST /v1/preprocess for a preview of the map) and an
// IP-Adapter reference picture. Only what fits the chosen model's family is offered. Pictures go to
// POST /v1/uploads as soon as they are chosen, and the job names them by their upload id.

import { api } from "./api.js";
import { h } from "./format.js";

const MAX_UNITS = 4; // genserve.schemas.control.MAX_CONTROL_UNITS

/** A number input's value, or `fallback` when it is empty. */
const numberOf = (input, fallback) => (input.value.trim() === "" ? fallback : Number(input.value));

export class ControlsPanel {
  /** @param {HTMLFormElement} form  @param {{announce: Function, onChange: Function}} options */
  constructor(form, { announce, onChange }) {
    this.form = form;
    this.announce = announce;
    this.onChange = onChange;
    const $ = (selector) => form.querySelector(selector);
    this.loraList = $("#lora-list");
    this.loraSelect = $("#lora-choice");
    this.loraAdd = $("#lora-add");
    this.loraCount = $("#loras-count");
    this.unitList = $("#controlnet-units");
    this.unitAdd = $("#controlnet-add");
    this.unitCount = $("#controlnets-count");
    this.ip = {
      model: $("#ip_adapter-model"),
      file: $("#ip_adapter-image"),
      scale: $("#ip_adapter-scale"),
      thumb: $("#ip_adapter-thumb"),
      count: $("#ip_adapter-count"),
      error: $("#ip_adapter-error"),
    };
    this.family = null;
    this.loras = [];
    this.controls = [];
    this.preprocessors = ["none"];
    this.chosenLoras = []; // [{name, weight, el}]
    this.units = []; // [{el, model, preprocessor, scale, start, end, thumb, map, image: {id, url}|null}]
    this.ipImage = null; // {id, url}

    this.loraAdd.addEventListener("click", () => {
      if (this.loraSelect.value) this.addLora(this.loraSelect.value, 1);
    });
    this.unitAdd.addEventListener("click", () => this.addUnit());
    this.ip.file.addEventListener("change", async () => {
      const file = this.ip.file.files?.[0];
      this.ip.file.value = "";
      if (!file) return;
      this.ipImage = await this.upload(file, "ip_adapter");
      this.ip.thumb.replaceChildren(...(this.ipImage ? [h("img", { src: this.ipImage.url, alt: "IP-Adapter reference" })] : []));
      this.showCounts();
    });
    this.ip.model.addEventListener("change", () => this.showCounts());
  }

  /** What the server offers: LoRAs, control models, preprocessor names. */
  setup({ loras = [], controls = [], preprocessors = null }) {
    this.loras = loras.filter((lora) => lora.supported !== false);
    this.controls = controls;
    const names = preprocessors ? [...preprocessors.weight_free, ...preprocessors.annotators] : [];
    this.preprocessors = ["none", ...names.filter((name) => name !== "none")];
    this.setFamily(this.family);
  }

  /** The model changed: offer what runs with its family, and drop what does not. */
  setFamily(family) {
    this.family = family;
    const fits = (item) => !family || item.family === family;
    const loras = this.loras.filter(fits);
    this.loraSelect.replaceChildren(...loras.map((lora) => h("option", { value: lora.name }, lora.name)));
    this.loraAdd.disabled = !loras.length;
    for (const chosen of [...this.chosenLoras]) if (!loras.some((l) => l.name === chosen.name)) this.removeLora(chosen);
    this.form.querySelector("#loras-details").hidden = !loras.length;

    const units = this.controlsOf(["controlnet", "t2i_adapter"]);
    this.form.querySelector("#controlnets-details").hidden = !units.length;
    for (const unit of this.units) this.fillModels(unit.model, units);
    if (!units.length) for (const unit of [...this.units]) this.removeUnit(unit);

    const adapters = this.controlsOf(["ipadapter"]);
    const previous = this.ip.model.value;
    this.ip.model.replaceChildren(
      h("option", { value: "" }, "Off"),
      ...adapters.map((c) => h("option", { value: c.name }, c.name)),
    );
    this.ip.model.value = adapters.some((c) => c.name === previous) ? previous : "";
    this.form.querySelector("#ip_adapter-details").hidden = !adapters.length;
    this.showCounts();
  }

  controlsOf(kinds) {
    return this.controls.filter((c) => kinds.includes(c.kind) && (!this.family || c.family === this.family));
  }

  fillModels(select, controls) {
    const previous = select.value;
    select.replaceChildren(...controls.map((c) => h("option", { value: c.name }, c.name)));
    if (controls.some((c) => c.name === previous)) select.value = previous;
  }

  // LoRAs ------------------------------------------------------------------------------------------

  addLora(name, weight) {
    const existing = this.chosenLoras.find((chosen) => chosen.name === name);
    if (existing) {
      existing.slider.value = weight;
      existing.output.value = Number(weight).toFixed(2);
      return;
    }
    const id = `lora-weight-${this.chosenLoras.length}-${Date.now()}`;
    const output = h("output", { for: id }, Number(weight).toFixed(2));
    const slider = h("input", {
      id,
      type: "range",
      min: "-2",
      max: "2",
      step: "0.05",
      value: String(weight),
      "aria-label": `Weight of ${name}`,
      oninput: () => {
        output.value = Number(slider.value).toFixed(2);
      },
    });
    const chosen = { name, slider, output };
    chosen.el = h(
      "li",
      { class: "lora-item", dataset: { lora: name } },
      h("div", { class: "label-row" }, h("label", { for: id }, name), output),
      h("div", { class: "lora-row" }, slider, h("button", { type: "button", class: "small", "aria-label": `Remove ${name}`, onclick: () => this.removeLora(chosen) }, "Remove")),
    );
    this.chosenLoras.push(chosen);
    this.loraList.append(chosen.el);
    this.clearError("loras");
    this.showCounts();
  }

  removeLora(chosen) {
    chosen.el.remove();
    this.chosenLoras = this.chosenLoras.filter((other) => other !== chosen);
    this.showCounts();
  }

  // ControlNet units -------------------------------------------------------------------------------

  addUnit() {
    if (this.units.length >= MAX_UNITS) return;
    const n = this.units.length;
    const id = (name) => `controlnet-${n}-${name}`;
    const number = (name, attrs) =>
      h("div", { class: "field compact" }, h("label", { for: id(name) }, name.charAt(0).toUpperCase() + name.slice(1)), h("input", { id: id(name), type: "number", inputmode: "decimal", step: "0.05", ...attrs }));
    const unit = { image: null };
    unit.model = h("select", { id: id("model") });
    unit.preprocessor = h("select", { id: id("preprocessor") }, ...this.preprocessors.map((name) => h("option", { value: name }, name)));
    unit.preprocessor.value = this.preprocessors.includes("canny") ? "canny" : "none";
    unit.file = h("input", { id: id("image"), type: "file", accept: "image/png,image/jpeg,image/webp" });
    unit.thumb = h("div", { class: "control-thumbs" });
    unit.previewButton = h("button", { type: "button", class: "small", disabled: true, onclick: () => this.previewMap(unit) }, "Preview map");
    unit.el = h(
      "li",
      { class: "control-unit", dataset: { unit: String(n) } },
      h("div", { class: "field compact" }, h("label", { for: id("model") }, "Control model"), unit.model),
      h("div", { class: "field compact" }, h("label", { for: id("image") }, "Control picture"), unit.file),
      h("div", { class: "field compact" }, h("label", { for: id("preprocessor") }, "Preprocessor"), unit.preprocessor),
      h("div", { class: "grid-3" }, number("scale", { min: "0", max: "4", value: "1" }), number("start", { min: "0", max: "1", value: "0" }), number("end", { min: "0", max: "1", value: "1" })),
      h("div", { class: "control-actions" }, unit.previewButton, h("button", { type: "button", class: "small", onclick: () => this.removeUnit(unit) }, "Remove unit")),
      unit.thumb,
    );
    [unit.scale, unit.start, unit.end] = ["scale", "start", "end"].map((name) => unit.el.querySelector(`#${id(name)}`));
    this.fillModels(unit.model, this.controlsOf(["controlnet", "t2i_adapter"]));
    unit.file.addEventListener("change", async () => {
      const file = unit.file.files?.[0];
      unit.file.value = "";
      if (!file) return;
      unit.image = await this.upload(file, "controlnets");
      unit.previewButton.disabled = !unit.image;
      unit.thumb.replaceChildren(...(unit.image ? [h("img", { class: "control-picture", src: unit.image.url, alt: "Control picture" })] : []));
      this.showCounts();
    });
    unit.preprocessor.addEventListener("change", () => unit.thumb.querySelector(".control-map")?.remove());
    this.units.push(unit);
    this.unitList.append(unit.el);
    this.unitAdd.disabled = this.units.length >= MAX_UNITS;
    this.showCounts();
    unit.model.focus();
  }

  removeUnit(unit) {
    unit.el.remove();
    this.units = this.units.filter((other) => other !== unit);
    this.unitAdd.disabled = false;
    this.showCounts();
  }

  /** POST /v1/preprocess: the map the unit's preprocessor makes of its picture, beside the picture. */
  async previewMap(unit) {
    if (!unit.image) return;
    this.clearError("controlnets");
    unit.thumb.querySelector(".control-map")?.remove();
    if (unit.preprocessor.value === "none") {
      unit.thumb.append(h("img", { class: "control-map", src: unit.image.url, alt: "Control map (the picture as it is)" }));
      return;
    }
    unit.previewButton.disabled = true;
    unit.previewButton.setAttribute("aria-busy", "true");
    try {
      const blob = await api.preprocess({ image: unit.image.id, preprocessor: unit.preprocessor.value });
      if (unit.mapUrl) URL.revokeObjectURL(unit.mapUrl);
      unit.mapUrl = URL.createObjectURL(blob);
      unit.thumb.append(h("img", { class: "control-map", src: unit.mapUrl, alt: `Control map (${unit.preprocessor.value})` }));
      this.announce("Control map ready.");
    } catch (error) {
      this.showError("controlnets", error.fields?.map((f) => f.message).join(" ") || error.message);
    } finally {
      unit.previewButton.disabled = false;
      unit.previewButton.removeAttribute("aria-busy");
    }
  }

  // Pictures, errors, the request -------------------------------------------------------------------

  async upload(file, field) {
    this.clearError(field);
    try {
      const stored = await api.upload(file, file.name || "picture.png");
      return { id: stored.id, url: URL.createObjectURL(file) };
    } catch (error) {
      this.showError(field, error.fields?.map((f) => f.message).join(" ") || error.message);
      return null;
    }
  }

  showError(field, message) {
    const box = this.form.querySelector(`#${field}-error`);
    box.textContent = message;
    box.hidden = false;
    box.closest("details")?.setAttribute("open", "");
  }

  clearError(field) {
    const box = this.form.querySelector(`#${field}-error`);
    box.textContent = "";
    box.hidden = true;
  }

  showCounts() {
    const count = (el, n) => {
      el.textContent = n ? `(${n})` : "";
    };
    count(this.loraCount, this.chosenLoras.length);
    count(this.unitCount, this.units.filter((u) => u.image).length);
    this.ip.count.textContent = this.ip.model.value && this.ipImage ? "(on)" : "";
    this.onChange?.();
  }

  /** The request's loras, controlnets and ip_adapter; what is not set up is left out. */
  fields() {
    const body = {};
    if (this.chosenLoras.length) {
      body.loras = this.chosenLoras.map((chosen) => ({ name: chosen.name, weight: Number(chosen.slider.value) }));
    }
    const units = this.units.filter((unit) => unit.image && unit.model.value);
    if (units.length) {
      body.controlnets = units.map((unit) => ({
        model: unit.model.value,
        image: unit.image.id,
        preprocessor: unit.preprocessor.value,
        scale: numberOf(unit.scale, 1),
        start: numberOf(unit.start, 0),
        end: numberOf(unit.end, 1),
      }));
    }
    if (this.ip.model.value && this.ipImage) {
      body.ip_adapter = { model: this.ip.model.value, images: [this.ipImage.id], scale: numberOf(this.ip.scale, 0.6) };
    }
    return body;
  }

  /** "Send to form": a job's LoRAs back into the panel (its pictures stay as they are). */
  fill(params) {
    for (const chosen of [...this.chosenLoras]) this.removeLora(chosen);
    for (const ref of params.loras ?? []) {
      if (this.loras.some((lora) => lora.name === ref.name)) this.addLora(ref.name, ref.weight ?? 1);
    }
  }
}
