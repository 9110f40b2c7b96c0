// Small pure helpers: labels, size presets, durations, and a DOM builder that never parses HTML.

const SAMPLER_LABELS = {
  euler: "Euler",
  euler_a: "Euler a",
  dpmpp_2m: "DPM++ 2M",
  dpmpp_2m_karras: "DPM++ 2M Karras",
  ddim: "DDIM",
  unipc: "UniPC",
};

const FAMILY_LABELS = { sd15: "SD 1.5 / 2", sdxl: "SDXL", sd3: "SD3" };

export const samplerLabel = (name) => SAMPLER_LABELS[name] ?? name;
export const familyLabel = (family) => FAMILY_LABELS[family] ?? family;

// SDXL's and SD3's training buckets at 1024² (equal area); scaled to the model's native size.
const BUCKETS_1024 = [
  ["1:1", 1024, 1024],
  ["4:3", 1152, 896],
  ["3:4", 896, 1152],
  ["3:2", 1216, 832],
  ["2:3", 832, 1216],
  ["16:9", 1344, 768],
  ["9:16", 768, 1344],
];

// SD 1.x/2.x were trained on squares; common practice keeps the short side at the native size.
const SHORT_SIDE_RATIOS = [
  ["1:1", 1, 1],
  ["4:3", 4 / 3, 1],
  ["3:4", 1, 4 / 3],
  ["3:2", 3 / 2, 1],
  ["2:3", 1, 3 / 2],
  ["16:9", 16 / 9, 1],
  ["9:16", 1, 16 / 9],
];

/** Size presets for a model: its family's usual aspect ratios at its native size. */
export function sizePresets(model) {
  const width = model?.native_width ?? 512;
  const height = model?.native_height ?? 512;
  const native = Math.min(width, height);
  const unit = native >= 256 ? 64 : 8; // real models like multiples of 64; tiny test models are 64 px
  const snap = (value) => Math.max(unit, Math.round(value / unit) * unit);
  let presets;
  if (model?.family === "sd15") {
    presets = SHORT_SIDE_RATIOS.map(([label, w, h]) => ({ label, width: snap(native * w), height: snap(native * h) }));
  } else {
    const scale = native / 1024;
    presets = BUCKETS_1024.map(([label, w, h]) => ({ label, width: snap(w * scale), height: snap(h * scale) }));
  }
  presets[0] = { label: "1:1", width, height }; // the native size itself, exactly
  const seen = new Set();
  return presets.filter((p) => {
    const key = `${p.width}x${p.height}`;
    return !seen.has(key) && seen.add(key);
  });
}

export function formatDuration(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return "";
  const total = Math.max(1, Math.round(seconds));
  if (total < 60) return `${total} s`;
  const rest = total % 60;
  return rest ? `${Math.floor(total / 60)} min ${rest} s` : `${total / 60} min`;
}

export function formatTime(iso) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return "";
  const sameDay = date.toDateString() === new Date().toDateString();
  return sameDay
    ? date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : date.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
}

/** What a job did with pictures, in a few words for its card: "img2img 0.75", "inpaint", "hires ×2". */
export function pictureSummary(p) {
  const parts = [];
  if (p.init_image) {
    const kind = p.outpaint ? "outpaint" : p.mask ? "inpaint" : "img2img";
    parts.push(`${kind} ${p.strength ?? ""}`.trim());
  }
  if (p.hires) parts.push(p.hires.scale ? `hires ×${p.hires.scale}` : `hires ${p.hires.width}×${p.hires.height}`);
  return parts;
}

/** The request body that reproduces a job: what "copy parameters" puts on the clipboard. Stored
 * pictures are named by their upload ids, which POST /v1/jobs takes as they are. */
export function requestBody(params) {
  const keys = [
    "prompt",
    "negative_prompt",
    "model",
    "seed",
    "steps",
    "cfg_scale",
    "width",
    "height",
    "sampler",
    "num_images",
    "init_image",
    "mask",
    "strength",
    "resize_mode",
    "inpaint",
    "outpaint",
    "hires",
    "refiner",
  ];
  if (!params.init_image) keys.splice(keys.indexOf("strength"), 2); // strength and resize_mode: unused
  return Object.fromEntries(keys.filter((k) => params[k] !== undefined && params[k] !== null).map((k) => [k, params[k]]));
}

/** h("button", {class: "x", onclick}, "text", child) — attributes, properties and children. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key === "style") Object.assign(el.style, value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  el.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return el;
}
