"""The learned prior: a deterministic map from noise u ~ N(0, I) to latents z.

Why a second stage. Training pulls every posterior q(z|x) towards N(0, I), but the codes of
real digits, the aggregate posterior q(z) = E_x q(z|x), do not fill N(0, I): they form one
cluster per class with holes between them. Decoding a draw z ~ N(0, I) that lands in a hole
gives a shape between digits. A density fitted to where the codes lie, and sampled through
a fixed function of N(0, I) noise, keeps the N(0, I) story and the seeds' meaning:

    u ~ N(0, I)   ->   z = prior(u)   ->   x = decode(z)

Two such densities are here, both fitted by maximum likelihood to the codes of the
training set, one posterior draw per image or the posterior means (trainer/train_prior.py;
the comparison is in docs/training.md):

- MixtureMap, the shipped one: a Gaussian mixture (ex-post density estimation, Ghosh et al.
  2020). Phi(u_1) picks the component, the rest of u is its Gaussian draw. Its draws are
  the cleanest measured, it costs a few small tensor operations, and it is smooth in u
  except where u_1 crosses from one component's bin to the next: there it jumps, over the
  hole between two regions, rather than through it.
- Flow: a normalising flow (Dinh et al. 2017, RealNVP) whose coupling layers transform half
  of the dimensions with monotone rational-quadratic splines (Durkan et al. 2019, neural
  spline flows) or affine maps. log p(z) = log N(f(z); 0, I) + log |det df/dz| is exact,
  and the served map f^-1 (NoiseToLatent) is smooth everywhere; on a CPU it costs about as
  much as the decoder.

Temperature scales u, as it scales z under the standard prior.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class FlowConfig:
    latent_dim: int = 32
    couplings: int = 12  # coupling layers; a fixed random permutation sits between each two
    hidden: int = 256  # width of each coupling's conditioner network
    transform: str = "spline"  # "spline" or "affine"
    bins: int = 8  # spline bins per dimension
    bound: float = 4.0  # the spline acts on [-bound, bound] (in standardised units), identity outside


def rational_quadratic_spline(
    x: Tensor, params: Tensor, bound: float, inverse: bool
) -> tuple[Tensor, Tensor]:
    """A monotone rational-quadratic spline applied elementwise (Durkan et al. 2019, eq. 4).

    x [B, n]; params [B, n, 3K - 1] (K bin widths, K bin heights, K - 1 inner derivatives,
    unconstrained). Returns (y, log |dy/dx|), both [B, n]. Outside [-bound, bound] it is the
    identity, and its slope at the ends is 1, so it joins the identity smoothly."""
    bins = (params.shape[-1] + 1) // 3
    min_size, min_slope = 1e-3, 1e-3
    widths = F.softmax(params[..., :bins], dim=-1) * (1 - min_size * bins) + min_size
    heights = F.softmax(params[..., bins : 2 * bins], dim=-1) * (1 - min_size * bins) + min_size
    # Slope 1 at both ends: softplus(c) + min_slope = 1 at c = log(e^(1 - min_slope) - 1).
    edge = math.log(math.expm1(1 - min_slope))
    inner = params[..., 2 * bins :]
    slopes = F.softplus(F.pad(inner, (1, 1), value=edge)) + min_slope

    knots_x = F.pad(torch.cumsum(widths, -1), (1, 0)) * (2 * bound) - bound
    knots_y = F.pad(torch.cumsum(heights, -1), (1, 0)) * (2 * bound) - bound
    knots_x[..., -1] = bound  # the cumulative sum may miss the edge by a rounding error
    knots_y[..., -1] = bound
    knots_x[..., 0] = -bound
    knots_y[..., 0] = -bound

    inside = (x > -bound) & (x < bound)
    v = x.clamp(-bound, bound)
    knots = knots_y if inverse else knots_x
    k = (v.unsqueeze(-1) >= knots[..., 1:-1]).sum(-1, keepdim=True)  # the bin of each value
    x0 = knots_x.gather(-1, k).squeeze(-1)
    y0 = knots_y.gather(-1, k).squeeze(-1)
    w = knots_x.gather(-1, k + 1).squeeze(-1) - x0
    h = knots_y.gather(-1, k + 1).squeeze(-1) - y0
    d0 = slopes.gather(-1, k).squeeze(-1)
    d1 = slopes.gather(-1, k + 1).squeeze(-1)
    s = h / w

    if inverse:
        # Solve the quadratic for theta in [0, 1] (the numerically stable root).
        dy = v - y0
        a = h * (s - d0) + dy * (d1 + d0 - 2 * s)
        b = h * d0 - dy * (d1 + d0 - 2 * s)
        c = -s * dy
        theta = (2 * c) / (-b - torch.sqrt((b.pow(2) - 4 * a * c).clamp(min=0)))
        y = theta * w + x0
    else:
        theta = (v - x0) / w
        y = y0 + h * (s * theta.pow(2) + d0 * theta * (1 - theta)) / (
            s + (d1 + d0 - 2 * s) * theta * (1 - theta)
        )
    one_minus = 1 - theta
    denominator = s + (d1 + d0 - 2 * s) * theta * one_minus
    slope = s.pow(2) * (d1 * theta.pow(2) + 2 * s * theta * one_minus + d0 * one_minus.pow(2))
    log_slope = torch.log(slope) - 2 * torch.log(denominator)  # dy/dx of the forward spline
    if inverse:
        log_slope = -log_slope
    y = torch.where(inside, y, x)
    return y, torch.where(inside, log_slope, torch.zeros_like(log_slope))


class Coupling(nn.Module):
    """Permutes the dimensions (a fixed random order, so that every dimension is
    transformed by some layers), keeps the first `keep`, transforms the rest conditioned
    on them."""

    def __init__(self, cfg: FlowConfig, keep: int, perm: Tensor) -> None:
        super().__init__()
        self.keep = keep
        self.change = cfg.latent_dim - keep
        self.spline = cfg.transform == "spline"
        self.bound = cfg.bound
        self.per_dim = 3 * cfg.bins - 1 if self.spline else 2
        self.register_buffer("perm", perm)
        self.register_buffer("inverse_perm", torch.argsort(perm))
        self.net = nn.Sequential(
            nn.Linear(keep, cfg.hidden),
            nn.SiLU(),
            nn.Linear(cfg.hidden, cfg.hidden),
            nn.SiLU(),
            nn.Linear(cfg.hidden, self.change * self.per_dim),
        )
        # Zero last layer: every coupling starts as (nearly) the identity, and training
        # starts from the standardised codes themselves.
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def _transform(self, b: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        if self.spline:
            return rational_quadratic_spline(b, params, self.bound, inverse)
        log_scale = torch.tanh(params[..., 0])  # bounded scales keep early training stable
        shift = params[..., 1]
        if inverse:
            return (b - shift) * torch.exp(-log_scale), -log_scale
        return b * torch.exp(log_scale) + shift, log_scale

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Towards the noise: (output, log |det| per row)."""
        z = z[:, self.perm]
        a, b = z[:, : self.keep], z[:, self.keep :]
        b, log_det = self._transform(b, self.net(a).view(-1, self.change, self.per_dim), False)
        return torch.cat([a, b], dim=1), log_det.sum(1)

    def inverse(self, u: Tensor) -> Tensor:
        a, b = u[:, : self.keep], u[:, self.keep :]
        b, _ = self._transform(b, self.net(a).view(-1, self.change, self.per_dim), True)
        return torch.cat([a, b], dim=1)[:, self.inverse_perm]


