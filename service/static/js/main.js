// The explorer page: wires the panels to the API. Each panel reports its own errors in its
// status line; a 401 anywhere opens the API-key form.

import { api, getApiKey, pngSrc, setApiKey } from "./api.js";
import { renderPosterior } from "./charts.js";
import { DrawPad } from "./draw.js";
import { LatentMapView, PALETTE } from "./latentmap.js";
import { $, busyFlag, digitImage, LatestOnly, showError, showStatus } from "./ui.js";

const state = { models: [], model: null };
const modelSelect = $("#model");
const globalStatus = $("#global-status");
const reportBug = (error) => showError(globalStatus, error);

// ------------------------------------------------------------------ models and API key

async function loadModels() {
  showStatus(globalStatus, "Loading the list of models\u2026");
  try {
    const { default: preferred, models } = await api.models();
    state.models = models;
    fillModelSelect(preferred);
    fillMapSelect();
    showStatus(globalStatus, "");
    refreshAll();
  } catch (error) {
    showError(globalStatus, error);
  }
}

function describeModel(m) {
  return `${m.name} ${m.version} \u2013 latent_dim ${m.latent_dim}${m.default ? ", default" : ""}`;
}

function fillModelSelect(preferred) {
  const keep = state.model;
  modelSelect.replaceChildren(...state.models.map((m) => new Option(describeModel(m), m.name)));
  const names = state.models.map((m) => m.name);
  state.model = names.includes(keep) ? keep : names.includes(preferred) ? preferred : names[0];
  modelSelect.value = state.model;
  modelSelect.disabled = !state.models.length;
  updateModelInfo();
}

function updateModelInfo() {
  fillLabelSelect();
  const m = state.models.find((item) => item.name === state.model);
  const test = m?.metrics?.test;
  $("#model-info").textContent = test?.neg_elbo
    ? `test -ELBO ${test.neg_elbo.toFixed(1)} nats (KL ${test.kl.toFixed(1)}), trained on ${m.dataset}`
    : m ? `trained on ${m.dataset ?? "unknown data"}` : "";
}

modelSelect.addEventListener("change", () => {
  state.model = modelSelect.value;
  updateModelInfo();
  refreshAll();
});

function refreshAll() {
  if (!mainPad.empty) encodeDrawing();
  drawSamples();
  if ($("#interp-strip").childElementCount) interpolate();
  if (!mapView.map) loadMap();
}

const keyPanel = $("#key-panel");
$("#api-key").value = getApiKey();
$("#key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  setApiKey($("#api-key").value.trim());
  loadModels();
});
$("#key-forget").addEventListener("click", () => {
  setApiKey("");
  $("#api-key").value = "";
});
document.addEventListener("api-unauthorized", () => {
  if (!keyPanel.open) {
    keyPanel.open = true;
    $("#api-key").focus();
  }
});

// ------------------------------------------------------------------ encoder panel

const encodeStatus = $("#encode-status");
const reconstruction = $("#reconstruction");
const chartHint = $("#posterior-chart").firstElementChild; // shown while there is no digit
let lastEncoding = null;

const encoder = new LatestOnly(
  ({ model, image }) => api.reconstruct(model, [image]),
  {
    onResult: (answer) => {
      lastEncoding = answer;
      reconstruction.src = pngSrc(answer.images[0]);
      reconstruction.alt = `Reconstruction of your digit by ${answer.model}`;
      showEncoding();
      showStatus(encodeStatus, "");
    },
    onError: (error) => showError(encodeStatus, error),
    onBusy: busyFlag($("#encode-panel")),
  },
);

function showEncoding() {
  if (!lastEncoding) return;
  const { mu, sigma, model, version } = lastEncoding;
  const total = renderPosterior($("#posterior-chart"), mu[0], sigma[0], { sortByKl: $("#sort-kl").checked });
  $("#kl-total").textContent =
    `KL(q(z|x) \u2016 N(0, I)) = ${total.toFixed(2)} nats over ${mu[0].length} dimensions (${model} ${version})`;
}

function clearEncoding() {
  lastEncoding = null;
  reconstruction.src = "/static/blank.png";
  reconstruction.alt = "Reconstruction: none yet";
  $("#posterior-chart").replaceChildren(chartHint);
  $("#kl-total").textContent = "";
  showStatus(encodeStatus, "");
}

