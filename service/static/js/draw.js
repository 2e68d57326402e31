// A drawing pad: a canvas to draw a digit on (mouse, touch or pen, through pointer events),
// or to drop or choose an image file on. Thick white strokes on black, like MNIST; the
// service fits any image into 28x28 itself, so the canvas is sent as it is.

import { debounce } from "./ui.js";

// Rough pen strokes for each digit, in unit coordinates: a way to try the encoder without a
// pointer (keyboard users), and a quick start for everyone.
const ellipse = (cx, cy, rx, ry, from = 0, to = 2 * Math.PI, steps = 28) =>
  Array.from({ length: steps + 1 }, (_, i) => {
    const t = from + ((to - from) * i) / steps;
    return [cx + rx * Math.sin(t), cy - ry * Math.cos(t)];
  });
const EXAMPLES = {
  0: [ellipse(0.5, 0.5, 0.19, 0.32)],
  1: [[[0.4, 0.26], [0.53, 0.15], [0.53, 0.85]]],
  2: [[[0.3, 0.3], [0.38, 0.18], [0.55, 0.15], [0.68, 0.25], [0.66, 0.42], [0.3, 0.83], [0.72, 0.83]]],
  3: [[[0.3, 0.2], [0.58, 0.16], [0.68, 0.3], [0.48, 0.47], [0.68, 0.6], [0.62, 0.8], [0.3, 0.83]]],
  4: [[[0.58, 0.86], [0.58, 0.15], [0.28, 0.6], [0.74, 0.6]]],
  5: [[[0.7, 0.17], [0.36, 0.17], [0.33, 0.45], [0.58, 0.43], [0.7, 0.6], [0.6, 0.81], [0.3, 0.8]]],
  6: [[[0.64, 0.15], [0.44, 0.32], [0.33, 0.58], [0.38, 0.8], [0.55, 0.85], [0.68, 0.7],
       [0.6, 0.54], [0.42, 0.55], [0.34, 0.64]]],
  7: [[[0.28, 0.2], [0.72, 0.2], [0.45, 0.86]]],
  8: [Array.from({ length: 41 }, (_, i) => {
    const t = (2 * Math.PI * i) / 40;
    return [0.5 + 0.16 * Math.sin(2 * t), 0.5 + 0.34 * Math.cos(t)];
  })],
  9: [ellipse(0.5, 0.34, 0.17, 0.18), [[0.67, 0.34], [0.62, 0.86]]],
};

export class DrawPad {
  /** root holds a canvas and optional [data-action=clear|file|example] controls. onChange
   *  runs `debounceMs` after the last stroke movement, and at once for files and clears. */
  constructor(root, { onChange = () => {}, onError = console.error, debounceMs = 250 } = {}) {
    this.root = root;
    this.onError = onError;
    this.canvas = root.querySelector("canvas");
    this.ctx = this.canvas.getContext("2d");
    this.notify = debounce(() => onChange(this), debounceMs);
    this.file = null; // a dropped or chosen file's data URL: sent as the user gave it
    this.empty = true;
    this.pointer = null;
    this.last = null;
    this.#clearCanvas();
    this.#listen();
  }

  /** What to send to the API: the file as given, else the canvas as a PNG data URL. */
  image() {
    return this.file ?? this.canvas.toDataURL("image/png");
  }

  clear() {
    this.#clearCanvas();
    const examples = this.root.querySelector("[data-action=example]");
    if (examples) examples.value = "";
    this.notify.flush();
  }

  drawExample(digit) {
    const strokes = EXAMPLES[digit];
    if (!strokes) return;
    this.#clearCanvas();
    const { width, height } = this.canvas;
    // A little jitter, so that two examples of one digit are not the very same image.
    const jitter = () => (Math.random() - 0.5) * 0.04;
    const [dx, dy] = [jitter(), jitter()];
    for (const stroke of strokes) {
      const points = stroke.map(([x, y]) => [(x + dx) * width, (y + dy) * height]);
      this.#line(points);
    }
    this.empty = false;
    this.notify.flush();
  }

