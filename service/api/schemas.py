"""Request and response bodies, with the examples /docs shows.

Limits that an operator can change (how many images, how large n) are checked against
Settings where the request is handled, not here; these schemas hold what never changes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, FiniteFloat, StrictBool, model_validator

from service.model.latent_map import LatentMapData
from service.model.latents import MAX_ABS_LATENT, MAX_SEED

# A 28x28 PNG of a "1", light on black, as the examples' image.
EXAMPLE_PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAABwAAAAcCAAAAABXZoBIAAAAJ0lEQVR42mNgGGSAEZX7H0WECZ9OukiiumcQOIg2kmj"
    "eHBAHDToAANj1AyQAcZmsAAAAAElFTkSuQmCC"
)

SIDE = 28  # every image is SIDE x SIDE pixels
# The string format of an uploaded image: what no JSON Schema keyword can say, that the string
# decodes to a PNG or JPEG with a visible digit. tests/schemathesis_hooks.py generates them.
IMAGE_FORMAT = "image-base64"


def _whole(value: Any) -> Any:
    """JSON Schema's integer: 4 and 4.0 both are one (true is not, nor "4")."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Integer = Annotated[int, BeforeValidator(_whole)]
# Strict: the document says boolean, so 0, 1 and "true" are refused rather than read as one.
Invert = Literal["auto"] | StrictBool
ImageFormat = Literal["png", "array"]
PriorName = Literal["learned", "standard"]
# A class index (120.0 is one too, as in JSON Schema) or a class name.
Label = (
    Annotated[int, Field(ge=0, le=1023), BeforeValidator(_whole)]
    | Annotated[str, Field(min_length=1, max_length=64)]
)
Images = list[str] | list[list[list[float]]]

MODEL_FIELD = Field(
    None,
    description="A loaded model's name (GET /models); the default model when left out. "
    "The `model` query parameter does the same.",
    examples=["mnist"],
)
PRIOR_FIELD = Field(
    None,
    description="Where the noise u ~ N(0, temperature^2 I) goes. `standard`: z = u, the textbook "
    "N(0, I) prior; draws that land between the regions where real digits' codes lie decode to "
    "shapes between digits. `learned`: z = prior(u), the model's learned map from noise to where "
    "the codes of real digits lie (the aggregate posterior), so draws avoid those holes. Left out: "
    "the model's default, `learned` where it has one (GET /models/{name} lists its priors).",
)
LABEL_FIELD = Field(
    None,
    description="Draw only this class: its index (0-9 for digits) or its name as GET /models/{name} "
    "lists it. Every draw then goes through the learned prior's mixture for that class, p(z | y); "
    "only for models that list classes, and not with `prior: standard`.",
    examples=[7, "7"],
)
VERDICTS_FIELD = Field(
    False,
    description="Also return `verdicts`: per image, the class the model's shipped classifier reads "
    "(`label`, an index into the model's classes) and its probability (`confidence`). Only for "
    "models whose artifact ships a classifier (GET /models/{name}: `classifier`).",
)
MIN_CONFIDENCE_FIELD = Field(
    None,
    gt=0.0,
    lt=1.0,
    description="Return only draws that the classifier reads as the requested `label` (or, without "
    "one, as any class) with at least this probability; the others are redrawn from fresh noise "
    "that depends on the seed alone, so the same seed gives the same images. `redraws` says how "
    "many were redrawn. When some draw is still not accepted after VAE_MAX_DRAW_ATTEMPTS attempts "
    "(10 by default) the answer is 422 `min-confidence-not-reached`.",
)
FORMAT_FIELD = Field(
    "png",
    description="How images come back: `png`, base64-encoded PNG files, or `array`, "
    "floats in [0, 1] shaped [B][28][28]. With `Accept: image/png` the response is one PNG "
    "instead (a grid when there are several images).",
)


class _Request(BaseModel):
    # A misspelt field ("seeds", "image") is an error, not silently ignored; and strict types:
    # the document says integer, number or boolean, so "4", true for n or 1 for a boolean are
    # refused rather than converted (an integer for a number field is still a number).
    model_config = ConfigDict(extra="forbid", strict=True)