function encodeDrawing() {
  if (mainPad.empty) clearEncoding();
  else if (state.model) encoder.request({ model: state.model, image: mainPad.image() });
}

const mainPad = new DrawPad($("[data-pad=main]"), { onChange: encodeDrawing, onError: reportBug });
$("#sort-kl").addEventListener("change", showEncoding);

// ------------------------------------------------------------------ sampling panel

const sampleForm = $("#sample-form");
const sampleStatus = $("#sample-status");

const modelInfo = (name) => state.models.find((m) => m.name === name);
const hasLearnedPrior = (name) => Boolean(modelInfo(name)?.priors?.includes("learned"));

const hasClassifier = (name) => Boolean(modelInfo(name)?.classifier);
const CONFIDENT = 0.9; // the confidence below which a draw is marked doubtful
const labelSelect = $("#sample-label");

// "any", then the model's classes; only a model whose learned prior is class-conditional can be
// asked for one, so the selector is disabled for the others.
function fillLabelSelect() {
  const m = modelInfo(state.model);
  const keep = labelSelect.value;
  const classes = m?.conditional ? m.classes : [];
  labelSelect.replaceChildren(new Option("any", ""), ...classes.map((c) => new Option(c.name, String(c.index))));
  labelSelect.value = classes.some((c) => String(c.index) === keep) ? keep : "";
  labelSelect.disabled = !classes.length;
  labelSelect.title = classes.length
    ? "Draw only this class, through the learned prior's mixture for it"
    : `${m?.name ?? "This model"} has no class-conditional prior`;
}

// Both priors from the same seed, so that the same noise u goes through each: the standard
// draw first (it picks the seed when none is given), then the learned one with its seed. A
// chosen digit applies to the learned prior alone: the standard prior cannot be asked for one.
async function sampleBothPriors({ model, n, seed, temperature, label }) {
  const verdicts = hasClassifier(model);
  const standard = await api.sample(model, n, seed, temperature, "standard", false, { verdicts });
  const learned = hasLearnedPrior(model)
    ? await api.sample(model, n, standard.seed, temperature, "learned", false, { label, verdicts })
    : null;
  return { standard, learned };
}

function className(model, index) {
  return modelInfo(model)?.classes?.[index]?.name ?? String(index);
}

// A draw: its image, and under it the classifier's verdict ("7 99%"), marked when doubtful.
function drawnDigit(answer, i, prior) {
  const alt = `Sample ${i + 1} of ${answer.images.length}, ${prior} prior`;
  const verdict = answer.verdicts?.[i];
  if (!verdict) return digitImage(answer.images[i], alt);
  const name = className(answer.model, verdict.label);
  const percent = `${Math.floor(verdict.confidence * 100)}%`;
  const figure = document.createElement("figure");
  figure.className = "draw";
  const doubtful = verdict.confidence < CONFIDENT;
  figure.classList.toggle("doubtful", doubtful);
  figure.dataset.label = String(verdict.label);
  figure.dataset.confidence = String(verdict.confidence);
  const caption = document.createElement("figcaption");
  caption.textContent = `${name} ${percent}`;
  figure.append(digitImage(answer.images[i], `${alt}: read as ${name}, ${percent} sure${doubtful ? " (doubtful)" : ""}`), caption);
  return figure;
}

function confidentCount(answer) {
  return answer.verdicts.filter((v) => v.confidence >= CONFIDENT).length;
}

function verdictSummary(standard, learned) {
  if (!standard.verdicts) return "";
  const of = (answer, what) => `${confidentCount(answer)} of ${answer.images.length} ${what}`;
  const parts = [of(standard, "standard-prior draws")];
  if (learned) {
    const asked = learned.label === undefined || learned.label === null ? "" : ` (asked for ${className(learned.model, learned.label)})`;
    parts.push(of(learned, `learned-prior draws${asked}`));
  }
  return `The classifier reads ${parts.join(" and ")} with at least ${CONFIDENT * 100}% confidence; the others are outlined in red.`;
}

