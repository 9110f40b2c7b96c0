// Workflows tab: a ComfyUI API-format workflow (dropped, chosen or pasted) is checked with
// POST /v1/workflows/validate (errors shown next to their node), run with POST /prompt, followed on
// ComfyUI's websocket (/ws) node by node, and its outputs shown from /history and /view.

import { api } from "./api.js";
import { h } from "./format.js";

const clientId = `web-${crypto.randomUUID ? crypto.randomUUID() : Math.random().toString(16).slice(2)}`;

export class WorkflowRunner {
  /** @param {{form: HTMLFormElement, text: HTMLTextAreaElement, file: HTMLInputElement, nodes: HTMLElement,
   *  images: HTMLElement, status: HTMLElement, error: HTMLElement, announce: (m: string) => void}} parts */
  constructor(parts) {
    Object.assign(this, parts);
    this.rows = new Map(); // node id -> {row, state}
    this.promptId = null;
    this.socket = null;
    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.run();
    });
    this.form.querySelector("[data-action=check]").addEventListener("click", () => this.check());
    this.file.addEventListener("change", () => this.file.files[0] && this.load(this.file.files[0]));
    this.text.addEventListener("dragover", (event) => event.preventDefault());
    this.text.addEventListener("drop", (event) => {
      const file = event.dataTransfer?.files?.[0];
      if (!file) return;
      event.preventDefault();
      this.load(file);
    });
  }

  async load(file) {
    this.text.value = await file.text();
    this.check();
  }

  /** The workflow in the text box, or null with the reason shown. */
  parse() {
    this.error.hidden = true;
    let graph;
    try {
      graph = JSON.parse(this.text.value);
    } catch (error) {
      return this.fail(`This is not JSON: ${error.message}`);
    }
    if (graph && Array.isArray(graph.nodes)) {
      return this.fail("This is ComfyUI's editor format: export it with “Save (API)” (the API format).");
    }
    if (graph && typeof graph.prompt === "object" && !graph.class_type) graph = graph.prompt;
    if (!graph || typeof graph !== "object" || Array.isArray(graph)) return this.fail("A workflow is a JSON object of nodes.");
    return graph;
  }

  fail(message) {
    this.error.textContent = message;
    this.error.hidden = false;
    return null;
  }

  /** Lists the nodes, each with its problems; true when the server accepts the workflow. */
  async check() {
    const graph = this.parse();
    if (!graph) return false;
    this.showNodes(graph);
    try {
      const plan = await api.validateWorkflow(graph);
      const jobs = plan.stages.filter((stage) => stage.kind !== "scale").length;
      this.status.textContent = `Valid: ${jobs} genserve job${jobs === 1 ? "" : "s"}.`;
      return true;
    } catch (error) {
      if (!error.fields?.length) return this.fail(error.message) ?? false;
      for (const field of error.fields) {
        const [, , node, input] = field.loc ?? [];
        const entry = this.rows.get(String(node));
        if (entry) this.mark(String(node), "error", input ? `${input}: ${field.message}` : field.message);
        else this.fail(field.message);
      }
      this.status.textContent = `${error.fields.length} problem${error.fields.length === 1 ? "" : "s"}: see the nodes.`;
      this.announce(this.status.textContent);
      return false;
    }
  }

  showNodes(graph) {
    this.rows.clear();
    this.images.replaceChildren();
    const ids = Object.keys(graph).sort((a, b) => Number(a) - Number(b) || a.localeCompare(b));
    this.nodes.replaceChildren(
      ...ids.map((id) => {
        const node = graph[id] ?? {};
        const title = node._meta?.title && node._meta.title !== node.class_type ? ` · ${node._meta.title}` : "";
        const state = h("span", { class: "node-state" }, "");
        const message = h("p", { class: "node-message error", hidden: true });
        const row = h("li", { class: "workflow-node", dataset: { nodeId: id } },
          h("span", { class: "node-id" }, `#${id}`),
          h("span", { class: "node-class" }, `${node.class_type ?? "?"}${title}`),
          state, message);  // prettier-ignore
        this.rows.set(id, { row, state, message });
        return row;
      }),
    );
  }

  mark(id, state, text = "") {
    const entry = this.rows.get(String(id));
    if (!entry) return;
    entry.row.dataset.state = state;
    entry.state.textContent = { error: "error", cached: "cached", running: "running", done: "done" }[state] ?? "";
    if (state === "error") {
      entry.message.textContent = text;
      entry.message.hidden = false;
    } else if (text) {
      entry.state.textContent = text;
    }
  }

  async run() {
    if (!(await this.check())) return;
    const graph = this.parse();
    await this.connect();
    try {
      const queued = await api.queueWorkflow(graph, clientId);
      this.promptId = queued.prompt_id;
      this.status.textContent = "Queued.";
      this.announce("Workflow queued");
    } catch (error) {
      this.fail(error.message);
    }
  }

  connect() {
    if (this.socket && this.socket.readyState <= WebSocket.OPEN) return Promise.resolve();
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    this.socket = new WebSocket(`${scheme}://${location.host}/ws?clientId=${encodeURIComponent(clientId)}`);
    this.socket.addEventListener("message", (event) => {
      if (typeof event.data === "string") this.onMessage(JSON.parse(event.data));
    });
    return new Promise((resolve) => {
      this.socket.addEventListener("open", () => resolve(), { once: true });
      this.socket.addEventListener("error", () => resolve(), { once: true }); // run anyway; /history still works
    });
  }

  onMessage({ type, data }) {
    if (!data || (data.prompt_id && data.prompt_id !== this.promptId)) return;
    if (type === "execution_start") this.status.textContent = "Running…";
    else if (type === "execution_cached") for (const node of data.nodes) this.mark(node, "cached");
    else if (type === "executing" && data.node !== null) this.mark(data.node, "running");
    else if (type === "progress") this.mark(data.node, "running", `${data.value} / ${data.max}`);
    else if (type === "executed") {
      this.mark(data.node, "done");
      this.showImages(data.output?.images ?? []);
    } else if (type === "execution_success") {
      // Loaders and encoders run inside the jobs: every node without an outcome is done too.
      for (const [id, entry] of this.rows) if (!["cached", "error"].includes(entry.row.dataset.state)) this.mark(id, "done");
      this.status.textContent = "Done.";
      this.announce("Workflow done");
    } else if (type === "execution_error" || type === "execution_interrupted") {
      this.mark(data.node_id, "error", data.exception_message);
      this.status.textContent = type === "execution_error" ? "Failed." : "Interrupted.";
      this.announce(this.status.textContent);
    }
  }

  showImages(images) {
    for (const image of images) {
      const query = new URLSearchParams({ filename: image.filename, subfolder: image.subfolder, type: image.type });
      const url = `/view?${query}`;
      // SaveVideo and SaveWEBM list their clips under `images` too (ComfyUI's shape); an <img> cannot play them.
      const clip = /\.(mp4|webm)$/i.test(image.filename);
      const media = clip
        ? h("video", { src: url, controls: true, loop: true, muted: true, playsinline: true, "aria-label": image.filename })
        : h("a", { href: url, target: "_blank", rel: "noopener" }, h("img", { src: url, alt: image.filename }));
      const caption = clip ? h("a", { href: url, target: "_blank", rel: "noopener" }, image.filename) : image.filename;
      this.images.append(h("figure", { class: "workflow-image" }, media, h("figcaption", {}, caption)));
    }
  }
}
