// Pictures in: the input slot (choose, drop, paste, or "Use as input" on a result), the mask painter,
// strength, and the inpaint and outpaint options. A picture goes to POST /v1/uploads once, and the job
// names it by its upload id; the mask is uploaded when the job is sent, white where it should change.

import { ApiError, api } from "./api.js";

const ACCEPTED = new Set(["image/png", "image/jpeg", "image/webp"]); // what the server takes as it is
const STAGE_MAX_HEIGHT = 300;
const SIDES = ["left", "top", "right", "bottom"];
const FORMAT_LABELS = { png: "PNG", jpeg: "JPEG", webp: "WebP" };

export class PictureInput {
  /**
   * @param {HTMLFieldSetElement} root the picture fieldset
   * @param {{dropTarget: HTMLElement, onCanvas: Function, steps: Function, announce: Function}} options
   *   onCanvas(size, {keepSize}) gets the size the job starts from (picture plus outpaint margins),
   *   or null when the picture is removed.
   */
  constructor(root, { dropTarget, onCanvas, steps, announce }) {
    this.root = root;
    this.onCanvas = onCanvas;
    this.steps = steps;
    this.announce = announce;
    const $ = (selector) => root.querySelector(selector);
    this.fileInput = $("#init_image");
    this.dropzone = $("#dropzone");
    this.editor = $("#picture-editor");
    this.stage = $("#picture-stage");
    this.frame = $("#picture-frame");
    this.image = $("#picture-image");
    this.canvas = $("#mask");
    this.ctx = this.canvas.getContext("2d", { willReadFrequently: true });
    this.cursor = $("#brush-cursor");
    this.info = $("#picture-info");
    this.mode = $("#picture-mode");
    this.brush = $("#brush-size");
    this.brushValue = $("#brush-size-value");
    this.strength = $("#strength");
    this.strengthValue = $("#strength-value");
    this.strengthHint = $("#strength-hint");
    this.error = $("#init_image-error");
    this.inpaint = {
      mask_blur: $("#inpaint-mask_blur"),
      fill: $("#inpaint-fill"),
      only_masked: $("#inpaint-only_masked"),
      only_masked_padding: $("#inpaint-only_masked_padding"),
    };
    this.outpaint = Object.fromEntries([...SIDES, "feather"].map((name) => [name, $(`#outpaint-${name}`)]));

    /** @type {null | {ref: string|null, width: number, height: number, format: string, url: string, label: string}} */
    this.picture = null;
    this.pending = null; // the picture's upload, while in flight
    this.generation = 0; // a newer picture wins over an older one still uploading
    this.hasMask = false;
    this.maskVersion = 0;
    this.maskUpload = null; // {version, ref}: the mask as last uploaded
    this.drawing = null;

    this.fileInput.addEventListener("change", () => {
      const file = this.fileInput.files?.[0];
      if (file) this.setBlob(file, { label: file.name });
      this.fileInput.value = ""; // choosing the same file again still counts
    });
    $("#picture-remove").addEventListener("click", () => {
      this.clear();
      this.fileInput.focus();
      this.announce("Picture removed.");
    });
    $("#mask-clear").addEventListener("click", () => {
      this.ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
      this.maskChanged();
    });
    $("#mask-invert").addEventListener("click", () => this.invertMask());
    this.brush.addEventListener("input", () => this.showBrushSize());
    this.strength.addEventListener("input", () => this.showStrength());
    for (const input of Object.values(this.outpaint)) input.addEventListener("input", () => this.layout());
    this.inpaint.only_masked.addEventListener("change", () => this.showPadding());
    this.showPadding();

    this.canvas.addEventListener("pointerdown", (event) => this.startStroke(event));
    this.canvas.addEventListener("pointermove", (event) => this.moveStroke(event));
    for (const type of ["pointerup", "pointercancel"]) this.canvas.addEventListener(type, () => this.endStroke());
    this.canvas.addEventListener("pointerleave", () => {
      this.cursor.hidden = true;
    });
    window.addEventListener("resize", () => this.layout({ notify: false }));

    this.listenForDrops(dropTarget);
    document.addEventListener("paste", (event) => {
      const file = [...(event.clipboardData?.files ?? [])].find((f) => f.type.startsWith("image/"));
      if (!file || document.body.dataset.needsKey) return;
      // Text with a picture beside it (a spreadsheet's cells, say) pasted into a text field is text.
      if (event.target.matches?.("textarea, input") && event.clipboardData.getData("text/plain")) return;
      event.preventDefault();
      this.setBlob(file, { label: "pasted picture" });
      this.announce("Picture pasted.");
    });
    this.showStrength();
  }

