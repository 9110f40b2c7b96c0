// The public HTTP API, and nothing else: everything the page does, a script can do too.

export class ApiError extends Error {
  /** @param {number} status @param {string} message @param {Array<{field: string, message: string}>} fields */
  constructor(status, message, fields = []) {
    super(message);
    this.status = status;
    this.fields = fields; // per-field errors from a 422, in plain words
  }
}

// With auth on, every call carries the key the user entered. The browser fetches images and event
// streams by itself and cannot add a header there, so the key also goes in a SameSite cookie, which
// the server accepts for reading (GET) only.
const KEY_STORAGE = "genserve.apiKey";
const KEY_COOKIE = "genserve_key";
let apiKey = "";

/** Keep `key` for this browser (an empty key forgets it). */
export function setApiKey(key) {
  apiKey = key.trim();
  const secure = location.protocol === "https:" ? "; Secure" : "";
  if (apiKey) {
    localStorage.setItem(KEY_STORAGE, apiKey);
    document.cookie = `${KEY_COOKIE}=${apiKey}; Path=/; SameSite=Strict${secure}`;
  } else {
    localStorage.removeItem(KEY_STORAGE);
    document.cookie = `${KEY_COOKIE}=; Path=/; Max-Age=0; SameSite=Strict${secure}`;
  }
}

export const hasApiKey = () => apiKey !== "";

/** A key can only hold characters a cookie can carry as they are (genserve's keys always do). */
export const looksLikeKey = (key) => /^[A-Za-z0-9_\-.]+$/.test(key.trim());

setApiKey(localStorage.getItem(KEY_STORAGE) ?? ""); // the cookie again, in case the browser dropped it

async function request(method, path, body) {
  const init = { method, headers: { Accept: "application/json" } };
  if (apiKey) init.headers.Authorization = `Bearer ${apiKey}`;
  if (body instanceof FormData) {
    init.body = body; // multipart: the browser sets the Content-Type with its boundary
  } else if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch {
    throw new ApiError(0, "The server cannot be reached. Is genserve still running?");
  }
  const data = await response.json().catch(() => null);
  if (!response.ok) throw toApiError(response.status, data);
  return data;
}

/** A 422's `loc` as the form names fields: ["body", "outpaint", "left"] is "outpaint.left". */
export function fieldPath(loc) {
  const parts = Array.isArray(loc) ? loc.slice(loc[0] === "body" ? 1 : 0) : [];
  const names = [];
  for (const part of parts) {
    if (typeof part !== "string" || !/^[A-Za-z_]\w*$/.test(part)) break; // list indexes, union branches
    names.push(part);
  }
  return names.join(".");
}

function toApiError(status, data) {
  const detail = data?.detail;
  if ((status === 422 || status === 413) && Array.isArray(detail)) {
    const fields = detail.map((item) => {
      const field = fieldPath(item.loc);
      const message = plainWords(field.split(".").at(-1), item.msg ?? "is not valid", item.type);
      return { field, message, loc: item.loc }; // loc as sent: a limit's field may be "keyframes[1].frame_index"
    });
    return new ApiError(status, fields.map((f) => f.message).join(" "), fields);
  }
  if (typeof detail === "string") return new ApiError(status, sentence(detail));
  return new ApiError(status, `The server answered ${status}.`);
}

/** Pydantic's messages, reworded for people; genserve's own limit messages are already plain. */
export function plainWords(field, message, type = "") {
  if (field === "prompt" && (type === "missing" || type === "string_too_short")) return "Write a prompt first.";
  if (type === "extra_forbidden") return `This server does not accept “${field}”.`;
  if (type === "missing") return sentence(`${field.replaceAll("_", " ")} is required`);
  let text = message.replace(/^Value error, /, "");
  text = text
    .replace(/^Input should be greater than or equal to (\S+)/, "Must be at least $1")
    .replace(/^Input should be less than or equal to (\S+)/, "Must be at most $1")
    .replace(/^Input should be a valid integer.*/, "Must be a whole number")
    .replace(/^Input should be a valid number.*/, "Must be a number")
    .replace(/^Input should be /, "Must be ");
  return sentence(text);
}

function sentence(text) {
  const trimmed = text.trim();
  const capital = trimmed.charAt(0).toUpperCase() + trimmed.slice(1);
  return /[.!?]$/.test(capital) ? capital : `${capital}.`;
}

