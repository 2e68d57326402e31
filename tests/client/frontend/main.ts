// Calls the running service the way a page would, and prints what it got back.
import { BASE, DIGIT } from "./config.js";
import { encode, sample } from "./frontend.js";

const drawn = await sample(BASE, 4, 1);
const first = drawn.images[0];
const encoded = await encode(BASE, [DIGIT]);
console.log(
  JSON.stringify({
    images: drawn.images.length,
    png: typeof first === "string" && first.startsWith("iVBORw0KGgo"),
    seed: drawn.seed,
    prior: drawn.prior,
    z: drawn.z?.[0]?.length,
    mu: encoded.mu[0].length,
    sigma: encoded.sigma[0].length,
    kl: encoded.kl[0] > 0,
  }),
);
