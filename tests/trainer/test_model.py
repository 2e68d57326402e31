"""The maths: the KL term and the importance-weighted likelihood bound."""

from __future__ import annotations

import math

import torch
from torch.distributions import Normal, kl_divergence

from trainer.evaluate import iwae_log_likelihood
from trainer.model import VAE, VAEConfig, kl_to_standard_normal, log_normal


def test_kl_matches_torch_closed_form() -> None:
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(64, 8, generator=g) * 2
    sigma = torch.rand(64, 8, generator=g) * 3 + 0.05
    expected = kl_divergence(Normal(mu, sigma), Normal(0.0, 1.0))
    torch.testing.assert_close(kl_to_standard_normal(mu, sigma), expected)


def test_kl_matches_monte_carlo() -> None:
    """KL(q || p) = E_q[log q(z) - log p(z)]: 400k samples agree with the closed form."""
    g = torch.Generator().manual_seed(1)
    mu = torch.tensor([0.0, 1.5, -2.0, 0.3])
    sigma = torch.tensor([1.0, 0.5, 2.0, 0.1])
    z = mu + sigma * torch.randn(400_000, 4, generator=g)
    mc = (Normal(mu, sigma).log_prob(z) - Normal(0.0, 1.0).log_prob(z)).mean(0)
    exact = kl_to_standard_normal(mu, sigma)
    assert exact[0].abs() < 1e-6  # q = p: no divergence
    torch.testing.assert_close(mc, exact, atol=0.02, rtol=0.01)


def test_log_normal_matches_torch() -> None:
    z, mu, sigma = torch.randn(5, 3), torch.randn(5, 3), torch.rand(5, 3) + 0.1
    torch.testing.assert_close(log_normal(z, mu, sigma), Normal(mu, sigma).log_prob(z).sum(-1))


def _constant_decoder_vae(posterior_mu: float, posterior_sigma: float) -> tuple[VAE, torch.Tensor]:
    """A VAE whose decoder ignores z (its last layer's weights are zero), so the exact
    likelihood is known: log p(x) = sum_pixels log Bernoulli(x; sigmoid(bias))."""
    torch.manual_seed(0)
    vae = VAE(VAEConfig(latent_dim=2, channels=4, hidden=8, blocks=0)).eval()
    last = vae.decoder.net[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.constant_(last.bias, 0.7)
    enc_last = vae.encoder.net[-1]
    torch.nn.init.zeros_(enc_last.weight)
    # softplus(b) + 1e-4 = sigma  =>  b = log(exp(sigma - 1e-4) - 1)
    pre = math.log(math.expm1(posterior_sigma - 1e-4))
    enc_last.bias.data = torch.tensor([posterior_mu, posterior_mu, pre, pre])
    x = torch.bernoulli(torch.full((32, 1, 28, 28), 0.4), generator=torch.Generator().manual_seed(2))
    return vae, x


def test_iwae_is_exact_when_posterior_is_the_prior() -> None:
    vae, x = _constant_decoder_vae(0.0, 1.0)
    p = torch.sigmoid(torch.tensor(0.7))
    exact = (x * torch.log(p) + (1 - x) * torch.log1p(-p)).flatten(1).sum(1)
    torch.testing.assert_close(iwae_log_likelihood(vae, x, k=7), exact, atol=1e-3, rtol=0)


def test_iwae_bound_tightens_towards_the_exact_value() -> None:
    """With q != p(z|x) each weight is p(x) p(z)/q(z): E[w] = p(x), so the bound rises with
    k towards the exact log p(x), and stays below it."""
    vae, x = _constant_decoder_vae(0.5, 0.8)
    p = torch.sigmoid(torch.tensor(0.7))
    exact = (x * torch.log(p) + (1 - x) * torch.log1p(-p)).flatten(1).sum(1)
    torch.manual_seed(3)
    k1 = iwae_log_likelihood(vae, x.repeat(50, 1, 1, 1), k=1)  # many draws: the mean is sharp
    k5000 = iwae_log_likelihood(vae, x, k=5000)
    k100 = iwae_log_likelihood(vae, x, k=100)
    # k = 1 is the ELBO: on average it falls short of log p(x) by exactly KL(q || p(z|x)) = KL(q || p(z)).
    elbo_gap = float(kl_to_standard_normal(torch.tensor(0.5), torch.tensor(0.8))) * 2  # two latent dims
    assert abs(float((exact.repeat(50) - k1).mean()) - elbo_gap) < 0.06
    gap100, gap5000 = float((exact - k100).mean()), float((exact - k5000).mean())
    assert 0 < gap5000 < gap100 < elbo_gap
    assert gap5000 < 0.01
