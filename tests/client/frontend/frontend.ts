// How a web app calls the VAE service, typed from the service's own OpenAPI document:
// `api.d.ts` is generated from the live /openapi.json by openapi-typescript, and the
// operation ids (encode, sample) are the names a front end looks them up by.
import type { components, operations } from "./api";

export type EncodeRequest = operations["encode"]["requestBody"]["content"]["application/json"];
export type EncodeResponse = operations["encode"]["responses"][200]["content"]["application/json"];
export type SampleRequest = operations["sample"]["requestBody"]["content"]["application/json"];
export type SampleResponse = operations["sample"]["responses"][200]["content"]["application/json"];
type Problem = components["schemas"]["Problem"];

async function post<Body, Answer>(base: string, path: string, body: Body): Promise<Answer> {
  const response = await fetch(`${base}${path}`, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "application/json" },
    body: JSON.stringify(body),
  });
  if (!response.ok) {
    const problem = (await response.json()) as Problem;
    throw new Error(`${response.status} ${problem.title}: ${problem.detail}`);
  }
  return (await response.json()) as Answer;
}

/** Base64 PNG or JPEG files -> each one's posterior mean and spread, and its KL in nats. */
export function encode(base: string, images: string[], model?: string): Promise<EncodeResponse> {
  const body: EncodeRequest = { images, model };
  return post(base, "/encode", body);
}

/** n digits drawn from the standard prior N(0, I), as base64 PNGs, from a seed. */
export function sample(base: string, n: number, seed: number): Promise<SampleResponse> {
  const body: SampleRequest = { n, seed, prior: "standard", format: "png", return_latents: true };
  return post(base, "/sample", body);
}

/** n draws of one digit through the learned prior, each with the classifier's verdict; only
 *  draws it reads as that digit at least `minConfidence` surely (the others are redrawn). */
export function sampleDigit(base: string, label: number | string, n: number, minConfidence?: number): Promise<SampleResponse> {
  const body: SampleRequest = { n, label, return_verdicts: true, min_confidence: minConfidence };
  return post(base, "/sample", body);
}

/** How surely the classifier read each draw: the fields a front end shows under a digit. */
export function confidences(answer: SampleResponse): number[] {
  return (answer.verdicts ?? []).map((verdict) => verdict.confidence);
}