  setDefaults({ strength }) {
    if (strength != null) this.strength.value = strength;
    this.showStrength();
  }

  // The picture ------------------------------------------------------------------------------------

  /** A picture from a file, the clipboard or a result. `ref`: already stored under this upload id. */
  async setBlob(blob, { label = "", ref = null, keepSize = false } = {}) {
    const generation = ++this.generation;
    this.showError("");
    let bitmap;
    try {
      bitmap = await createImageBitmap(blob); // upright, as the server reads it (EXIF applied)
    } catch {
      if (generation === this.generation) this.showError("The browser cannot read that file as a picture.");
      return;
    }
    if (generation !== this.generation) return bitmap.close();
    let data = blob;
    if (!ref && !ACCEPTED.has(blob.type)) data = await toPng(bitmap); // GIF, BMP, AVIF…: sent as PNG
    const { width, height } = bitmap;
    bitmap.close();
    if (this.picture) URL.revokeObjectURL(this.picture.url);
    const format = data.type.replace("image/", "");
    this.picture = { ref, width, height, format, url: URL.createObjectURL(data), label };
    this.image.src = this.picture.url;
    this.resetMask(width, height);
    this.brush.max = String(Math.max(8, Math.round(Math.max(width, height) / 3)));
    this.brush.value = String(Math.max(2, Math.round(Math.max(width, height) / 12)));
    this.showBrushSize();
    this.dropzone.hidden = true;
    this.editor.hidden = false;
    this.root.dataset.picture = "true";
    this.layout({ keepSize });
    this.showInfo(ref ? "stored" : "uploading…");
    if (!ref) {
      this.pending = this.upload(data, generation);
      await this.pending;
    }
  }

  async upload(blob, generation) {
    try {
      const stored = await api.upload(blob, `picture.${blob.type.replace("image/", "") || "png"}`);
      if (generation !== this.generation) return;
      this.picture.ref = stored.id;
      this.picture.format = stored.format;
      if (stored.width !== this.picture.width || stored.height !== this.picture.height) {
        // The server's upright size is the one the mask must have.
        Object.assign(this.picture, { width: stored.width, height: stored.height });
        this.resetMask(stored.width, stored.height);
        this.layout();
      }
      this.showInfo("uploaded");
    } catch (error) {
      if (generation !== this.generation) return;
      if (error.status === 404 || error.status === 405) {
        // A server without uploads: the picture travels inside the job as a data URL.
        this.picture.ref = await dataUrl(blob);
        this.showInfo("sent with the job");
        return;
      }
      this.clear();
      const text = error.message.replace(/^File: /, ""); // the upload's field; here it is this picture
      this.showError(text.charAt(0).toUpperCase() + text.slice(1));
    } finally {
      if (generation === this.generation) this.pending = null;
    }
  }

  /** "Use as input": a result (or any picture this page may read) into the slot. */
  async useUrl(url, { label = "", ref = null, keepSize = false } = {}) {
    const generation = this.generation;
    this.showError("");
    this.showInfo("loading…");
    try {
      const blob = await api.picture(url);
      if (generation !== this.generation) return;
      await this.setBlob(blob, { label, ref, keepSize });
    } catch (error) {
      if (generation === this.generation) this.showError(`Could not load the picture: ${error.message}`);
    }
  }

  clear() {
    this.generation += 1;
    if (this.picture) URL.revokeObjectURL(this.picture.url);
    this.picture = null;
    this.pending = null;
    this.image.removeAttribute("src");
    this.resetMask(0, 0);
    this.editor.hidden = true;
    this.dropzone.hidden = false;
    delete this.root.dataset.picture;
    this.onCanvas(null, {});
  }

  has() {
    return this.picture !== null;
  }

  showInfo(state) {
    const p = this.picture;
    if (!p) return;
    const what = `${p.width}×${p.height} ${FORMAT_LABELS[p.format] ?? p.format.toUpperCase()}`;
    this.info.textContent = [p.label, what, state].filter(Boolean).join(" · ");
    this.info.title = p.label;
  }

  showError(message) {
    this.error.textContent = message;
    this.error.hidden = !message;
    this.fileInput.toggleAttribute("aria-invalid", Boolean(message));
  }

