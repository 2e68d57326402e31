"""A Python client for the VAE service, on httpx: VAEClient (sync) and AsyncVAEClient.

    from vae_client import VAEClient, grid_image
    with VAEClient("http://127.0.0.1:8000") as vae:
        enc = vae.encode("digit.png")             # Encoding: mu, sigma, kl as numpy arrays
        imgs = vae.sample(16, seed=1).images      # float32 [16, 28, 28] in [0, 1]
        grid_image(imgs).save("grid.png")

Images may be given as file paths, encoded bytes, PIL images or numpy arrays; a float
array shaped [28, 28] or [B, 28, 28] with values in [0, 1] is sent as pixels, exactly,
anything else as PNG/JPEG files that the server fits into 28x28. Images come back as
float32 arrays. Errors raise VAEClientError with the server's problem details.
`binary=True` fetches decode and sample images as a .npy body (Accept: application/x-npy)
instead of JSON floats: the same float32 values, a quarter of the bytes, and no number
parsing (sample(return_latents=True) and reconstruct still use JSON, which carries z, mu
and sigma). This module does not import torch.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import httpx
import numpy as np
from PIL import Image

from vae_client.images import grid, to_uint8

DEFAULT_URL = "http://127.0.0.1:8000"
ImageLike = str | os.PathLike[str] | bytes | Image.Image | np.ndarray
Invert = Literal["auto"] | bool


@dataclass(frozen=True)
class Verdict:
    """The shipped classifier's reading of one image: a class index and its probability."""

    label: int
    confidence: float


@dataclass(frozen=True)
class Encoding:
    """The posterior q(z|x) = N(mu, diag(sigma²)) of each image, and its KL to the prior N(0, I)."""

    model: str
    version: str
    mu: np.ndarray  # float32 [B, latent_dim]
    sigma: np.ndarray  # float32 [B, latent_dim]
    kl: np.ndarray  # float64 [B], nats
    verdicts: list[Verdict] | None = None  # with return_verdicts: the classifier on each image


@dataclass(frozen=True)
class Samples:
    """Images decoded from noise u ~ N(0, temperature² I) through a prior (z = u, or z = prior(u))."""

    model: str
    version: str
    images: np.ndarray  # float32 [n, 28, 28]
    seed: int
    temperature: float
    z: np.ndarray | None  # float32 [n, latent_dim] when asked for
    prior: str = "standard"  # the prior the draws went through: "learned" or "standard"
    u: np.ndarray | None = None  # float32 [n, latent_dim]: the noise z was made from, when asked for
    label: int | None = None  # the class drawn, when one was asked for
    verdicts: list[Verdict] | None = None  # with return_verdicts or min_confidence
    redraws: int | None = None  # with min_confidence: how many draws were replaced


@dataclass(frozen=True)
class Reconstruction:
    """Each image encoded and decoded from its posterior mean: decode(mu), with mu and sigma."""

    model: str
    version: str
    images: np.ndarray  # float32 [B, 28, 28]
    mu: np.ndarray
    sigma: np.ndarray
    verdicts: list[Verdict] | None = None  # with return_verdicts: the classifier on each reconstruction


