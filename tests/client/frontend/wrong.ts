// Calls the types must refuse: if this module type-checks, the generated types say nothing.
import type { EncodeRequest, SampleRequest } from "./frontend.js";

export const numbersAsImages: EncodeRequest = { images: [1, 2] };
export const misspelt: SampleRequest = { n: 4, seeds: 1 };
export const noSuchPrior: SampleRequest = { n: 4, prior: "gaussian" };
export const labelAsBoolean: SampleRequest = { n: 4, label: true };
export const confidenceAsText: SampleRequest = { n: 4, min_confidence: "high" };
export const verdictsAsNumber: SampleRequest = { n: 4, return_verdicts: 1 };
