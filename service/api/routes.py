"""The endpoints. Each one reads its inputs (service.api.inputs), runs the model
(service.model.inference) and shapes the answer (service.api.responses), and does nothing else."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import FiniteFloat
from starlette.responses import Response

from service.api import responses
from service.api.dependencies import get_state, serving, serving_now
from service.api.inputs import (
    QUERY_OPTIONS_OPENAPI,
    ImageInput,
    JsonBodyRoute,
    chosen_format,
    image_input,
    latents,
    query_options,
)
from service.api.responses import NPY_MEDIA_TYPE, RAW_MEDIA_TYPE
from service.api.schemas import (
    DecodeRequest,
    DecodeResponse,
    EncodeResponse,
    Health,
    ImageRequest,
    Label,
    LatentMapResponse,
    ModelInfo,
    ModelsResponse,
    PriorName,
    Problem,
    Ready,
    ReconstructResponse,
    SampleRequest,
    SampleResponse,
)
from service.artifact import LEARNED_PRIOR
from service.edge.auth import KeyedRoute
from service.errors import NoClassifier, NoLatentMap, TooManyItems, UnknownLabel, UnknownPrior
from service.model import latent_map
from service.model.draws import Draw
from service.model.inference import Inference
from service.model.latents import MAX_SEED, random_seed
from service.model.runtime import ModelRegistry, ModelRuntime
from service.model.state import ServiceState

Serving = Annotated[tuple[ModelRegistry, Inference], Depends(serving)]
State = Annotated[ServiceState, Depends(get_state)]
ModelQuery = Annotated[
    str | None, Query(description="A loaded model's name; overridden by the body's `model`.")
]

_BINARY = {"schema": {"type": "string", "format": "binary"}}
# Every answer the Accept header can ask for (service.api.responses.negotiate), so that the
# document lists each content type a client can get.
PNG_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"image/png": _BINARY, NPY_MEDIA_TYPE: _BINARY, RAW_MEDIA_TYPE: _BINARY},
        "description": "JSON as below; with `Accept: image/png` one PNG (a grid for several images); "
        f"with `Accept: {NPY_MEDIA_TYPE}` a .npy file of the float32 images [B, 28, 28]; with "
        f"`Accept: {RAW_MEDIA_TYPE}` their uint8 pixels, row-major. The binary answers carry "
        "X-Shape (and X-Dtype for raw), X-Model and X-Model-Version.",
    },
}
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem, "description": text}
    for code, text in {
        401: "Missing or wrong API key (only when VAE_API_KEY is set).",
        404: "Unknown model.",
        408: "The request body did not arrive in time (VAE_BODY_TIMEOUT_S, plus a second per "
        "VAE_BODY_MIN_RATE bytes received, at most VAE_BODY_TIMEOUT_MAX_S): type `body-timeout`, "
        "sent with Connection: close.",
        413: "Request body over VAE_MAX_BODY_BYTES.",
        415: "Wrong Content-Type.",
        422: "Invalid input; `detail` says what is wrong and what is expected.",
        429: "This client address already has its share of the server's requests in flight "
        "(VAE_MAX_CLIENT_SHARE of VAE_MAX_CONCURRENT_REQUESTS): type `too-many-from-client`, with "
        "Retry-After.",
        500: "The model failed on this request's input (it raised, or gave NaN or infinity): type "
        "`model-failed`; other requests are unaffected and the server's log has the cause.",
        503: "Not ready (the models are loading or the server is stopping), overloaded (a full queue, "
        "or VAE_MAX_CONCURRENT_REQUESTS requests at once) or timed out (VAE_REQUEST_TIMEOUT_S); "
        "the last two with Retry-After.",
    }.items()
}


def _image_request_body() -> dict[str, Any]:
    schema = ImageRequest.model_json_schema()
    examples = {f"example {i + 1}": {"value": value} for i, value in enumerate(schema.pop("examples", []))}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": schema, "examples": examples},
                "multipart/form-data": {
                    "schema": {
                        "title": "ImageUpload",
                        "type": "object",
                        "properties": {
                            "images": {
                                "type": "array",
                                "items": {"type": "string", "format": "binary"},
                                "minItems": 1,
                                "description": "One or more PNG/JPEG files (any field name works).",
                            },
                            "model": {"type": "string"},
                            "invert": {"type": "string", "enum": ["auto", "true", "false"]},
                            "format": {"type": "string", "enum": ["png", "array"]},
                            "return_verdicts": {"type": "string", "enum": ["true", "false"]},
                        },
                        "required": ["images"],
                    },
                    "encoding": {"images": {"contentType": "image/png, image/jpeg"}},
                },
                "image/png": {"schema": {"type": "string", "format": "binary"}},
                "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    }


IMAGE_REQUEST_BODY = _image_request_body()


class ApiRoute(KeyedRoute, JsonBodyRoute):
    """The model and model-info endpoints: they need the API key (when one is set), and those
    with a JSON body model take only JSON (415 otherwise)."""


api = APIRouter(route_class=ApiRoute, responses=ERRORS)
probes = APIRouter(tags=["operations"])


@api.post(
    "/encode",
    response_model=EncodeResponse,
    tags=["model"],
    openapi_extra=IMAGE_REQUEST_BODY,
    summary="Images -> posterior mean, standard deviation and KL",
)
async def encode(request: Request, inputs: Annotated[ImageInput, Depends(image_input)]) -> Response:
    registry, inference, _ = serving_now(request)
    model = registry.get(inputs.model)
    _check_classifier(model, inputs.verdicts)
    mu, sigma = await inference.encode(model, inputs.pixels)
    probabilities = await inference.classify(model, inputs.pixels) if inputs.verdicts else None
    return responses.encoding(model, mu, sigma, probabilities)


@api.post(
    "/reconstruct",
    response_model=ReconstructResponse,
    tags=["model"],
    openapi_extra=IMAGE_REQUEST_BODY,
    responses=PNG_RESPONSE,
    summary="Images -> decode(mu), with mu and sigma",
)
async def reconstruct(request: Request, inputs: Annotated[ImageInput, Depends(image_input)]) -> Response:
    registry, inference, _ = serving_now(request)
    model = registry.get(inputs.model)
    _check_classifier(model, inputs.verdicts)
    mu, sigma = await inference.encode(model, inputs.pixels)
    x, encoded = await inference.decode(model, mu, responses.image_encoder(request, inputs.format, len(mu)))
    probabilities = await inference.classify(model, x) if inputs.verdicts else None
    return await responses.reconstruction(request, model, x, mu, sigma, inputs.format, encoded, probabilities)


@api.post(
    "/decode",
    response_model=DecodeResponse,
    tags=["model"],
    responses=PNG_RESPONSE,
    openapi_extra=QUERY_OPTIONS_OPENAPI,
    summary="Latent vectors -> images",
)
async def decode(request: Request, body: DecodeRequest) -> Response:
    registry, inference, state = serving_now(request)
    model, format = query_options(request)
    runtime = registry.get(body.model or model)
    z = latents(body.z, runtime.latent_dim, runtime.name, state.settings)
    fmt = chosen_format(body, format)
    x, encoded = await inference.decode(runtime, z, responses.image_encoder(request, fmt, len(z)))
    return await responses.decoded(request, runtime, x, fmt, encoded)


@api.post(
    "/sample",
    response_model=SampleResponse,
    tags=["model"],
    responses=PNG_RESPONSE,
    openapi_extra=QUERY_OPTIONS_OPENAPI,
    summary="Draw images: noise u ~ N(0, I) through a prior to latents z, decoded",
)
async def sample(request: Request, body: SampleRequest) -> Response:
    registry, inference, state = serving_now(request)
    model, format = query_options(request)
    runtime = registry.get(body.model or model)
    draw = _draw(runtime, state, body)
    fmt = chosen_format(body, format)
    drawn = await inference.sample(runtime, draw, responses.image_encoder(request, fmt, body.n))
    return await responses.samples(request, runtime, draw, drawn, fmt, body.return_latents)


@api.get(
    "/sample.png",
    tags=["model"],
    response_class=Response,
    summary="A grid of samples as one PNG",
    responses={
        200: {
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
            "description": "A PNG grid; headers X-Seed and X-Prior hold the seed and prior used, X-Label "
            "the class drawn, X-Verdicts (with return_verdicts or min_confidence) each image's verdict "
            "as `label:confidence`, comma-separated in the grid's reading order, and X-Redraws (with "
            "min_confidence) how many draws were redrawn.",
        }
    },
)
async def sample_png(
    serving: Serving,
    state: State,
    n: Annotated[int, Query(ge=1, description="How many images.")] = 16,
    seed: Annotated[int | None, Query(ge=0, le=MAX_SEED, description="Random when left out.")] = None,
    temperature: Annotated[FiniteFloat, Query(gt=0.0, le=100.0, description="As in POST /sample.")] = 1.0,
    prior: Annotated[
        PriorName | None,
        Query(description="`learned` or `standard`, as in POST /sample; the model's default when left out."),
    ] = None,
    label: Annotated[Label | None, Query(description="A class index or name, as in POST /sample.")] = None,
    return_verdicts: Annotated[bool, Query(description="Verdicts in the X-Verdicts header.")] = False,
    min_confidence: Annotated[
        FiniteFloat | None, Query(gt=0.0, lt=1.0, description="As in POST /sample.")
    ] = None,
    model: ModelQuery = None,
) -> Response:
    registry, inference = serving
    runtime = registry.get(model)
    # The query's values, checked by FastAPI already, as the body POST /sample would carry them.
    asked = SampleRequest.model_construct(
        n=n,
        seed=seed,
        temperature=temperature,
        prior=prior,
        label=label,
        return_verdicts=return_verdicts,
        min_confidence=min_confidence,
    )
    draw = _draw(runtime, state, asked)
    drawn = await inference.sample(runtime, draw)
    headers = responses.sample_headers(draw, drawn)
    if drawn.probabilities is not None:
        headers |= responses.verdicts_header(drawn.probabilities)
    return await responses.png_response(drawn.images, headers)


def _draw(runtime: ModelRuntime, state: ServiceState, asked: SampleRequest) -> Draw:
    """A /sample request's draw, checked against the model: 422 for what it cannot do."""
    limit = state.settings.max_samples
    if asked.n > limit:
        raise TooManyItems(f"n is {asked.n}; at most {limit} samples are drawn per request (VAE_MAX_SAMPLES)")
    prior = _chosen_prior(runtime, asked.prior)
    label = None if asked.label is None else _class_index(runtime, asked.label, prior)
    _check_classifier(runtime, asked.return_verdicts or asked.min_confidence is not None)
    return Draw(
        n=asked.n,
        seed=random_seed() if asked.seed is None else asked.seed,
        temperature=asked.temperature,
        prior=prior,
        label=label,
        verdicts=asked.return_verdicts,
        min_confidence=asked.min_confidence,
    )


