// Full-size view of a result: a modal <dialog> (Esc closes it), arrow keys move through the gallery.

import { h, pictureSummary, samplerLabel } from "./format.js";

export class Lightbox {
  /** @param {HTMLDialogElement} dialog */
  constructor(dialog, { form, announce }) {
    this.dialog = dialog;
    this.form = form;
    this.announce = announce;
    this.items = [];
    this.index = 0;
    this.returnFocus = null;
    this.img = dialog.querySelector("#lightbox-image");
    this.caption = dialog.querySelector("#lightbox-caption");
    this.download = dialog.querySelector("#lightbox-download");
    this.position = dialog.querySelector("#lightbox-position");
    this.prev = dialog.querySelector("#lightbox-prev");
    this.next = dialog.querySelector("#lightbox-next");
    dialog.querySelector("#lightbox-close").addEventListener("click", () => dialog.close());
    this.prev.addEventListener("click", () => this.show(this.index - 1));
    this.next.addEventListener("click", () => this.show(this.index + 1));
    dialog.querySelector("#lightbox-seed").addEventListener("click", () => {
      const { job, index } = this.items[this.index];
      this.form.setSeed(job.params.seed + index);
      this.announce(`Seed ${job.params.seed + index} is in the form.`);
    });
    dialog.querySelector("#lightbox-send").addEventListener("click", () => {
      const { job, index } = this.items[this.index];
      this.form.fill({ ...job.params, seed: job.params.seed + index, num_images: 1 });
      dialog.close();
      this.form.focusPrompt();
      this.announce("Parameters sent to the form.");
    });
    dialog.querySelector("#lightbox-use").addEventListener("click", () => {
      const { job, image, index } = this.items[this.index];
      dialog.close();
      this.form.useAsInput(image, `result of seed ${job.params.seed + index}`);
    });
    dialog.addEventListener("keydown", (event) => {
      if (event.key === "ArrowLeft") this.show(this.index - 1);
      if (event.key === "ArrowRight") this.show(this.index + 1);
    });
    // A click on the backdrop (the dialog box itself, outside its content) closes.
    dialog.addEventListener("click", (event) => {
      if (event.target === dialog) dialog.close();
    });
    dialog.addEventListener("close", () => {
      this.img.removeAttribute("src");
      this.returnFocus?.focus();
    });
  }

  open(items, index) {
    if (!items.length) return;
    this.items = items;
    this.returnFocus = document.activeElement;
    this.show(index);
    this.dialog.showModal();
    this.dialog.querySelector("#lightbox-close").focus();
  }

  show(index) {
    if (index < 0 || index >= this.items.length) return;
    this.index = index;
    const { image, index: imageIndex, job } = this.items[index];
    const p = job.params;
    const seed = p.seed + imageIndex;
    this.img.src = image.url;
    this.img.alt = `${p.prompt} (seed ${seed})`;
    this.download.href = image.url;
    this.download.download = `genserve-${image.id}.png`;
    this.position.textContent = `${index + 1} / ${this.items.length}`;
    this.prev.disabled = index === 0;
    this.next.disabled = index === this.items.length - 1;
    const details = [
      p.model,
      `${p.width}×${p.height}`,
      `${p.steps} steps`,
      `CFG ${p.cfg_scale}`,
      samplerLabel(p.sampler),
      `seed ${seed}`,
      ...pictureSummary(p),
    ];
    this.caption.replaceChildren(
      h(
        "div",
        {},
        h("p", { class: "lightbox-prompt" }, p.prompt),
        p.negative_prompt ? h("p", { class: "muted" }, `Negative: ${p.negative_prompt}`) : null,
        h("p", { class: "muted" }, details.join(" · ")),
      ),
    );
  }
}