const sampler = new LatestOnly(sampleBothPriors, {
  onResult: ({ standard, learned }) => {
    const grid = (answer, prior) => answer.images.map((_, i) => drawnDigit(answer, i, prior));
    $("#sample-grid-standard").replaceChildren(...grid(standard, "standard"));
    $("#sample-grid-learned").replaceChildren(...(learned ? grid(learned, "learned") : []));
    $("#sample-learned").hidden = !learned;
    $("#sample-seed-used").textContent =
      `Seed ${standard.seed}, temperature ${standard.temperature}, ${standard.model} ${standard.version}. ` +
      "Enter the seed to draw these again.";
    $("#sample-verdicts").textContent = verdictSummary(standard, learned);
    $("#sample-why").textContent = learned
      ? "Each position holds the same noise u in both grids: where u falls between the regions in which " +
        "real digits' codes lie, the standard prior decodes a shape between digits, while the learned " +
        "prior has moved it into one of those regions" +
        (learned.label === undefined || learned.label === null
          ? "."
          : ` (here, into the region of the ${className(learned.model, learned.label)}s).`)
      : `${standard.model} has the standard prior only: its artifact carries no learned map from noise to latents.`;
    showStatus(sampleStatus, "");
  },
  onError: (error) => showError(sampleStatus, error),
  onBusy: busyFlag($("#sample-panel")),
});

function drawSamples() {
  // Also called when the model changes: never send what the form itself would refuse.
  if (!state.model || !sampleForm.checkValidity()) return;
  const seedText = $("#sample-seed").value.trim();
  sampler.request({
    model: state.model,
    n: Number($("#sample-n").value),
    seed: seedText === "" ? null : Number(seedText),
    temperature: Number($("#sample-temperature").value),
    label: labelSelect.value === "" || labelSelect.disabled ? null : Number(labelSelect.value),
  });
}

labelSelect.addEventListener("change", drawSamples);

sampleForm.addEventListener("submit", (event) => {
  event.preventDefault(); // the browser has checked the fields' ranges before this fires
  drawSamples();
});

// ------------------------------------------------------------------ latent map panel

const mapSelect = $("#map-model");
const mapStatus = $("#map-status");
const mapDecoded = $("#map-decoded");

const mapDecoder = new LatestOnly(({ model, z }) => api.decode(model, [z]), {
  onResult: (answer, { point, label }) => {
    mapDecoded.src = pngSrc(answer.images[0]);
    mapDecoded.alt = `Decoded digit at (${point.map((v) => v.toFixed(2)).join(", ")})`;
    $("#map-z").textContent = `(${point.map((v) => v.toFixed(2)).join(", ")}); nearest test digit: ${label}`;
    showStatus(mapStatus, "");
  },
  onError: (error) => showError(mapStatus, error),
  minGapMs: 30, // a few dozen decodes a second at most, however fast the pointer moves
});

const mapView = new LatentMapView($("#map"), {
  onPick: (point) => {
    const map = mapView.map;
    const [label] = mapView.nearest(point);
    mapDecoder.request({
      model: map.model,
      z: mapView.toLatent(point),
      point,
      label: label === null ? "none" : map.class_names[label],
    });
  },
});

function fillMapSelect() {
  const withMaps = state.models.filter((m) => m.latent_map);
  const keep = mapSelect.value;
  mapSelect.replaceChildren(...withMaps.map((m) => new Option(`${m.name} (latent_dim ${m.latent_dim})`, m.name)));
  mapSelect.disabled = !withMaps.length;
  // The 2-D model first: its map is its whole latent space, not a slice of it.
  const preferred = withMaps.find((m) => m.name === keep) ?? withMaps.find((m) => m.latent_dim === 2) ?? withMaps[0];
  if (preferred) mapSelect.value = preferred.name;
  else {
    mapView.clear();
    showStatus(mapStatus, "None of the loaded models carries a latent map (report/latent_map.json in its artifact).");
  }
}

async function loadMap() {
  const name = mapSelect.value;
  if (!name) return;
  busyFlag($("#map-panel"))(true);
  try {
    const map = await api.latentMap(name);
    if (mapSelect.value !== name) return; // the user picked another model meanwhile
    mapView.setData(map);
    fillLegend(map.class_names);
    await showDraws();
    $("#map-explain").textContent = map.projection
      ? `${map.model} has ${map.latent_dim} latent dimensions. The map shows the plane of the two main ` +
        "(PCA) axes of its test digits' means; the cursor decodes x\u00b7axis\u2081 + y\u00b7axis\u2082, every " +
        "other direction at the prior's mean, 0. Pick a 2-D model to see a whole latent space."
      : `${map.model} has 2 latent dimensions: the map is its whole latent space, and the cursor is z itself.`;
    showStatus(mapStatus, "");
  } catch (error) {
    mapView.clear();
    showError(mapStatus, error);
  } finally {
    busyFlag($("#map-panel"))(false);
  }
}