class VAEClientError(Exception):
    """The server refused a request (status and RFC 9457 problem), or could not be reached (status None)."""

    def __init__(
        self, message: str, status: int | None = None, problem: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.problem = problem or {}

    @property
    def detail(self) -> str:
        """What the server said was wrong (the problem's `detail`), or the message itself."""
        return str(self.problem.get("detail", self))


# ---------------------------------------------------------------------------- images in and out


def to_image_bytes(image: ImageLike) -> bytes:
    """A file path, encoded bytes, PIL image or numpy array -> PNG/JPEG bytes to upload."""
    if isinstance(image, bytes):
        return image
    if isinstance(image, str | os.PathLike):
        return Path(image).read_bytes()
    if isinstance(image, np.ndarray):
        pixels = to_uint8(image) if image.dtype.kind == "f" else image.astype(np.uint8)
        image = Image.fromarray(pixels)
    if isinstance(image, Image.Image):
        if image.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"):
            image = image.convert("RGBA" if "A" in image.mode else "RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    raise TypeError(
        f"cannot send a {type(image).__name__} as an image; give a path, bytes, a PIL image or a numpy array"
    )


def _is_pixels(images: Any) -> bool:
    return (
        isinstance(images, np.ndarray)
        and images.dtype.kind == "f"
        and images.ndim in (2, 3)
        and images.shape[-2:] == (28, 28)
        and bool(np.all((images >= 0) & (images <= 1)))
    )


def image_body(
    images: ImageLike | Sequence[ImageLike], model: str | None, invert: Invert, return_verdicts: bool = False
) -> dict[str, Any]:
    """The JSON body of /encode and /reconstruct."""
    body: dict[str, Any] = {"format": "array", "invert": invert}
    if return_verdicts:
        body["return_verdicts"] = True
    if model:
        body["model"] = model
    if _is_pixels(images):
        pixels = np.asarray(images, dtype=np.float32)
        body["pixels"] = (pixels[None] if pixels.ndim == 2 else pixels).tolist()
        return body
    if isinstance(images, np.ndarray) and images.ndim == 3 and images.shape[-1] not in (3, 4):
        items: Sequence[ImageLike] = list(images)  # a stack of grayscale images
    elif isinstance(images, list | tuple):
        items = images
    else:
        items = [images]  # type: ignore[list-item]
    body["images"] = [base64.b64encode(to_image_bytes(item)).decode("ascii") for item in items]
    return body


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """float [B, 28, 28] (or [28, 28]) in [0, 1] -> grayscale PIL images."""
    batch = images[None] if images.ndim == 2 else images
    return [Image.fromarray(to_uint8(x)) for x in batch]


def grid_image(images: np.ndarray, pad: int = 2) -> Image.Image:
    """float [B, 28, 28] -> one PIL image, ceil(sqrt(B)) columns (the server's grid layout)."""
    batch = images[None] if images.ndim == 2 else images
    return Image.fromarray(to_uint8(batch[0] if len(batch) == 1 else grid(batch, pad)))


# ---------------------------------------------------------------------------- requests and responses


def _headers(api_key: str | None) -> dict[str, str]:
    return {"X-API-Key": api_key} if api_key else {}


NPY = "application/x-npy"
_NPY = {"Accept": NPY}


def _check(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        try:
            problem = response.json()
        except ValueError:
            problem = {"title": response.reason_phrase, "detail": response.text[:500]}
        if not isinstance(problem, dict):
            problem = {"detail": str(problem)}
        title = problem.get("title", response.reason_phrase)
        raise VAEClientError(
            f"{response.status_code} {title}: {problem.get('detail', '')}", response.status_code, problem
        )
    return response


def _json(response: httpx.Response) -> Any:
    return _check(response).json()


def _npy_images(response: httpx.Response) -> np.ndarray:
    _check(response)
    if response.headers.get("content-type", "").split(";")[0].strip() != NPY:
        raise VAEClientError(
            f"asked for {NPY} and the server answered {response.headers.get('content-type')!r}; "
            "is it an older version? Use binary=False"
        )
    array: np.ndarray = np.load(io.BytesIO(response.content), allow_pickle=False)
    return array.astype(np.float32, copy=False)


def _npy_samples(response: httpx.Response, temperature: float) -> Samples:
    images = _npy_images(response)
    headers = response.headers
    verdicts = None
    if headers.get("X-Verdicts"):
        pairs = (item.split(":") for item in headers["X-Verdicts"].split(","))
        verdicts = [Verdict(int(label), float(confidence)) for label, confidence in pairs]
    return Samples(
        headers.get("X-Model", ""),
        headers.get("X-Model-Version", ""),
        images,
        int(headers["X-Seed"]),
        temperature,
        None,
        headers.get("X-Prior", "standard"),
        label=int(headers["X-Label"]) if "X-Label" in headers else None,
        verdicts=verdicts,
        redraws=int(headers["X-Redraws"]) if "X-Redraws" in headers else None,
    )


def _verdicts(data: dict[str, Any]) -> list[Verdict] | None:
    listed = data.get("verdicts")
    if listed is None:
        return None
    return [Verdict(int(v["label"]), float(v["confidence"])) for v in listed]


def _unreachable(url: str, exc: httpx.TransportError) -> VAEClientError:
    return VAEClientError(
        f"cannot reach the VAE service at {url} ({type(exc).__name__}: {exc}); is vae-serve running there?"
    )


def _floats(value: Any) -> np.ndarray:
    return np.asarray(value, dtype=np.float32)


def _encoding(data: dict[str, Any]) -> Encoding:
    return Encoding(
        data["model"],
        data["version"],
        _floats(data["mu"]),
        _floats(data["sigma"]),
        np.asarray(data["kl"], dtype=np.float64),
        _verdicts(data),
    )


def _images(data: dict[str, Any]) -> np.ndarray:
    return _floats(data["images"]).reshape(-1, 28, 28)


def _samples(data: dict[str, Any]) -> Samples:
    z = _floats(data["z"]) if data.get("z") is not None else None
    u = _floats(data["u"]) if data.get("u") is not None else None
    return Samples(
        data["model"],
        data["version"],
        _images(data),
        int(data["seed"]),
        float(data["temperature"]),
        z,
        data.get("prior", "standard"),
        u,
        data.get("label"),
        _verdicts(data),
        data.get("redraws"),
    )


def _reconstruction(data: dict[str, Any]) -> Reconstruction:
    return Reconstruction(
        data["model"],
        data["version"],
        _images(data),
        _floats(data["mu"]),
        _floats(data["sigma"]),
        _verdicts(data),
    )


def _decode_body(z: np.ndarray | Sequence[Sequence[float]], model: str | None) -> dict[str, Any]:
    latents = np.asarray(z, dtype=np.float64)
    body: dict[str, Any] = {
        "z": (latents[None] if latents.ndim == 1 else latents).tolist(),
        "format": "array",
    }
    if model:
        body["model"] = model
    return body


def _sample_body(
    n: int,
    seed: int | None,
    temperature: float,
    model: str | None,
    return_latents: bool,
    prior: str | None,
    label: int | str | None = None,
    return_verdicts: bool = False,
    min_confidence: float | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "n": n,
        "temperature": temperature,
        "return_latents": return_latents,
        "format": "array",
    }
    if seed is not None:
        body["seed"] = seed
    if prior is not None:
        body["prior"] = prior
    if label is not None:
        body["label"] = label
    if return_verdicts:
        body["return_verdicts"] = True
    if min_confidence is not None:
        body["min_confidence"] = min_confidence
    if model:
        body["model"] = model
    return body


class VAEClient:
    """Synchronous client. Use as a context manager, or call close()."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
        binary: bool = False,
    ) -> None:
        self.url = url
        self.binary = binary
        self._http = httpx.Client(
            base_url=url, headers=_headers(api_key), timeout=timeout, transport=transport
        )

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from exc

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        return _json(self._send(method, path, **kwargs))

    def encode(
        self,
        images: ImageLike | Sequence[ImageLike],
        *,
        model: str | None = None,
        invert: Invert = "auto",
        return_verdicts: bool = False,
    ) -> Encoding:
        """Images (paths, bytes, PIL images or arrays) -> their posteriors: mu, sigma, KL."""
        return _encoding(
            self._request("POST", "/encode", json=image_body(images, model, invert, return_verdicts))
        )

    def decode(self, z: np.ndarray | Sequence[Sequence[float]], *, model: str | None = None) -> np.ndarray:
        """Latents [B, latent_dim] (or one [latent_dim]) -> float32 images [B, 28, 28]."""
        if self.binary:
            return _npy_images(self._send("POST", "/decode", json=_decode_body(z, model), headers=_NPY))
        return _images(self._request("POST", "/decode", json=_decode_body(z, model)))

    def sample(
        self,
        n: int,
        seed: int | None = None,
        temperature: float = 1.0,
        *,
        model: str | None = None,
        return_latents: bool = False,
        prior: str | None = None,
        label: int | str | None = None,
        return_verdicts: bool = False,
        min_confidence: float | None = None,
    ) -> Samples:
        """n images drawn through `prior` ("learned" or "standard"; the model's default when
        None). The same seed and prior give the same images. `label` (a class index or name)
        draws only that class; `return_verdicts` adds the classifier's verdict on each image;
        `min_confidence` keeps only draws it reads (as `label`, or any class) at least that surely."""
        body = _sample_body(
            n, seed, temperature, model, return_latents, prior, label, return_verdicts, min_confidence
        )
        if self.binary and not return_latents:
            return _npy_samples(self._send("POST", "/sample", json=body, headers=_NPY), temperature)
        return _samples(self._request("POST", "/sample", json=body))

    def reconstruct(
        self,
        images: ImageLike | Sequence[ImageLike],
        *,
        model: str | None = None,
        invert: Invert = "auto",
        return_verdicts: bool = False,
    ) -> Reconstruction:
        """Images -> decode(mu): what the model keeps of each, float32 [B, 28, 28]."""
        return _reconstruction(
            self._request("POST", "/reconstruct", json=image_body(images, model, invert, return_verdicts))
        )

    def models(self) -> list[dict[str, Any]]:
        """The models served: name, version, latent_dim, priors, metrics (GET /models)."""
        listing: list[dict[str, Any]] = self._request("GET", "/models")["models"]
        return listing

    def model(self, name: str) -> dict[str, Any]:
        """One served model's description (GET /models/{name})."""
        info: dict[str, Any] = self._request("GET", f"/models/{name}")
        return info

    def ready(self) -> bool:
        """Whether the server is up with its models loaded (GET /readyz); never raises."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def close(self) -> None:
        """Closes the connection pool; the client is of no further use."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()


class AsyncVAEClient:
    """Asynchronous client, the same methods as VAEClient, awaited."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
        binary: bool = False,
    ) -> None:
        self.url = url
        self.binary = binary
        self._http = httpx.AsyncClient(
            base_url=url, headers=_headers(api_key), timeout=timeout, transport=transport
        )

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from exc

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        return _json(await self._send(method, path, **kwargs))

    async def encode(
        self,
        images: ImageLike | Sequence[ImageLike],
        *,
        model: str | None = None,
        invert: Invert = "auto",
        return_verdicts: bool = False,
    ) -> Encoding:
        """Images (paths, bytes, PIL images or arrays) -> their posteriors: mu, sigma, KL."""
        return _encoding(
            await self._request("POST", "/encode", json=image_body(images, model, invert, return_verdicts))
        )

    async def decode(
        self, z: np.ndarray | Sequence[Sequence[float]], *, model: str | None = None
    ) -> np.ndarray:
        """Latents [B, latent_dim] (or one [latent_dim]) -> float32 images [B, 28, 28]."""
        if self.binary:
            response = await self._send("POST", "/decode", json=_decode_body(z, model), headers=_NPY)
            return _npy_images(response)
        return _images(await self._request("POST", "/decode", json=_decode_body(z, model)))

    async def sample(
        self,
        n: int,
        seed: int | None = None,
        temperature: float = 1.0,
        *,
        model: str | None = None,
        return_latents: bool = False,
        prior: str | None = None,
        label: int | str | None = None,
        return_verdicts: bool = False,
        min_confidence: float | None = None,
    ) -> Samples:
        """n images drawn through `prior` ("learned" or "standard"; the model's default when
        None). The same seed and prior give the same images. `label` (a class index or name)
        draws only that class; `return_verdicts` adds the classifier's verdict on each image;
        `min_confidence` keeps only draws it reads (as `label`, or any class) at least that surely."""
        body = _sample_body(
            n, seed, temperature, model, return_latents, prior, label, return_verdicts, min_confidence
        )
        if self.binary and not return_latents:
            response = await self._send("POST", "/sample", json=body, headers=_NPY)
            return _npy_samples(response, temperature)
        return _samples(await self._request("POST", "/sample", json=body))

    async def reconstruct(
        self,
        images: ImageLike | Sequence[ImageLike],
        *,
        model: str | None = None,
        invert: Invert = "auto",
        return_verdicts: bool = False,
    ) -> Reconstruction:
        """Images -> decode(mu): what the model keeps of each, float32 [B, 28, 28]."""
        return _reconstruction(
            await self._request(
                "POST", "/reconstruct", json=image_body(images, model, invert, return_verdicts)
            )
        )

    async def models(self) -> list[dict[str, Any]]:
        """The models served: name, version, latent_dim, priors, metrics (GET /models)."""
        listing: list[dict[str, Any]] = (await self._request("GET", "/models"))["models"]
        return listing

    async def model(self, name: str) -> dict[str, Any]:
        """One served model's description (GET /models/{name})."""
        info: dict[str, Any] = await self._request("GET", f"/models/{name}")
        return info

    async def ready(self) -> bool:
        """Whether the server is up with its models loaded (GET /readyz); never raises."""
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    async def aclose(self) -> None:
        """Closes the connection pool; the client is of no further use."""
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.aclose()