export const api = {
  models: () => request("GET", "/v1/models").then((body) => body.data),
  openapi: () => request("GET", "/openapi.json"),
  jobs: ({ limit = 24, offset = 0 } = {}) => request("GET", `/v1/jobs?limit=${limit}&offset=${offset}`),
  job: (id) => request("GET", `/v1/jobs/${encodeURIComponent(id)}`),
  submit: (body) => request("POST", "/v1/jobs", body),
  cancel: (id) => request("DELETE", `/v1/jobs/${encodeURIComponent(id)}`),
  videoJobs: ({ limit = 10, offset = 0 } = {}) => request("GET", `/v1/video/jobs?limit=${limit}&offset=${offset}`),
  videoJob: (id) => request("GET", `/v1/video/jobs/${encodeURIComponent(id)}`),
  submitVideo: (body) => request("POST", "/v1/video/jobs", body),
  cancelVideo: (id) => request("DELETE", `/v1/video/jobs/${encodeURIComponent(id)}`),
  /** POST /v1/uploads: 201 {id: "sha256:…", width, height, format, bytes}. */
  upload: (blob, filename = "picture.png") => {
    const form = new FormData();
    form.append("file", blob, filename);
    return request("POST", "/v1/uploads", form);
  },
  loras: () => request("GET", "/v1/loras").then((body) => body.data),
  controls: () => request("GET", "/v1/controls").then((body) => body.data),
  preprocessors: () => request("GET", "/v1/preprocessors"),
  /** POST /v1/preprocess: the control map a preprocessor makes of a picture, as a PNG blob. */
  preprocess: async (body) => {
    const headers = { "Content-Type": "application/json", Accept: "image/png" };
    if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
    let response;
    try {
      response = await fetch("/v1/preprocess", { method: "POST", headers, body: JSON.stringify(body) });
    } catch {
      throw new ApiError(0, "The server cannot be reached. Is genserve still running?");
    }
    if (!response.ok) throw toApiError(response.status, await response.json().catch(() => null));
    return response.blob();
  },
  /** Workflows (docs/workflows.md): check one (422 naming node and input), queue it as ComfyUI does. */
  validateWorkflow: (prompt) => request("POST", "/v1/workflows/validate", { prompt }),
  queueWorkflow: (prompt, clientId) => request("POST", "/prompt", { prompt, client_id: clientId }),
  /** POST /v1/upscale: 202 with the job (its events_url to follow); GET /v1/upscale/{id} once done. */
  upscale: (body) => request("POST", "/v1/upscale", body),
  submitExperimentText: (spec) => request("POST", "/v1/experiments/text", { spec }),
  experiment: (id) => request("GET", `/v1/experiments/${encodeURIComponent(id)}`),
  experiments: () => request("GET", "/v1/experiments"),
  upscaleJob: (id) => request("GET", `/v1/upscale/${encodeURIComponent(id)}`),
  /** A picture this page may read (an image, an upload): the key's cookie authenticates GETs. */
  picture: async (url) => {
    let response;
    try {
      response = await fetch(url, { headers: apiKey ? { Authorization: `Bearer ${apiKey}` } : {} });
    } catch {
      throw new ApiError(0, "The server cannot be reached. Is genserve still running?");
    }
    if (!response.ok) throw toApiError(response.status, await response.json().catch(() => null));
    return response.blob();
  },
  ready: async () => {
    try {
      const response = await fetch("/readyz");
      return response.ok ? "ready" : "warming";
    } catch {
      return "offline";
    }
  },
};

const TERMINAL = new Set(["succeeded", "failed", "canceled"]);

/**
 * Follow a job's server-sent events. `on(type, data)` gets every event; the stream is closed after
 * a terminal event (the server ends it there, and EventSource would otherwise reconnect).
 * `extraTypes`: more event types to pass on (a video's stage, segment_ready, video_ready).
 * Returns a function that stops following.
 */
export function followJob(id, on, onLost, extraTypes = []) {
  const source = new EventSource(`/v1/jobs/${encodeURIComponent(id)}/events`);
  const types = ["queued", "started", "progress", "preview", "requeued", "succeeded", "failed", "canceled"];
  for (const type of [...types, ...extraTypes]) {
    source.addEventListener(type, (event) => {
      let data = {};
      try {
        data = JSON.parse(event.data);
      } catch {
        return;
      }
      if (TERMINAL.has(type)) source.close();
      on(type, data);
    });
  }
  // A closed source after an error means the browser gave up (e.g. the job is gone): poll instead.
  source.addEventListener("error", () => {
    if (source.readyState === EventSource.CLOSED) onLost?.();
  });
  return () => source.close();
}

export function isTerminal(state) {
  return TERMINAL.has(state);
}