def _image_request_schema(schema: dict[str, Any]) -> None:
    """The document's ImageRequest says what the server checks (check_pixels, _one_source):
    `images` or `pixels`, one of them, a non-empty list, never null; pixels [B][28][28] in [0, 1]."""
    schema["examples"] = [
        {"images": [EXAMPLE_PNG]},
        {"images": [EXAMPLE_PNG], "model": "mnist", "invert": "auto", "format": "array"},
        {"pixels": [[[0.0] * SIDE] * SIDE]},
    ]
    props = schema["properties"]
    for name in ("images", "pixels"):
        nullable = props[name].pop("anyOf")
        props[name].update(next(branch for branch in nullable if branch.get("type") == "array"), minItems=1)
    # A PNG or JPEG file in base64, or a data: URL of one (IMAGE_FORMAT).
    # Never empty: "" is no file (the server says so with 422 invalid-image).
    props["images"]["items"].update(format=IMAGE_FORMAT, contentEncoding="base64", minLength=1)
    pixel = {"type": "number", "minimum": 0.0, "maximum": 1.0}
    # With examples: a generator that must invent 28 x 28 numbers for every case spends
    # seconds on each (schemathesis' coverage phase took 135 s for /encode without them).
    row = {"type": "array", "items": pixel, "minItems": SIDE, "maxItems": SIDE, "examples": [[0.0] * SIDE]}
    image = {"type": "array", "items": row, "minItems": SIDE, "maxItems": SIDE}
    props["pixels"]["items"] = image | {"examples": [[[0.0] * SIDE] * SIDE]}
    schema["oneOf"] = [{"required": ["images"]}, {"required": ["pixels"]}]


def _decode_request_schema(schema: dict[str, Any]) -> None:
    """Examples, and what service.api.inputs.latents checks of every number: within ±MAX_ABS_LATENT.

    One rule the document cannot state: every row of z has the latent_dim of the model the
    request selects, and that model may be named by the `model` query parameter, which a body
    schema cannot see (and the loaded models change on reload, while clients cache the
    document). The description says it; tests/service/test_service_errors.py tests the 422 it gets."""
    schema["examples"] = [
        {"z": [[0.0] * 32]},
        {"z": [[0.5, -1.0], [1.5, 0.2]], "model": "mnist-2d", "format": "array"},
    ]
    schema["properties"]["z"]["items"]["items"].update(minimum=-MAX_ABS_LATENT, maximum=MAX_ABS_LATENT)


class ImageRequest(_Request):
    """Images for /encode and /reconstruct: `images` or `pixels`, not both."""

    images: list[str] | None = Field(
        None,
        description="PNG or JPEG files, base64-encoded (a data: URL also "
        "works). Any size, colour mode or polarity: each is fitted into 28x28 "
        "the way MNIST digits were (docs/service.md).",
    )
    pixels: list[list[list[FiniteFloat]]] | None = Field(
        None,
        description="Images already in the model's "
        "format: [B][28][28] floats in [0, 1], light digit on "
        "black. Used as they are.",
    )
    model: str | None = MODEL_FIELD
    invert: Invert = Field(
        "auto",
        description="`auto` inverts images whose ink is darker than their "
        "background (MNIST digits are light on black); true or false forces it.",
    )
    format: ImageFormat = FORMAT_FIELD
    return_verdicts: StrictBool = Field(
        False,
        description="Also return `verdicts`: the shipped classifier's reading of each image (/encode: "
        "of the image sent; /reconstruct: of its reconstruction), `label` and `confidence`.",
    )

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra=_image_request_schema,
    )

    @model_validator(mode="before")
    @classmethod
    def _no_null_source(cls, data: Any) -> Any:
        if isinstance(data, dict):
            nulls = [name for name in ("images", "pixels") if name in data and data[name] is None]
            if nulls:
                raise ValueError(
                    f"`{nulls[0]}` is null; leave it out, and send exactly one of `images` "
                    "(base64 PNG/JPEG files) or `pixels` ([B][28][28] floats)"
                )
        return data

    @model_validator(mode="after")
    def _one_source(self) -> ImageRequest:
        if (self.images is None) == (self.pixels is None):
            raise ValueError(
                "send exactly one of `images` (base64 PNG/JPEG files) or `pixels` ([B][28][28] floats)"
            )
        if not (self.images or self.pixels):
            raise ValueError("the list of images is empty; send at least one")
        return self


class DecodeRequest(_Request):
    z: list[Annotated[list[FiniteFloat], Field(min_length=1)]] = Field(
        min_length=1,
        description="Latent vectors, one row per image, each of exactly the latent_dim of the model the "
        "request selects (the body's `model`, else the `model` query parameter, else the default; GET "
        "/models lists each model's latent_dim); other widths are refused with 422 invalid-latents.",
        examples=[[[0.0] * 32]],  # for the default model, mnist (latent_dim 32)
    )
    model: str | None = MODEL_FIELD
    format: ImageFormat = FORMAT_FIELD

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra=_decode_request_schema,
    )