function fillLegend(classNames) {
  $("#map-legend").replaceChildren(
    ...classNames.map((name, i) => {
      const item = document.createElement("li");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.backgroundColor = PALETTE[i % PALETTE.length]; // CSSOM, which the CSP allows
      item.append(swatch, name);
      return item;
    }),
  );
}

mapSelect.addEventListener("change", loadMap);

// Draws of each prior over the map: where the noise lands in latent space, beside the codes
// of real digits. A fixed seed, so that toggling shows the same draws again.
const DRAWS = 100;
const drawBoxes = { standard: $("#map-draws-standard"), learned: $("#map-draws-learned") };

async function showDraws() {
  const map = mapView.map;
  if (!map) return;
  const learned = hasLearnedPrior(map.model);
  drawBoxes.learned.disabled = !learned;
  if (!learned) drawBoxes.learned.checked = false;
  const draws = {};
  try {
    for (const [prior, box] of Object.entries(drawBoxes)) {
      if (!box.checked) continue;
      const answer = await api.sample(map.model, DRAWS, 1, 1.0, prior, true);
      if (mapView.map !== map) return; // another map was loaded meanwhile
      draws[prior] = answer.z.map((z) => mapView.toMap(z));
    }
  } catch (error) {
    showError(mapStatus, error);
    return;
  }
  mapView.setDraws(draws);
  const shown = Object.keys(draws);
  $("#map-draws-explain").textContent = !shown.length
    ? learned
      ? "Tick a box to plot draws of either prior over the test digits."
      : `${map.model} has the standard prior only.`
    : `${DRAWS} draws of u ~ N(0, I) (seed 1) through the ${shown.join(" and the ")} prior: ` +
      shown.map((prior) => (prior === "standard" ? "black rings for z = u" : "white dots for z = prior(u)")).join(", ") +
      ". Draws of the standard prior that land between the coloured regions decode to shapes between digits.";
}

for (const box of Object.values(drawBoxes)) box.addEventListener("change", showDraws);

// ------------------------------------------------------------------ interpolation panel

const interpStatus = $("#interp-status");
const padA = new DrawPad($("[data-pad=a]"), { onError: reportBug });
const padB = new DrawPad($("[data-pad=b]"), { onError: reportBug });

async function interpolateTask({ model, a, b, steps }) {
  const ends = await api.reconstruct(model, [a, b]);
  const [muA, muB] = ends.mu;
  const ts = Array.from({ length: steps }, (_, i) => i / (steps - 1));
  const z = ts.map((t) => muA.map((value, d) => (1 - t) * value + t * muB[d]));
  return { ts, decoded: await api.decode(model, z) };
}

const interpolator = new LatestOnly(interpolateTask, {
  onResult: ({ ts, decoded }) => {
    $("#interp-strip").replaceChildren(
      ...decoded.images.map((b64, i) => digitImage(b64, `Step ${i + 1}: t = ${ts[i].toFixed(2)} from A to B`)),
    );
    showStatus(interpStatus, `${ts.length} points on the straight line from \u03bc_A to \u03bc_B, decoded by ${decoded.model}.`);
  },
  onError: (error) => showError(interpStatus, error),
  onBusy: busyFlag($("#interp-panel")),
});

function interpolate() {
  if (!$("#interp-form").checkValidity()) return;
  if (padA.empty || padB.empty) {
    showStatus(interpStatus, "Draw or drop a digit in both A and B first.", "error");
    return;
  }
  interpolator.request({ model: state.model, a: padA.image(), b: padB.image(), steps: Number($("#interp-steps").value) });
}

$("#interp-form").addEventListener("submit", (event) => {
  event.preventDefault();
  interpolate();
});

// A file dropped next to a pad would make the browser leave the page to show it.
for (const type of ["dragover", "drop"]) window.addEventListener(type, (event) => event.preventDefault());

loadModels();
