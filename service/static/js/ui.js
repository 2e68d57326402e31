// Small helpers shared by the panels: status messages, request pacing, digit images.

import { pngSrc } from "./api.js";

export const $ = (selector, root = document) => root.querySelector(selector);

/** Sets a panel's status line; kind "error" styles it as one. Empty text hides it. */
export function showStatus(element, text, kind = "info") {
  element.textContent = text;
  element.classList.toggle("error", kind === "error" && Boolean(text));
  element.hidden = !text;
}

/** What the user should read for an error, in one sentence or two. */
export function describeError(error) {
  if (error?.name !== "ApiError") return `Something went wrong in the page: ${error?.message ?? error}`;
  if (error.status === 0) return `${error.title}: ${error.detail}.`;
  if (error.status === 401) {
    return "This server needs an API key (401). Enter it under \u201cAPI key\u201d at the top of the page.";
  }
  const detail = error.detail ? `: ${error.detail}` : "";
  return `The API answered ${error.status} \u2013 ${error.title}${detail}.`;
}

/** Shows an error in a panel; a 401 also tells the page, which opens the key form. */
export function showError(element, error) {
  showStatus(element, describeError(error), "error");
  if (error?.status === 401) document.dispatchEvent(new CustomEvent("api-unauthorized"));
  if (error?.name !== "ApiError") console.error(error); // a bug in the page: keep the trace
}

/**
 * Runs `task(args)` for the latest request only, one at a time: at most one request is in
 * flight, and requests made meanwhile collapse into the newest. Hovering over the map asks
 * for a decode on every pointer move; this sends what the server can keep up with and
 * always ends on where the pointer stopped. `minGapMs` spaces requests a little further.
 */
export class LatestOnly {
  constructor(task, { onResult, onError, onBusy = () => {}, minGapMs = 0 }) {
    Object.assign(this, { task, onResult, onError, onBusy, minGapMs });
    this.pending = null;
    this.running = false;
  }

  request(args) {
    this.pending = { args };
    if (!this.running) this.#pump();
  }

  async #pump() {
    this.running = true;
    this.onBusy(true);
    while (this.pending) {
      const { args } = this.pending;
      this.pending = null;
      const started = performance.now();
      // One at a time, so answers arrive in order: each shown is newer than the last.
      try {
        this.onResult(await this.task(args), args);
      } catch (error) {
        this.onError(error, args);
      }
      const wait = this.minGapMs - (performance.now() - started);
      if (this.pending && wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
    }
    this.running = false;
    this.onBusy(false);
  }
}

/** Calls fn once `ms` have passed without another call (requests while drawing). */
export function debounce(fn, ms) {
  let timer = null;
  const debounced = (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
  debounced.flush = (...args) => {
    clearTimeout(timer);
    fn(...args);
  };
  return debounced;
}

/** An <img> for one 28x28 digit from the API (base64 PNG). */
export function digitImage(base64, alt, className = "digit") {
  const img = document.createElement("img");
  img.className = className;
  img.src = pngSrc(base64);
  img.alt = alt;
  img.width = 28;
  img.height = 28;
  return img;
}

/** Marks a panel busy (assistive technology, and the CSS progress cue). */
export const busyFlag = (element) => (busy) => element.setAttribute("aria-busy", String(busy));