  listenForDrops(target) {
    const carriesPicture = (event) => {
      const types = [...(event.dataTransfer?.types ?? [])];
      return types.includes("Files") || types.includes("text/uri-list");
    };
    target.addEventListener("dragover", (event) => {
      if (!carriesPicture(event)) return;
      event.preventDefault();
      event.dataTransfer.dropEffect = "copy";
      this.root.classList.add("drag-over");
    });
    target.addEventListener("dragleave", (event) => {
      if (!target.contains(event.relatedTarget)) this.root.classList.remove("drag-over");
    });
    target.addEventListener("drop", (event) => {
      this.root.classList.remove("drag-over");
      if (!carriesPicture(event)) return;
      event.preventDefault();
      const file = [...event.dataTransfer.files].find((f) => f.type.startsWith("image/"));
      if (file) {
        this.setBlob(file, { label: file.name });
        this.announce("Picture dropped.");
        return;
      }
      // A result dragged from the gallery: its URL on this server.
      const uri = event.dataTransfer.getData("text/uri-list").split("\n")[0]?.trim();
      if (uri && new URL(uri, location.href).origin === location.origin) this.useUrl(uri, { label: "dropped result" });
      else if (event.dataTransfer.files.length) this.showError("That file is not a picture.");
    });
  }

  // Layout: the picture, and the outpaint margins around it ---------------------------------------

  margins() {
    return Object.fromEntries(SIDES.map((side) => [side, Math.max(0, Number(this.outpaint[side].value) || 0)]));
  }

  layout({ keepSize = true, notify = true } = {}) {
    const p = this.picture;
    if (!p) return;
    const m = this.margins();
    const width = p.width + m.left + m.right;
    const height = p.height + m.top + m.bottom;
    Object.assign(this.stage.style, {
      aspectRatio: `${width} / ${height}`,
      maxWidth: `min(100%, ${Math.round((STAGE_MAX_HEIGHT * width) / height)}px)`,
    });
    Object.assign(this.frame.style, {
      left: `${(100 * m.left) / width}%`,
      top: `${(100 * m.top) / height}%`,
      width: `${(100 * p.width) / width}%`,
      height: `${(100 * p.height) / height}%`,
    });
    this.stage.classList.toggle("extended", width !== p.width || height !== p.height);
    if (notify) this.onCanvas({ width, height }, { keepSize });
  }

  /** The padding counts only with "only the masked area". */
  showPadding() {
    this.inpaint.only_masked_padding.disabled = !this.inpaint.only_masked.checked;
  }

  // Strength ---------------------------------------------------------------------------------------

  showStrength() {
    const strength = Number(this.strength.value);
    this.strengthValue.textContent = strength.toFixed(2);
    const steps = this.steps();
    const run = Math.floor(steps * strength + 1e-9); // the last int(steps × strength) steps run
    this.strengthHint.textContent =
      run < 1
        ? `Runs no step of ${steps}: raise the strength or the steps.`
        : `Runs the last ${run} of ${steps} steps. Low keeps the picture, 1 redraws it.`;
  }

  // The mask painter -------------------------------------------------------------------------------

  resetMask(width, height) {
    this.canvas.width = width; // also clears it
    this.canvas.height = height;
    this.pattern = maskPattern(this.ctx, Math.max(width, height));
    this.maskChanged();
  }

  maskChanged() {
    this.maskVersion += 1;
    this.hasMask = maskPainted(this.ctx, this.canvas.width, this.canvas.height);
    this.root.dataset.mask = String(this.hasMask);
    this.mode.textContent = this.hasMask
      ? "Inpainting: only the painted area changes."
      : "img2img: the whole picture changes. Paint over a part to change only that part.";
  }

  tool() {
    return this.root.querySelector('input[name="mask-tool"]:checked')?.value ?? "brush";
  }

  point(event) {
    const rect = this.canvas.getBoundingClientRect();
    return {
      x: ((event.clientX - rect.left) * this.canvas.width) / rect.width,
      y: ((event.clientY - rect.top) * this.canvas.height) / rect.height,
    };
  }

  startStroke(event) {
    if (event.button !== 0 || !this.picture) return;
    event.preventDefault();
    this.canvas.setPointerCapture(event.pointerId);
    this.drawing = this.point(event);
    this.paint(this.drawing, this.drawing);
  }

  moveStroke(event) {
    this.moveCursor(event);
    if (!this.drawing) return;
    const point = this.point(event);
    this.paint(this.drawing, point);
    this.drawing = point;
  }