class SampleRequest(_Request):
    n: Integer = Field(ge=1, description="How many images to draw; at most VAE_MAX_SAMPLES (1024 by default)")
    # The bounds inside the union and before the validator, so that the document puts them on
    # the integer as minimum and maximum.
    seed: Annotated[int, Field(ge=0, le=MAX_SEED), BeforeValidator(_whole)] | None = Field(
        None,
        description="The same seed gives the same latents and "
        "images on every call. Left out, the server picks one and returns it.",
    )
    temperature: FiniteFloat = Field(
        1.0,
        gt=0.0,
        le=100.0,
        description="The spread of the draws. Under the standard prior it scales the noise, z = "
        "temperature * u. Under a learned mixture prior (format 3 models) it scales the draw within "
        "the mixture component, z = mean_k + L_k (temperature * v), and never changes which "
        "component is used: the mix of digits is the same at every temperature. Below 1 gives "
        "cleaner, less varied digits.",
    )
    prior: PriorName | None = PRIOR_FIELD
    label: Label | None = LABEL_FIELD
    return_verdicts: StrictBool = VERDICTS_FIELD
    min_confidence: FiniteFloat | None = MIN_CONFIDENCE_FIELD
    return_latents: StrictBool = Field(
        False, description="Also return the latent vectors z and the noise u they were made from."
    )
    model: str | None = MODEL_FIELD
    format: ImageFormat = FORMAT_FIELD

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"n": 16, "seed": 1},
                {"n": 4, "seed": 7, "temperature": 0.8, "return_latents": True, "format": "array"},
                {"n": 16, "seed": 3, "prior": "standard"},
                {"n": 8, "seed": 1, "label": 7, "return_verdicts": True, "min_confidence": 0.9},
            ]
        },
    )


class Verdict(BaseModel):
    label: int = Field(description="The class the classifier reads, an index into the model's classes.")
    confidence: float = Field(description="The classifier's probability for that class.")


class EncodeResponse(BaseModel):
    model: str
    version: str
    latent_dim: int
    mu: list[list[float]] = Field(description="Posterior means, [B][latent_dim].")
    sigma: list[list[float]] = Field(description="Posterior standard deviations, [B][latent_dim].")
    kl: list[float] = Field(description="Each image's KL(q(z|x) || N(0, I)), in nats.")
    verdicts: list[Verdict] | None = Field(None, description="With return_verdicts: each image's verdict.")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "mnist-2d",
                    "version": "v1",
                    "latent_dim": 2,
                    "mu": [[0.31, -1.2]],
                    "sigma": [[0.05, 0.07]],
                    "kl": [5.43],
                },
            ]
        }
    )


class DecodeResponse(BaseModel):
    model: str
    version: str
    format: ImageFormat
    images: Images = Field(description="Base64 PNGs, or [B][28][28] floats with format=array.")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"model": "mnist", "version": "v1", "format": "png", "images": [EXAMPLE_PNG]},
            ]
        }
    )


class SampleResponse(BaseModel):
    model: str
    version: str
    format: ImageFormat
    seed: int = Field(description="The seed used: send it back to get the same images.")
    temperature: float
    prior: PriorName = Field(description="The prior the draws went through.")
    images: Images
    z: list[list[float]] | None = Field(None, description="The latents, when return_latents was true.")
    u: list[list[float]] | None = Field(
        None,
        description="The noise z was made from, u ~ N(0, temperature^2 I), when return_latents was "
        "true (equal to z under the standard prior).",
    )
    label: int | None = Field(None, description="The class drawn (an index), when the request named one.")
    verdicts: list[Verdict] | None = Field(
        None, description="With return_verdicts or min_confidence: each image's verdict."
    )
    redraws: int | None = Field(
        None, description="With min_confidence: how many draws were replaced by fresh ones."
    )

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "mnist",
                    "version": "v1",
                    "format": "png",
                    "seed": 1,
                    "temperature": 1.0,
                    "prior": "learned",
                    "images": [EXAMPLE_PNG],
                },
            ]
        }
    )


class ReconstructResponse(BaseModel):
    model: str
    version: str
    format: ImageFormat
    images: Images = Field(description="decode(mu) for each input image.")
    mu: list[list[float]]
    sigma: list[list[float]]
    verdicts: list[Verdict] | None = Field(
        None, description="With return_verdicts: the classifier's reading of each reconstruction."
    )

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "mnist-2d",
                    "version": "v1",
                    "format": "png",
                    "images": [EXAMPLE_PNG],
                    "mu": [[0.31, -1.2]],
                    "sigma": [[0.05, 0.07]],
                },
            ]
        }
    )


class ClassInfo(BaseModel):
    index: int
    name: str
    train_share: float | None = Field(None, description="Its share of the training images.")
    mean_code: list[float] | None = Field(
        None, description="The mean of the posterior means of its test images, [latent_dim]."
    )