def _class_index(runtime: ModelRuntime, label: int | str, prior: str) -> int:
    """The index of the class `label` names (its index, or its name), for a conditional draw."""
    where = f"model {runtime.name!r} ({runtime.version})"
    if not runtime.classes:
        raise UnknownLabel(f"{where} has no classes, so it cannot draw a given label; leave `label` out")
    listed = ", ".join(f"{i} ({name!r})" for i, name in enumerate(runtime.classes))
    # An index, or one written as a string (a query parameter always is one).
    numeric = isinstance(label, int) or (label.isascii() and label.isdigit())
    index: int | None = None
    if isinstance(label, str) and label in runtime.classes:
        index = runtime.classes.index(label)
    elif numeric and 0 <= int(label) < len(runtime.classes):
        index = int(label)
    if index is None:
        shown = label if numeric else repr(label)
        raise UnknownLabel(
            f"{where} has no class {shown}; its classes, by index and name: {listed}",
            classes=list(runtime.classes),
        )
    if not runtime.conditional:
        raise UnknownLabel(f"{where} lists classes but its learned prior cannot draw a given one")
    if prior != LEARNED_PRIOR:
        raise UnknownLabel(
            f"`label` draws through the learned prior's mixture for that class; this request asks for "
            f"the {prior!r} prior. Leave `prior` out (or send 'learned') to draw a given label"
        )
    return index


