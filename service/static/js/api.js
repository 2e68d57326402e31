// The service's HTTP API as the page uses it. The page is served by the service itself, so
// every URL is relative (same origin: no CORS, and the CSP's connect-src 'self' holds).

const KEY_STORAGE = "vae-explorer-api-key";

/** An answer that is not a success: status 0 means no answer at all (network down, server
 *  stopped). title and detail come from the service's problem+json body when there is one. */
export class ApiError extends Error {
  constructor(status, title, detail = "") {
    super(detail ? `${title}: ${detail}` : title);
    this.name = "ApiError";
    this.status = status;
    this.title = title;
    this.detail = detail;
  }
}

// sessionStorage, not localStorage: the key is forgotten when the tab closes.
export function getApiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

async function call(method, path, body) {
  const headers = { Accept: "application/json" };
  const key = getApiKey();
  if (key) headers["X-API-Key"] = key;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    });
  } catch {
    // fetch rejects only when no HTTP answer came back at all.
    throw new ApiError(0, "The service is unreachable",
      "no answer from the server; check that it is running and that the network is up, then try again");
  }
  if (response.ok) return response.json();
  throw await problem(response);
}

async function problem(response) {
  let title = response.statusText || `HTTP ${response.status}`;
  let detail = "";
  try {
    const body = await response.json();
    title = body.title || title;
    detail = body.detail || "";
  } catch {
    // Not JSON (a proxy's error page, say): the status line is all there is.
  }
  return new ApiError(response.status, title, detail);
}

const withSeed = (seed) => (seed === null ? {} : { seed });

export const api = {
  models: () => call("GET", "/models"),
  latentMap: (name) => call("GET", `/models/${encodeURIComponent(name)}/latent-map`),
  /** images: PNG/JPEG data URLs. Answers decode(mu) as base64 PNGs, with mu and sigma. */
  reconstruct: (model, images) => call("POST", "/reconstruct", { model, images, format: "png" }),
  decode: (model, z) => call("POST", "/decode", { model, z, format: "png" }),
  /** prior: "standard", "learned", or null for the model's default. With returnLatents the
   *  answer also has the noise u and the latents z; label (a class index) draws one class
   *  through the learned prior; verdicts adds the classifier's reading of each image. */
  sample: (model, n, seed, temperature, prior = null, returnLatents = false, { label = null, verdicts = false } = {}) =>
    call("POST", "/sample", {
      model, n, temperature, format: "png", return_latents: returnLatents,
      ...withSeed(seed), ...(prior === null ? {} : { prior }),
      ...(label === null ? {} : { label }), ...(verdicts ? { return_verdicts: true } : {}),
    }),
};

export const pngSrc = (base64) => `data:image/png;base64,${base64}`;