class ModelInfo(BaseModel):
    name: str
    version: str
    latent_dim: int
    device: str
    runtime: Literal["torchscript", "export"] | None = Field(
        None, description="Which of the artifact's files run (VAE_RUNTIME): model.pt or model.pt2."
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="What the decoder computes in (VAE_PRECISION)."
    )
    precision_check: dict[str, Any] | None = Field(
        None,
        description="What chose the precision: the setting, the reason, and where a lower precision "
        "was measured, its pass time against fp32's and the classifier's agreement on its draws.",
    )
    default: bool = Field(description="Whether requests that name no model go to this one.")
    likelihood: str | None = None
    dataset: str | None = Field(None, description="The name of the dataset it was trained on.")
    created_at: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict, description="The manifest's evaluation metrics.")
    latent_map: bool = Field(
        False, description="Whether GET /models/{name}/latent-map has this model's map of test digits."
    )
    priors: list[PriorName] = Field(
        default_factory=lambda: ["standard"],
        description="The priors /sample can draw through: `standard` always, `learned` where the "
        "model has a learned map from noise to latents.",
    )
    default_prior: PriorName = Field(
        "standard", description="The prior /sample uses when a request names none."
    )
    prior_metrics: dict[str, Any] = Field(
        default_factory=dict,
        description="Per prior, what the manifest records of it: how it was made, and the digit "
        "classifier's verdict on its draws.",
    )
    classes: list[ClassInfo] = Field(
        default_factory=list,
        description="The classes `label` can name (empty for a model trained without labels), each "
        "with its mean code: a point in the region of the latent space where that class lies.",
    )
    conditional: bool = Field(False, description="Whether /sample can draw a given class (`label`).")
    classifier: dict[str, Any] | None = Field(
        None, description="The shipped classifier that gives verdicts (its test accuracy), or null."
    )

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "mnist",
                    "version": "v1",
                    "latent_dim": 32,
                    "device": "cpu",
                    "default": True,
                    "likelihood": "bernoulli",
                    "dataset": "mnist",
                    "created_at": "2026-01-01T00:00:00Z",
                    "metrics": {"test_elbo_nats": -80.1},
                    "priors": ["standard", "learned"],
                    "default_prior": "learned",
                },
            ]
        }
    )


class ModelsResponse(BaseModel):
    default: str
    models: list[ModelInfo]


class LatentMapResponse(LatentMapData):
    model: str
    version: str
    latent_dim: int

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "mnist-2d",
                    "version": "v1",
                    "latent_dim": 2,
                    "description": "posterior means of test digits",
                    "projection": None,
                    "class_names": ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"],
                    "points": [[0.41, -1.3, 7], [-0.2, 0.93, 2]],
                },
            ]
        }
    )


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    status: Literal["ready"] = "ready"
    models: list[str]


class ReloadedModel(BaseModel):
    model: str
    previous: str | None = Field(description="The version served before; null for a model new to the store.")
    version: str = Field(description="The version served from now on.")


class RefusedModel(BaseModel):
    model: str
    version: str = Field(description="The version that was refused.")
    serving: str | None = Field(description="The version that keeps serving; null if none was served.")
    reason: str = Field(description="Why, in one line: the file and the check that failed.")


class ReloadReport(BaseModel):
    """What a reload changed. Sent with 200 when every new version was loaded; when one was
    refused, the same members come inside a 409 problem (urn:vae:problem:reload-refused)."""

    trigger: Literal["api", "sighup"]
    loaded: list[ReloadedModel] = Field(description="Models now served at a new version.")
    refused: list[RefusedModel] = Field(description="New versions that failed their checks.")
    serving: dict[str, str] = Field(description="Every served model and its version, after the reload.")
    default: str
    seconds: float

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "trigger": "api",
                    "loaded": [{"model": "mnist", "previous": "v1", "version": "v2"}],
                    "refused": [],
                    "serving": {"mnist": "v2", "mnist-2d": "v1"},
                    "default": "mnist",
                    "seconds": 0.42,
                }
            ]
        }
    )


class ProblemItem(BaseModel):
    loc: str
    msg: str
    type: str


class Problem(BaseModel):
    """RFC 9457 problem details, served as application/problem+json."""

    type: str = Field(description="What kind of problem: urn:vae:problem:<kind>, or about:blank.")
    title: str
    status: int
    detail: str = Field(description="What was wrong and what was expected instead.")
    instance: str | None = Field(None, description="The request path.")
    errors: list[ProblemItem] | None = Field(None, description="For invalid requests: each problem found.")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "type": "urn:vae:problem:invalid-latents",
                    "title": "Invalid latent vectors",
                    "status": 422,
                    "detail": "z has rows of 2 numbers; model 'mnist' expects latent_dim 32",
                    "instance": "/decode",
                },
            ]
        }
    )