  endStroke() {
    if (!this.drawing) return;
    this.drawing = null;
    this.maskChanged();
  }

  paint(from, to) {
    const ctx = this.ctx;
    const size = Number(this.brush.value);
    ctx.save();
    ctx.globalCompositeOperation = this.tool() === "erase" ? "destination-out" : "source-over";
    ctx.fillStyle = ctx.strokeStyle = this.pattern;
    ctx.lineWidth = size;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.arc(to.x, to.y, size / 2, 0, 2 * Math.PI); // a click paints a dot
    ctx.fill();
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x, to.y);
    ctx.stroke();
    ctx.restore();
  }

  moveCursor(event) {
    const rect = this.canvas.getBoundingClientRect();
    const diameter = (Number(this.brush.value) * rect.width) / this.canvas.width;
    Object.assign(this.cursor.style, {
      width: `${diameter}px`,
      height: `${diameter}px`,
      left: `${event.clientX - rect.left}px`,
      top: `${event.clientY - rect.top}px`,
    });
    this.cursor.dataset.tool = this.tool();
    this.cursor.hidden = false;
  }

  showBrushSize() {
    this.brushValue.textContent = `${this.brush.value} px`;
  }

  invertMask() {
    const painted = copyCanvas(this.canvas);
    this.ctx.save();
    this.ctx.fillStyle = this.pattern;
    this.ctx.fillRect(0, 0, this.canvas.width, this.canvas.height);
    this.ctx.globalCompositeOperation = "destination-out"; // keeps 1 − painted
    this.ctx.drawImage(painted, 0, 0);
    this.ctx.restore();
    this.maskChanged();
  }

  /** The mask as the API takes it: a PNG of the picture's size, white where it should change. */
  maskPng() {
    const { width, height } = this.canvas;
    const painted = this.ctx.getImageData(0, 0, width, height).data;
    const out = new ImageData(width, height);
    for (let i = 0; i < painted.length; i += 4) {
      const value = painted[i + 3];
      out.data[i] = out.data[i + 1] = out.data[i + 2] = value;
      out.data[i + 3] = 255;
    }
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    canvas.getContext("2d").putImageData(out, 0, 0);
    return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  }

  /** A stored mask (white or opaque: change) back onto the painter. */
  async loadMask(ref, invert = false) {
    const generation = this.generation;
    const bitmap = await createImageBitmap(await api.picture(`/v1/uploads/${encodeURIComponent(ref)}`));
    if (generation !== this.generation || !this.picture) return bitmap.close();
    const { width, height } = this.canvas;
    const scratch = document.createElement("canvas");
    scratch.width = width;
    scratch.height = height;
    const sctx = scratch.getContext("2d", { willReadFrequently: true });
    sctx.drawImage(bitmap, 0, 0, width, height);
    bitmap.close();
    const pixels = sctx.getImageData(0, 0, width, height);
    const source = pixels.data;
    for (let i = 0; i < source.length; i += 4) {
      const value = Math.round(((source[i] + source[i + 1] + source[i + 2]) / 3) * (source[i + 3] / 255));
      source[i + 3] = invert ? 255 - value : value; // white (or opaque) is what changes
    }
    sctx.putImageData(pixels, 0, 0);
    this.ctx.save();
    this.ctx.clearRect(0, 0, width, height);
    this.ctx.fillStyle = this.pattern;
    this.ctx.fillRect(0, 0, width, height);
    this.ctx.globalCompositeOperation = "destination-in"; // the pattern, as opaque as the mask
    this.ctx.drawImage(scratch, 0, 0);
    this.ctx.restore();
    this.maskChanged();
  }

  async maskRef() {
    if (this.maskUpload?.version === this.maskVersion) return this.maskUpload.ref;
    const version = this.maskVersion;
    const blob = await this.maskPng();
    let ref;
    if (this.picture.ref.startsWith("data:")) {
      ref = await dataUrl(blob);
    } else {
      try {
        ref = (await api.upload(blob, "mask.png")).id;
      } catch (error) {
        const message = `The mask could not be uploaded: ${error.message}`;
        throw new ApiError(error.status, message, [{ field: "mask", message }]);
      }
    }
    this.maskUpload = { version, ref };
    return ref;
  }

  // The request ------------------------------------------------------------------------------------

  /** The job's picture fields: init_image, strength, mask, inpaint, outpaint (none without a picture). */
  async fields() {
    if (!this.picture) return {};
    if (this.pending) await this.pending;
    if (!this.picture?.ref) {
      const message = "The picture is not stored yet: choose it again.";
      throw new ApiError(0, message, [{ field: "init_image", message }]);
    }
    const body = { init_image: this.picture.ref, strength: Number(this.strength.value) };
    const m = this.margins();
    if (SIDES.some((side) => m[side] > 0)) {
      body.outpaint = { ...m };
      const feather = this.outpaint.feather.value.trim();
      if (feather !== "") body.outpaint.feather = Number(feather);
    }
    if (this.hasMask) body.mask = await this.maskRef();
    if (this.hasMask || body.outpaint) {
      const inpaint = {};
      const blur = this.inpaint.mask_blur.value.trim();
      if (blur !== "" && Number(blur) !== 4) inpaint.mask_blur = Number(blur);
      if (this.inpaint.fill.value !== "original") inpaint.fill = this.inpaint.fill.value;
      if (this.inpaint.only_masked.checked) {
        inpaint.only_masked = true;
        const padding = this.inpaint.only_masked_padding.value.trim();
        if (padding !== "") inpaint.only_masked_padding = Number(padding);
      }
      if (Object.keys(inpaint).length) body.inpaint = inpaint;
    }
    return body;
  }

  /** "Send to form": a job's picture, mask and options back into the slot (or none). */
  async fill(params) {
    if (!params.init_image) {
      if (this.picture) this.clear();
      return;
    }
    if (params.strength != null) this.strength.value = params.strength;
    this.showStrength();
    const outpaint = params.outpaint ?? {};
    for (const side of SIDES) this.outpaint[side].value = outpaint[side] ? String(outpaint[side]) : "";
    this.outpaint.feather.value = outpaint.feather ?? 8;
    this.root.querySelector("#outpaint-options").open = Boolean(params.outpaint);
    const inpaint = params.inpaint ?? {};
    this.inpaint.mask_blur.value = inpaint.mask_blur ?? 4;
    this.inpaint.fill.value = inpaint.fill ?? "original";
    this.inpaint.only_masked.checked = Boolean(inpaint.only_masked);
    this.inpaint.only_masked_padding.value = inpaint.only_masked_padding ?? 32;
    this.showPadding();
    const ref = params.init_image;
    const stored = /^sha256:[0-9a-f]{64}$/.test(ref);
    if (stored) await this.useUrl(`/v1/uploads/${encodeURIComponent(ref)}`, { label: "", ref, keepSize: true });
    else await this.setBlob(await (await fetch(ref)).blob(), { keepSize: true }); // a data URL
    if (params.mask && this.picture) {
      try {
        await this.loadMask(params.mask, Boolean(inpaint.invert));
      } catch (error) {
        this.showError(`Could not load the mask: ${error.message}`);
      }
    }
  }
}

