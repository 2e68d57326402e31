// The posterior chart: for every latent dimension, mu +- sigma drawn against the prior N(0, 1).
// SVG, styled by classes in style.css (the CSP allows no inline styles).

const SVG_NS = "http://www.w3.org/2000/svg";
const AXIS = 4; // the x axis spans -4..4: the prior's +-4 sigma
const ROW = 15;
const TOP = 20;
const LABEL_W = 40;
const KL_W = 50;
const WIDTH = 420;
const PLOT_W = WIDTH - LABEL_W - KL_W;

/** KL(N(mu, sigma^2) || N(0, 1)) per dimension, in nats: the closed form the service uses. */
export const klPerDim = (mu, sigma) =>
  mu.map((m, i) => 0.5 * (m * m + sigma[i] * sigma[i] - 1 - 2 * Math.log(sigma[i])));

const sum = (values) => values.reduce((a, b) => a + b, 0);

function svg(tag, attributes = {}, parent = null) {
  const element = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, String(value));
  parent?.appendChild(element);
  return element;
}

const x = (value) => LABEL_W + ((Math.max(-AXIS, Math.min(AXIS, value)) + AXIS) / (2 * AXIS)) * PLOT_W;
const fmt = (value, digits = 2) => value.toFixed(digits);

/** Draws the chart into `container`; returns the total KL in nats. */
export function renderPosterior(container, mu, sigma, { sortByKl = false } = {}) {
  const kl = klPerDim(mu, sigma);
  const order = mu.map((_, i) => i);
  if (sortByKl) order.sort((a, b) => kl[b] - kl[a]);
  const height = TOP + ROW * order.length + 4;
  const total = sum(kl);

  const root = svg("svg", {
    viewBox: `0 0 ${WIDTH} ${height}`,
    class: "posterior",
    role: "img",
    "aria-label": `Posterior of each of the ${mu.length} latent dimensions against the prior N(0, 1); ` +
      `total KL ${fmt(total, 1)} nats. Hover a row for its numbers.`,
  });
  const rowsBottom = TOP + ROW * order.length;
  // The prior: +-2 sigma and +-1 sigma bands behind every row, and its mean.
  svg("rect", { x: x(-2), y: TOP, width: x(2) - x(-2), height: rowsBottom - TOP, class: "prior-band-2" }, root);
  svg("rect", { x: x(-1), y: TOP, width: x(1) - x(-1), height: rowsBottom - TOP, class: "prior-band" }, root);
  for (let tick = -AXIS; tick <= AXIS; tick += 1) {
    svg("line", { x1: x(tick), x2: x(tick), y1: TOP - 4, y2: rowsBottom, class: tick ? "tick" : "prior-mean" }, root);
    const label = svg("text", { x: x(tick), y: TOP - 7, class: "tick-label" }, root);
    label.textContent = String(tick);
  }
  const klHeader = svg("text", { x: WIDTH - 2, y: TOP - 7, class: "kl-label" }, root);
  klHeader.textContent = "KL nats";

  order.forEach((dim, row) => {
    const y = TOP + ROW * row + ROW / 2;
    const m = mu[dim];
    const s = sigma[dim];
    const g = svg("g", { class: "dim", "data-dim": dim, "data-mu": m, "data-sigma": s, "data-kl": kl[dim] }, root);
    svg("title", {}, g).textContent =
      `z${dim}: mu ${fmt(m)}, sigma ${fmt(s, 3)}, KL to the prior ${fmt(kl[dim], 3)} nats`;
    svg("rect", { x: 0, y: y - ROW / 2, width: WIDTH, height: ROW, class: "row-hit" }, g);
    svg("text", { x: LABEL_W - 6, y: y + 4, class: "dim-label" }, g).textContent = `z${dim}`;
    svg("line", { x1: x(m - s), x2: x(m + s), y1: y, y2: y, class: "posterior-bar" }, g);
    svg("circle", { cx: x(m), cy: y, r: 3.2, class: Math.abs(m) > AXIS ? "posterior-mean off-axis" : "posterior-mean" }, g);
    svg("text", { x: WIDTH - 2, y: y + 4, class: "kl-value" }, g).textContent = fmt(kl[dim]);
  });

  container.replaceChildren(root);
  return total;
}