def _check_classifier(runtime: ModelRuntime, needed: bool) -> None:
    if needed and not runtime.has_classifier:
        raise NoClassifier(
            f"model {runtime.name!r} ({runtime.version}) ships no classifier, so it has no verdicts to "
            "give; leave out return_verdicts and min_confidence (GET /models lists each model's `classifier`)"
        )


def _chosen_prior(runtime: ModelRuntime, prior: str | None) -> str:
    if prior is None:
        return runtime.default_prior
    if prior not in runtime.priors:
        raise UnknownPrior(
            f"model {runtime.name!r} ({runtime.version}) has no {prior!r} prior; its priors: "
            f"{', '.join(runtime.priors)} (GET /models/{runtime.name} lists them)",
            priors=list(runtime.priors),
        )
    return prior


@api.get("/models", response_model=ModelsResponse, tags=["models"], summary="The loaded models")
async def list_models(serving: Serving) -> dict[str, Any]:
    registry, _ = serving
    return {
        "default": registry.default,
        "models": [responses.model_info(m, registry.default) for m in registry],
    }


@api.get("/models/{name}", response_model=ModelInfo, tags=["models"], summary="One loaded model")
async def get_model(name: str, serving: Serving) -> dict[str, Any]:
    registry, _ = serving
    return responses.model_info(registry.get(name), registry.default)


@api.get(
    "/models/{name}/latent-map",
    response_model=LatentMapResponse,
    tags=["models"],
    summary="Posterior means of test digits by class, from the model's report",
    responses={404: {"model": Problem, "description": "Unknown model, or one whose artifact has no map."}},
)
async def get_latent_map(name: str, serving: Serving) -> Response:
    registry, _ = serving
    model = registry.get(name)
    found = latent_map.of(model)
    if found is None:
        raise NoLatentMap(
            f"model {name!r} has no latent map (its artifact carries no report/latent_map.json); "
            "GET /models shows which models have one"
        )
    # Serialised once when the model loaded: the same bytes for every request.
    return Response(found.body, media_type="application/json")


@api.get(
    "/metrics",
    tags=["operations"],
    response_class=Response,
    summary="Prometheus metrics",
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
)
async def metrics(state: State) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@probes.get("/healthz", response_model=Health, summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@probes.get(
    "/readyz",
    response_model=Ready,
    summary="Readiness: models loaded and warmed up",
    responses={503: {"model": Problem, "description": "Starting or stopping."}},
)
async def readyz(serving: Serving) -> dict[str, Any]:
    registry, _ = serving
    return {"status": "ready", "models": [m.name for m in registry]}