/** What paint looks like: light and dark stripes show over any picture. Only its opacity is sent. */
function maskPattern(ctx, size) {
  const tile = document.createElement("canvas");
  const side = Math.max(4, Math.round(size / 24));
  tile.width = tile.height = side * 2;
  const t = tile.getContext("2d");
  t.fillStyle = "rgb(255 255 255)";
  t.fillRect(0, 0, side * 2, side * 2);
  t.fillStyle = "rgb(255 40 120)";
  t.beginPath();
  for (const offset of [-2 * side, 0, 2 * side]) {
    t.moveTo(offset, 2 * side);
    t.lineTo(offset + side, 2 * side);
    t.lineTo(offset + 3 * side, 0);
    t.lineTo(offset + 2 * side, 0);
  }
  t.fill();
  return ctx.createPattern(tile, "repeat") ?? "rgb(255 40 120)";
}

function copyCanvas(canvas) {
  const copy = document.createElement("canvas");
  copy.width = canvas.width;
  copy.height = canvas.height;
  if (copy.width && copy.height) copy.getContext("2d").drawImage(canvas, 0, 0);
  return copy;
}

function maskPainted(ctx, width, height) {
  if (!width || !height) return false;
  const data = ctx.getImageData(0, 0, width, height).data;
  for (let i = 3; i < data.length; i += 4) if (data[i] > 0) return true;
  return false;
}

function toPng(bitmap) {
  const canvas = document.createElement("canvas");
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  canvas.getContext("2d").drawImage(bitmap, 0, 0);
  return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
}

function dataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}