class Flow(nn.Module):
    """f: z -> u, for training (`log_prob`). `NoiseToLatent` is its inverse, for serving."""

    def __init__(self, cfg: FlowConfig, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.latent_dim
        # Codes are standardised per dimension first (fixed from the data by `fit_standardiser`):
        # the flow then works at unit scale, whatever the VAE's latent spread is.
        self.register_buffer("shift", torch.zeros(d))
        self.register_buffer("scale", torch.ones(d))
        generator = torch.Generator().manual_seed(seed)
        # Two dimensions have one useful permutation: swap them every layer.
        perms = [
            torch.tensor([1, 0]) if d == 2 else torch.randperm(d, generator=generator)
            for _ in range(cfg.couplings)
        ]
        self.couplings = nn.ModuleList(Coupling(cfg, d // 2, perm) for perm in perms)

    def fit_standardiser(self, z: Tensor) -> None:
        self.shift.copy_(z.mean(0))
        self.scale.copy_(z.std(0).clamp(min=1e-6))

    def to_noise(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """f(z) and log |det df/dz|, per row."""
        h = (z - self.shift) / self.scale
        log_det = -torch.log(self.scale).sum().expand(z.shape[0])
        for coupling in self.couplings:
            h, ld = coupling(h)
            log_det = log_det + ld
        return h, log_det

    def log_prob(self, z: Tensor) -> Tensor:
        """log p(z) under the flow, in nats, per row."""
        u, log_det = self.to_noise(z)
        return -0.5 * (u.pow(2).sum(1) + u.shape[1] * math.log(2 * math.pi)) + log_det


class NoiseToLatent(nn.Module):
    """f^-1: noise u [B, D] -> latents z [B, D], the map the artifact's prior(u) runs.
    Deterministic, and smooth in u."""

    def __init__(self, flow: Flow) -> None:
        super().__init__()
        self.steps = nn.ModuleList(reversed(list(flow.couplings)))
        self.register_buffer("shift", flow.shift.clone())
        self.register_buffer("scale", flow.scale.clone())

    def forward(self, u: Tensor) -> Tensor:
        h = u
        for step in self.steps:
            h = step.inverse(h)
        return h * self.scale + self.shift


class MixtureMap(nn.Module):
    """u ~ N(0, I) -> z ~ a Gaussian mixture, deterministically.

    The first coordinate picks the component: Phi(u_1), uniform on [0, 1], falls in one of K
    bins whose widths are the mixture weights (the heaviest components in the middle bins, so
    that a temperature below 1, which pulls u_1 towards 0, favours the most typical codes).
    Where it falls within its bin is uniform again, and becomes the component's first
    normal coordinate v_1 = Phi^-1(position); u_2 ... u_D are the rest. Then
    z = mean_k + L_k v, with L_k the Cholesky factor of the component's covariance.
    Within a bin the map is smooth in u; at a bin's edge it jumps to the next component,
    which is how it avoids the holes between them."""

    def __init__(self, weights: Tensor, means: Tensor, covariances: Tensor) -> None:
        super().__init__()
        k, d = means.shape
        order = torch.argsort(weights, descending=True)
        # Heaviest in the middle: ranks 0, 1, 2, ... placed at the centre, alternating sides.
        slots = sorted(range(k), key=lambda i: abs(i - (k - 1) / 2))
        placed = torch.empty(k, dtype=torch.long)
        placed[torch.tensor(slots)] = order
        w = weights[placed].double()
        edges = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(w / w.sum(), 0)])
        edges[-1] = 1.0
        self.register_buffer("edges", edges.float())
        self.register_buffer("means", means[placed].float())
        self.register_buffer("chol", torch.linalg.cholesky(covariances[placed].double()).float())
        self.register_buffer("log_weights", torch.log(w / w.sum()).float())
        self.latent_dim = d

    def forward(self, u: Tensor, y: Tensor | None = None, temperature: Tensor | None = None) -> Tensor:
        """z for noise u [B, D]; y is not used (one mixture for all); a temperature [B] scales
        the draw within the component, not the choice of component (as ClassMixtureMap)."""
        p = 0.5 * (1 + torch.erf(u[:, 0] / math.sqrt(2)))
        k = torch.bucketize(p, self.edges[1:-1], right=True)
        lo, hi = self.edges[k], self.edges[k + 1]
        within = ((p - lo) / (hi - lo)).clamp(1e-6, 1 - 1e-6)
        first = math.sqrt(2) * torch.erfinv(2 * within - 1)
        v = torch.cat([first.unsqueeze(1), u[:, 1:]], dim=1)
        if temperature is not None:
            v = v * temperature.unsqueeze(1)
        return self.means[k] + torch.bmm(self.chol[k], v.unsqueeze(2)).squeeze(2)

    def log_prob(self, z: Tensor) -> Tensor:
        """log p(z) under the mixture, per row (exact)."""
        return torch.logsumexp(mixture_log_joint(z, self.log_weights, self.means, self.chol), dim=1)


def mixture_log_joint(x: Tensor, log_weights: Tensor, means: Tensor, chol: Tensor) -> Tensor:
    """log w_k + log N(x; mean_k, L_k L_k^T) for every row of x [N, D] and component: [N, K].
    With A_k = L_k^-1 the Mahalanobis distance is |A_k x - A_k mean_k|^2: one batched matrix
    product (torch.distributions would broadcast a [N, K, D, D] batch of solves)."""
    d = x.shape[1]
    eye = torch.eye(d, dtype=chol.dtype).expand_as(chol)
    inverse = torch.linalg.solve_triangular(chol, eye, upper=False)  # [K, D, D]
    projected = x @ inverse.transpose(1, 2)  # [K, N, D]
    offsets = (inverse @ means.unsqueeze(2)).transpose(1, 2)  # [K, 1, D]
    half_log_det = torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(1)  # [K]
    mahalanobis = (projected - offsets).pow(2).sum(2)  # [K, N]
    log_normal = -0.5 * mahalanobis - half_log_det[:, None] - 0.5 * d * math.log(2 * math.pi)
    return (log_normal + log_weights[:, None]).T


class ClassMixtureMap(nn.Module):
    """The class-conditional learned prior: one Gaussian mixture per class, p(z | y), and
    their mixture over the classes' training shares, p(z) = sum_y share_y p(z | y), as one set
    of components. forward(u, y, t) -> z, with y the class of each row or -1 for any class.

    As in MixtureMap, Phi(u_1) picks the component: it falls in one of the bins of the row's
    class (all classes' bins, weighted by share_y w_yk, for y = -1), the position within the
    bin becomes the component's first normal coordinate v_1, and u_2 ... u_D are the rest.
    The temperature t then scales v, the draw *within* the component:

        z = mean_k + L_k (t v)

    so the component a draw uses, and with it the mix of classes, is the same at every
    temperature; only the spread inside each component shrinks or grows."""

    def __init__(self, class_shares: Tensor, weights: Tensor, means: Tensor, covariances: Tensor) -> None:
        super().__init__()
        classes, k, d = means.shape  # weights [C, K] (rows sum to 1), covariances [C, K, D, D]
        m = classes * k
        shares = class_shares.double() / class_shares.double().sum()
        w = weights.double() / weights.double().sum(1, keepdim=True)
        # Row y of `edges`: the bins of class y alone (zero width elsewhere); row C: every class.
        per_row = torch.zeros(classes + 1, m, dtype=torch.float64)
        for y in range(classes):
            per_row[y, y * k : (y + 1) * k] = w[y]
        per_row[classes] = (shares[:, None] * w).reshape(m)
        edges = torch.cat([torch.zeros(classes + 1, 1, dtype=torch.float64), torch.cumsum(per_row, 1)], 1)
        edges[:, -1] = 1.0
        self.register_buffer("edges", edges.float())
        # The components a row may use: [first, last] of its class, everything for "any".
        self.register_buffer("first", torch.tensor([y * k for y in range(classes)] + [0]))
        self.register_buffer("last", torch.tensor([(y + 1) * k - 1 for y in range(classes)] + [m - 1]))
        self.register_buffer("means", means.reshape(m, d).float())
        chol = torch.linalg.cholesky(covariances.reshape(m, d, d).double())
        self.register_buffer("chol", chol.float())
        self.register_buffer("log_weights", per_row.clamp_min(1e-300).log().float())  # [C + 1, M]
        self.classes = classes
        self.latent_dim = d

    def forward(self, u: Tensor, y: Tensor, temperature: Tensor) -> Tensor:
        row = torch.where(y < 0, torch.full_like(y, self.classes), y)
        p = 0.5 * (1 + torch.erf(u[:, 0] / math.sqrt(2)))
        edges = self.edges[row]  # [B, M + 1]
        k = (p.unsqueeze(1) >= edges[:, 1:-1]).sum(1)
        # Phi rounds to exactly 0 or 1 far out in the tails: stay inside the row's own bins.
        k = torch.maximum(torch.minimum(k, self.last[row]), self.first[row])
        lo = edges.gather(1, k.unsqueeze(1)).squeeze(1)
        hi = edges.gather(1, (k + 1).unsqueeze(1)).squeeze(1)
        within = ((p - lo) / (hi - lo)).clamp(1e-6, 1 - 1e-6)
        first = math.sqrt(2) * torch.erfinv(2 * within - 1)
        v = torch.cat([first.unsqueeze(1), u[:, 1:]], dim=1) * temperature.unsqueeze(1)
        return self.means[k] + torch.bmm(self.chol[k], v.unsqueeze(2)).squeeze(2)

    def log_prob(self, z: Tensor) -> Tensor:
        """log p(z), the mixture over all classes, per row (exact)."""
        return torch.logsumexp(mixture_log_joint(z, self.log_weights[self.classes], self.means, self.chol), 1)

    def log_prob_given(self, z: Tensor, y: int) -> Tensor:
        """log p(z | y) per row."""
        return torch.logsumexp(mixture_log_joint(z, self.log_weights[y], self.means, self.chol), 1)