  async loadFile(file) {
    const url = await new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
    this.#clearCanvas();
    this.file = url;
    this.empty = false;
    try {
      const img = new Image();
      img.src = url;
      await img.decode();
      this.#contain(img);
    } catch {
      // The browser cannot show it; the service may still read it, or say what is wrong.
      this.#caption("file: " + file.name);
    }
    this.notify.flush();
  }

  #clearCanvas() {
    this.ctx.fillStyle = "#000";
    this.ctx.fillRect(0, 0, this.canvas.width, this.canvas.height);
    this.file = null;
    this.empty = true;
  }

  #contain(img) {
    const { width, height } = this.canvas;
    const scale = Math.min(width / img.naturalWidth, height / img.naturalHeight);
    const [w, h] = [img.naturalWidth * scale, img.naturalHeight * scale];
    this.ctx.drawImage(img, (width - w) / 2, (height - h) / 2, w, h);
  }

  #caption(text) {
    this.ctx.fillStyle = "#ccc";
    this.ctx.font = "16px sans-serif";
    this.ctx.fillText(text, 10, this.canvas.height / 2);
  }

  #line(points) {
    const ctx = this.ctx;
    // MNIST strokes are about 1/10 of the digit box wide.
    ctx.lineWidth = this.canvas.width / 13;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.strokeStyle = "#fff";
    ctx.beginPath();
    ctx.moveTo(...points[0]);
    for (const point of points.slice(points.length > 1 ? 1 : 0)) ctx.lineTo(...point);
    if (points.length === 1) ctx.lineTo(points[0][0] + 0.1, points[0][1]); // a dot
    ctx.stroke();
  }

  #point(event) {
    const rect = this.canvas.getBoundingClientRect();
    return [
      ((event.clientX - rect.left) * this.canvas.width) / rect.width,
      ((event.clientY - rect.top) * this.canvas.height) / rect.height,
    ];
  }

  #listen() {
    const canvas = this.canvas;
    canvas.addEventListener("pointerdown", (event) => {
      if (event.pointerType === "mouse" && event.button !== 0) return;
      event.preventDefault();
      canvas.setPointerCapture(event.pointerId);
      // A stroke after a dropped file starts a new drawing: a file is sent as it is, and
      // marks drawn over a letterboxed photo would only confuse the fitting.
      if (this.file) this.#clearCanvas();
      this.pointer = event.pointerId;
      this.last = this.#point(event);
      this.#line([this.last]);
      this.empty = false;
    });
    canvas.addEventListener("pointermove", (event) => {
      if (event.pointerId !== this.pointer) return;
      // Coalesced events keep fast strokes smooth where the browser batches pointer moves.
      const events = event.getCoalescedEvents?.() ?? [];
      for (const e of events.length ? events : [event]) {
        const point = this.#point(e);
        this.#line([this.last, point]);
        this.last = point;
      }
      this.notify();
    });
    const end = (event) => {
      if (event.pointerId !== this.pointer) return;
      this.pointer = null;
      this.notify();
    };
    canvas.addEventListener("pointerup", end);
    canvas.addEventListener("pointercancel", end);

    this.root.addEventListener("dragover", (event) => {
      event.preventDefault();
      this.root.classList.add("dragging");
    });
    this.root.addEventListener("dragleave", () => this.root.classList.remove("dragging"));
    this.root.addEventListener("drop", (event) => {
      event.preventDefault();
      this.root.classList.remove("dragging");
      const file = event.dataTransfer?.files?.[0];
      if (file) this.loadFile(file).catch(this.onError);
    });

    this.root.querySelector("[data-action=clear]")?.addEventListener("click", () => this.clear());
    const input = this.root.querySelector("[data-action=file]");
    input?.addEventListener("change", () => {
      if (input.files?.[0]) this.loadFile(input.files[0]).catch(this.onError);
      input.value = ""; // so that choosing the same file again reloads it
    });
    const examples = this.root.querySelector("[data-action=example]");
    if (examples) {
      for (const digit of Object.keys(EXAMPLES)) examples.add(new Option(digit, digit));
      // Not reset after drawing: arrow keys on a closed <select> fire change on every step.
      examples.addEventListener("change", () => {
        if (examples.value !== "") this.drawExample(examples.value);
      });
    }
  }
}
