// The latent map: posterior means of test digits coloured by class, the prior's contours,
// and a cursor that the pointer or the arrow keys move. The points are drawn once into an
// offscreen canvas; each cursor move only copies it and draws the cursor on top.

// Matplotlib's tab10, as the trainer's report figure uses: the same colour for each class.
export const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
  "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];

export class LatentMapView {
  /** onPick([x, y]) runs whenever the cursor moves to a new map point. */
  constructor(canvas, { onPick }) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d");
    this.onPick = onPick;
    this.map = null;
    this.cursor = null;
    this.draws = {};
    this.base = document.createElement("canvas");
    [this.base.width, this.base.height] = [canvas.width, canvas.height];
    this.#listen();
  }

  setData(map) {
    this.map = map;
    this.draws = {};
    // Like the report's figure: at least the prior's 3 sigma, more when the data reach further.
    const radii = map.points.map(([x, y]) => Math.max(Math.abs(x), Math.abs(y))).sort((a, b) => a - b);
    const p995 = radii.length ? radii[Math.min(radii.length - 1, Math.floor(0.995 * radii.length))] : 0;
    this.extent = Math.max(3.5, p995 * 1.05);
    this.#drawBase();
    this.moveTo([0, 0]);
  }

  clear() {
    this.map = null;
    this.cursor = null;
    this.ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
  }

  /** The latent vector a map point stands for: itself for a 2-D model, else the point on
   *  the plane of the two projection axes (every other direction at the prior's mean, 0). */
  toLatent([x, y]) {
    const axes = this.map?.projection?.axes;
    return axes ? axes[0].map((a, i) => x * a + y * axes[1][i]) : [x, y];
  }

  /** The map point of a latent vector: itself for a 2-D model, else its projection on the
   *  two axes (the inverse of toLatent on the plane). */
  toMap(z) {
    const axes = this.map?.projection?.axes;
    if (!axes) return [z[0], z[1]];
    const dot = (axis) => axis.reduce((sum, a, i) => sum + a * z[i], 0);
    return [dot(axes[0]), dot(axes[1])];
  }

  /** Draws of the priors to plot over the digits: { standard: [[x, y], ...], learned: [...] }. */
  setDraws(draws) {
    this.draws = draws;
    if (this.map) this.#draw();
  }

  /** The test digit whose posterior mean lies nearest to a map point: [label, distance]. */
  nearest([x, y]) {
    let best = [null, Infinity];
    for (const [px, py, label] of this.map?.points ?? []) {
      const d = Math.hypot(px - x, py - y);
      if (d < best[1]) best = [label, d];
    }
    return best;
  }

  moveTo(point) {
    if (!this.map) return;
    const limit = this.extent;
    this.cursor = point.map((v) => Math.max(-limit, Math.min(limit, v)));
    this.#draw();
    this.onPick(this.cursor);
  }

  // Map units <-> canvas pixels; y grows upwards on the map, downwards on the canvas.
  #px([x, y]) {
    const { width, height } = this.canvas;
    return [((x + this.extent) / (2 * this.extent)) * width, ((this.extent - y) / (2 * this.extent)) * height];
  }

  #fromEvent(event) {
    const rect = this.canvas.getBoundingClientRect();
    const u = (event.clientX - rect.left) / rect.width;
    const v = (event.clientY - rect.top) / rect.height;
    return [(2 * u - 1) * this.extent, (1 - 2 * v) * this.extent];
  }

  #drawBase() {
    const ctx = this.base.getContext("2d");
    const { width, height } = this.base;
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, width, height);
    const [ox, oy] = this.#px([0, 0]);
    ctx.strokeStyle = "#ddd";
    ctx.lineWidth = 1;
    ctx.beginPath();
    ctx.moveTo(0, oy);
    ctx.lineTo(width, oy);
    ctx.moveTo(ox, 0);
    ctx.lineTo(ox, height);
    ctx.stroke();

    ctx.globalAlpha = 0.6;
    for (const [x, y, label] of this.map.points) {
      const [px, py] = this.#px([x, y]);
      ctx.fillStyle = PALETTE[label % PALETTE.length];
      ctx.fillRect(px - 1.5, py - 1.5, 3, 3);
    }
    ctx.globalAlpha = 1;

    // The prior N(0, I)'s contours: where its density falls to exp(-r^2 / 2) of the peak.
    // On orthonormal projection axes the prior is still N(0, I): the same circles.
    const unit = width / (2 * this.extent);
    ctx.strokeStyle = "#222";
    ctx.fillStyle = "#222";
    ctx.font = "13px system-ui, sans-serif";
    ctx.setLineDash([5, 4]);
    for (const r of [1, 2, 3]) {
      ctx.beginPath();
      ctx.arc(ox, oy, r * unit, 0, 2 * Math.PI);
      ctx.stroke();
      ctx.fillText(`${r}\u03c3`, ox + r * unit * 0.71 + 3, oy - r * unit * 0.71 - 3);
    }
    ctx.setLineDash([]);
  }

  #draw() {
    const ctx = this.ctx;
    ctx.drawImage(this.base, 0, 0);
    this.#drawDraws();
    if (!this.cursor) return;
    const [cx, cy] = this.#px(this.cursor);
    // Black and white rings: visible over points of any colour.
    for (const [style, width] of [["#fff", 5], ["#000", 2]]) {
      ctx.strokeStyle = style;
      ctx.lineWidth = width;
      ctx.beginPath();
      ctx.arc(cx, cy, 9, 0, 2 * Math.PI);
      ctx.moveTo(cx - 15, cy);
      ctx.lineTo(cx - 5, cy);
      ctx.moveTo(cx + 5, cy);
      ctx.lineTo(cx + 15, cy);
      ctx.moveTo(cx, cy - 15);
      ctx.lineTo(cx, cy - 5);
      ctx.moveTo(cx, cy + 5);
      ctx.lineTo(cx, cy + 15);
      ctx.stroke();
    }
  }

  // Standard draws as black rings, learned ones as white dots outlined in black: both stay
  // visible over points of any colour and over each other.
  #drawDraws() {
    const ctx = this.ctx;
    ctx.lineWidth = 1.5;
    for (const [x, y] of this.draws.standard ?? []) {
      const [px, py] = this.#px([x, y]);
      ctx.strokeStyle = "#000";
      ctx.beginPath();
      ctx.arc(px, py, 3.5, 0, 2 * Math.PI);
      ctx.stroke();
    }
    for (const [x, y] of this.draws.learned ?? []) {
      const [px, py] = this.#px([x, y]);
      ctx.fillStyle = "#fff";
      ctx.strokeStyle = "#000";
      ctx.beginPath();
      ctx.arc(px, py, 3.5, 0, 2 * Math.PI);
      ctx.fill();
      ctx.stroke();
    }
  }

  #listen() {
    const canvas = this.canvas;
    canvas.addEventListener("pointermove", (event) => {
      if (!this.map) return;
      // Mouse and pen follow the pointer; a finger only while it touches (dragging).
      if (event.pointerType === "touch" && !event.pressure) return;
      this.moveTo(this.#fromEvent(event));
    });
    canvas.addEventListener("pointerdown", (event) => {
      if (!this.map) return;
      canvas.focus({ preventScroll: true });
      this.moveTo(this.#fromEvent(event));
    });
    canvas.addEventListener("keydown", (event) => {
      if (!this.map) return;
      const step = event.shiftKey ? 0.5 : 0.1;
      const [x, y] = this.cursor ?? [0, 0];
      const moves = {
        ArrowLeft: [x - step, y],
        ArrowRight: [x + step, y],
        ArrowUp: [x, y + step],
        ArrowDown: [x, y - step],
        Home: [0, 0],
      };
      if (!(event.key in moves)) return;
      event.preventDefault(); // arrow keys would scroll the page
      this.moveTo(moves[event.key]);
    });
  }
}
