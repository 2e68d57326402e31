// Calls the types must refuse: if this module type-checks, the generated types say nothing.
import type { EncodeRequest, SampleRequest } from "./frontend.js";

export const numbersAsImages: EncodeRequest = { images: [1, 2] };
export const misspelt: SampleRequest = { n: 4, seeds: 1 };
export const noSuchPrior: SampleRequest = { n: 4, prior: "gaussian" };
