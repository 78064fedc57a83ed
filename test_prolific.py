"""Tests for prolific.py and its two stage files. CPU only, no network, no model download:
the math is checked on analytic priors whose exact answer is known, the Stable Diffusion code path on a
tiny random SD built from configs (DESIGN.md, "Testing")."""
import json
import os
import subprocess
import sys

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # never call the hub in tests
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import prolific as P  # noqa: E402


def run_cli(*args, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, os.path.join(HERE, "prolific.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


# -----------------------------------------------------------------------------
# The prior seam and the update (Sec. 3)


def test_mixture_prior_equals_closed_form_for_one_gaussian():
    """One Gaussian N(mu, s^2 I): x_t ~ N(sqrt(a) mu, (a s^2 + 1 - a) I), so the optimal
    eps = sqrt(1-a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a)."""
    mu, s = torch.tensor([[0.7, -1.2, 0.3]]), 0.4
    prior = P.GaussianMixturePrior(mu, s)
    t = torch.tensor([0, 100, 500, 999])
    x_t = torch.randn(4, 3)
    a = prior.alphas_cumprod[t][:, None]
    expected = (1 - a).sqrt() * (x_t - a.sqrt() * mu) / (a * s ** 2 + 1 - a)
    torch.testing.assert_close(prior.predict_noise(x_t, t), expected, rtol=1e-5, atol=1e-6)


def test_mixture_prior_is_the_minimum_mse_denoiser():
    """Monte Carlo: the exact eps beats any perturbation of it in E||eps_hat - eps||^2."""
    prior = P.GaussianMixturePrior([[-1.0, 0.0], [1.5, 1.0]], 0.3, [0.7, 0.3])
    g = torch.Generator().manual_seed(0)
    x0 = prior.sample(20000, g)
    t = torch.full((20000,), 400)
    eps = torch.randn(x0.shape, generator=g)
    x_t = P.add_noise(x0, t, eps, prior.alphas_cumprod)
    pred = prior.predict_noise(x_t, t)
    mse = (pred - eps).pow(2).mean()
    assert mse < (0.9 * pred - eps).pow(2).mean() and mse < (1.1 * pred - eps).pow(2).mean()
    assert mse < ((pred + 0.1) - eps).pow(2).mean()


def test_sd_schedule():
    ac = P.sd_alphas_cumprod()
    assert ac.shape == (1000,)
    assert abs(ac[0].item() - 0.99915) < 1e-4 and abs(ac[999].item() - 0.00466) < 1e-4


def test_surrogate_loss_gradient_is_g():
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    g = torch.randn(2, 4, 8, 8)
    P.surrogate_loss(x * 1.0, g).backward()
    torch.testing.assert_close(x.grad, g)


def test_distillation_grad_sds_and_vsd_formulas():
    prior = P.GaussianMixturePrior([[0.5, -0.5]], 0.2)
    x0, t, eps = torch.randn(5, 2), torch.tensor([30, 200, 500, 800, 970]), torch.randn(5, 2)
    w = (1 - prior.alphas_cumprod[t])[:, None]
    x_t = P.add_noise(x0, t, eps, prior.alphas_cumprod)
    sds = P.distillation_grad(prior, x0, t, eps, None)
    torch.testing.assert_close(sds, w * (prior.predict_noise(x_t, t) - eps))

    class Const(torch.nn.Module):  # an eps_phi that always predicts 1
        def predict_noise(self, x_t, t, camera):
            return torch.ones_like(x_t)
    vsd = P.distillation_grad(prior, x0, t, eps, None, Const())
    torch.testing.assert_close(vsd, w * (prior.predict_noise(x_t, t) - 1))


def test_time_schedule_anneals():
    cfg = P.Config()
    assert P.t_range(0, cfg, 5000) == (0.02, 0.98) and P.t_range(5000, cfg, 5000) == (0.02, 0.50)
    t = P.sample_t(10000, 0.02, 0.5, "cpu")
    assert t.min() == 20 and t.max() == 500


def test_eps_from_v_inverts_v_prediction():
    x0, eps = torch.randn(3, 4), torch.randn(3, 4)
    a = torch.tensor([[0.9], [0.5], [0.01]])
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    torch.testing.assert_close(P.eps_from_v(v, x_t, a), eps)


def test_theorem2_vsd_reproduces_mixture_sds_collapses():
    """Theorem 2 on a 2D mixture with unequal weights: VSD particles take the mixture's weights and
    spread; SDS particles all collapse (spread far below the mixture's std)."""
    means, std, weights = [[-1.5, 0.0], [1.5, 0.5], [0.0, -1.5]], 0.3, [0.5, 0.3, 0.2]
    prior = P.GaussianMixturePrior(means, std, weights)
    vsd = P.distill_points(prior, 400, 2, "vsd", steps=1500, seed=0)
    for (w, spread, offset), w_true in zip(P.mode_stats(means, vsd), weights):
        assert abs(w - w_true) < 0.06, (w, w_true)
        assert 0.7 * std < spread < 1.3 * std, spread
        assert offset < 0.15
    sds = P.distill_points(prior, 400, 2, "sds", steps=1500, seed=0)
    stats = P.mode_stats(means, sds)
    assert max(w for w, _, _ in stats) > 0.9            # (nearly) every particle in one place
    assert (sds - sds.mean(0)).pow(2).mean().sqrt() < 0.4 * std
