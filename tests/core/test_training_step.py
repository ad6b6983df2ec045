"""The shared training step: noise levels, targets per prediction space, loss, Diff-Tuning rows.

Targets are checked against diffusers' own schedulers (add_noise, get_velocity, scale_noise), an
implementation independent of fera_core.
"""
import pytest
import torch

from fera_core import FeRAConfig, FeRAModel, fecl_loss
from fera_core.training import step as training
from fera_core.training.step import (EPSILON, FLOW, HIGH_NOISE, LOW_NOISE, PREDICTIONS, SAMPLE, UNIFORM, V_PREDICTION,
                                fera_loss, noise_draws, prediction_from_x0, regression_target, sample_noise_levels,
                                training_step)


def test_noise_level_weightings_have_their_densities():
    """E[u] is 1/2, 2/3, 1/3 and P(u < 1/2) is 1/2, 1/4, 3/4 for p ~ 1, u, 1 - u. With 2e5 draws the
    standard error is about 1e-3; the weightings differ by 0.17 in mean, the tolerance is 5e-3."""
    expected = {UNIFORM: (0.5, 0.5), HIGH_NOISE: (2 / 3, 0.25), LOW_NOISE: (1 / 3, 0.75)}
    for weighting, (mean, below_half) in expected.items():
        u = sample_noise_levels(200_000, weighting, torch.Generator().manual_seed(0))
        assert u.min() >= 0 and u.max() < 1
        assert abs(u.mean().item() - mean) < 5e-3, weighting
        assert abs((u < 0.5).float().mean().item() - below_half) < 5e-3, weighting
    with pytest.raises(ValueError, match="weighting 'late'"):
        sample_noise_levels(3, "late")


def test_seeded_levels_repeat():
    a = sample_noise_levels(5, UNIFORM, torch.Generator().manual_seed(3))
    assert torch.equal(a, sample_noise_levels(5, UNIFORM, torch.Generator().manual_seed(3)))


@pytest.fixture
def latents():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 4, 32, 32, generator=g), torch.randn(4, 4, 32, 32, generator=g)


def test_epsilon_and_v_targets_match_diffusers_ddpm(latents):
    from diffusers import DDPMScheduler
    x0, noise = latents
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 250, 600, 999])
    abar = sched.alphas_cumprod[t]
    a, b = abar.sqrt(), (1 - abar).sqrt()
    x_t = a[:, None, None, None] * x0 + b[:, None, None, None] * noise
    torch.testing.assert_close(x_t, sched.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(regression_target(EPSILON, x0, noise, a, b), noise)
    v = sched.get_velocity(x0, noise, t)
    torch.testing.assert_close(regression_target(V_PREDICTION, x0, noise, a, b), v, rtol=1e-5, atol=1e-5)
    assert (v - noise).abs().max() > 0.5  # v is not epsilon: the check can tell them apart


def test_flow_target_matches_diffusers_flow_matching(latents):
    from diffusers import FlowMatchEulerDiscreteScheduler
    x0, noise = latents
    sched = FlowMatchEulerDiscreteScheduler()
    index = torch.tensor([0, 300, 600, 999])
    s = sched.sigmas[index]
    x_t = torch.cat([sched.scale_noise(x0[i:i + 1], sched.timesteps[index[i]][None], noise[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(x_t, (1 - s)[:, None, None, None] * x0 + s[:, None, None, None] * noise)
    # diffusers' SD3/Flux trainers regress noise - x0 (train_dreambooth_lora_sd3.py: target = noise - model_input)
    torch.testing.assert_close(regression_target(FLOW, x0, noise, 1 - s, s), noise - x0)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_prediction_from_x0_inverts_the_target(latents, prediction):
    """A perfect denoised estimate implies exactly the regression target (float32 round-off only)."""
    x0, noise = latents
    s = torch.tensor([0.05, 0.3, 0.8, 0.99])
    a, b = (1 - s, s) if prediction == FLOW else ((1 - s**2).sqrt(), s)
    x_t = a[:, None, None, None] * x0 + b[:, None, None, None] * noise
    got = prediction_from_x0(prediction, x_t, x0, a, b)
    torch.testing.assert_close(got, regression_target(prediction, x0, noise, a, b), rtol=1e-4, atol=1e-4)


def test_unknown_prediction_is_refused(latents):
    with pytest.raises(ValueError, match="prediction type 'x0'"):
        regression_target("x0", *latents, torch.ones(4), torch.ones(4))


def test_fecl_per_row_averages_to_the_reference_scalar(latents):
    x0, noise = latents
    base, target = x0, noise
    fera = x0 + 0.1 * noise.roll(1, dims=-1)
    rows = fecl_loss(base, fera, target, reduction="none")
    assert rows.shape == (4,)
    torch.testing.assert_close(rows.mean(), fecl_loss(base, fera, target))
    with pytest.raises(ValueError, match="reduction"):
        fecl_loss(base, fera, target, reduction="sum")


def test_fera_loss_is_mse_plus_fecl(latents):
    x0, noise = latents
    smooth = torch.nn.functional.interpolate(noise[..., ::4, ::4], size=x0.shape[-2:], mode="bilinear")
    pred, base = x0 + 0.5 * smooth, x0  # a coarse update against a white-noise residual: FECL > 0
    cfg = FeRAConfig(fecl_weight=0.3)
    out = fera_loss(pred, base, noise, cfg)
    mse = torch.nn.functional.mse_loss(pred, noise)
    fecl = fecl_loss(base, pred, noise, weight=0.3)
    torch.testing.assert_close(out.loss, mse + fecl)
    torch.testing.assert_close(out.mse, mse)
    torch.testing.assert_close(out.fecl, fecl)
    assert fecl > 1e-3 * mse  # both parts matter in the sum being checked


class DDPMObjective:
    """A diffusers-style epsilon objective on FeRAModel: what the CLI trainer does, in miniature."""

    prediction = EPSILON

    def __init__(self, fera, abar):
        self.fera, self.abar = fera, abar
        self.calls = []

    def coefficients(self, u):
        t = (u * len(self.abar)).long().clamp(max=len(self.abar) - 1)
        return self.abar[t].sqrt(), (1 - self.abar[t]).sqrt(), t

    def predict(self, x_t, t, cond, experts):
        self.calls.append((experts, torch.is_grad_enabled()))
        if experts:
            self.fera.prepare_forward(x_t)
            return self.fera.base_model(x_t, t, cond).sample
        with self.fera.disabled():
            return self.fera.base_model(x_t, t, cond).sample


@pytest.fixture
def objective(tiny_unet):
    torch.manual_seed(0)
    fera = FeRAModel(tiny_unet, FeRAConfig())
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    return DDPMObjective(fera, torch.cumprod(1 - betas, 0))


def test_step_runs_base_without_grad_then_experts_with_grad(objective, reference_io):
    x0, cond = reference_io["target"][:2], reference_io["encoder_hidden_states"][:2]
    out = training_step(objective, x0, cond, objective.fera.config, torch.Generator().manual_seed(0))
    assert objective.calls == [(False, False), (True, True)]
    assert out.loss.requires_grad and not out.mse.requires_grad
    out.loss.backward()
    ups = [layer.experts.up.grad for layer in objective.fera.fera_layers]
    assert all(g is not None for g in ups) and any(g.abs().sum() > 0 for g in ups)


def test_without_fecl_the_frozen_forward_is_skipped(objective, reference_io, monkeypatch):
    x0, cond = reference_io["target"][:2], reference_io["encoder_hidden_states"][:2]
    cfg = objective.fera.config
    cfg.fecl_weight = 0.0
    monkeypatch.setattr(training, "fecl_loss", lambda *a, **k: pytest.fail("FECL computed at weight 0"))
    out = training_step(objective, x0, cond, cfg, torch.Generator().manual_seed(0))
    assert objective.calls == [(True, True)]
    assert out.fecl == 0 and out.mse > 0
    torch.testing.assert_close(out.loss.detach(), out.mse)


def test_loss_falls_and_a_seed_repeats(objective, reference_io):
    """Twenty AdamW steps on two 16 x 16 latents lower the loss on fixed evaluation draws (four seeds,
    identical before and after, so any change is the training) by more than 10% (seen: 19%)."""
    x0, cond = reference_io["target"][:2, :, :16, :16] * 0.5, reference_io["encoder_hidden_states"][:2]
    cfg = objective.fera.config

    def evaluate():
        with torch.no_grad():
            return sum(training_step(objective, x0, cond, cfg, torch.Generator().manual_seed(s)).loss.item()
                       for s in range(4)) / 4

    before = evaluate()
    assert evaluate() == before  # same seed, same machine, same shapes: repeatable
    opt = torch.optim.AdamW(objective.fera.adapter.parameters(), lr=3e-2)
    g = torch.Generator().manual_seed(7)
    for _ in range(20):
        opt.zero_grad()
        training_step(objective, x0, cond, cfg, g).loss.backward()
        opt.step()
    after = evaluate()
    assert after < 0.9 * before, (before, after)


def test_retention_rows_sample_low_noise_and_weigh_xi(objective, reference_io):
    x0, cond = reference_io["target"][:4], reference_io["encoder_hidden_states"][:4]
    seen, outputs = [], []
    coefficients, predict = objective.coefficients, objective.predict
    objective.coefficients = lambda u: (seen.append(u), coefficients(u))[1]
    objective.predict = lambda *a, **k: (outputs.append(predict(*a, **k)), outputs[-1])[1]
    retention = torch.tensor([False, False, False, True])
    out = training_step(objective, x0, cond, objective.fera.config, torch.Generator().manual_seed(0),
                        diff_tuning=True, retention=retention, retention_weight=0.1)
    # Same draws by hand: target rows sqrt(U1), retention rows 1 - sqrt(U2).
    g = torch.Generator().manual_seed(0)
    u1, u2 = torch.rand(4, generator=g).sqrt(), 1 - torch.rand(4, generator=g).sqrt()
    torch.testing.assert_close(seen[0], torch.where(retention, u2, u1))
    # The loss is the target rows' mean plus 0.1 times the retention row's, from that call's outputs.
    base, pred = outputs
    a, b, _ = coefficients(seen[0])
    noise = torch.randn(x0.shape, generator=g)  # the step draws its noise after the two level draws
    target = noise
    per_row = [fera_loss(pred[i:i + 1], base[i:i + 1], target[i:i + 1], objective.fera.config).loss for i in range(4)]
    torch.testing.assert_close(out.loss, sum(per_row[:3]) / 3 + 0.1 * per_row[3])
    assert abs(per_row[3] - sum(per_row[:3]) / 3) > 0.05 * per_row[3]  # unequal weights change the result
    with pytest.raises(ValueError, match="diff_tuning=True"):
        training_step(objective, x0, cond, objective.fera.config, retention=retention)
    with pytest.raises(ValueError, match="at least one target"):
        training_step(objective, x0, cond, objective.fera.config, diff_tuning=True, retention=torch.ones(4, dtype=bool))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        training_step(objective, x0, cond, objective.fera.config, diff_tuning=True, retention=torch.ones(3, dtype=bool))


def test_row_weights_combine_target_and_retention_means(latents):
    x0, noise = latents
    pred, base = x0 + 0.2 * noise, x0
    cfg = FeRAConfig()
    w = torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.1])
    per_row = [fera_loss(pred[i:i + 1], base[i:i + 1], noise[i:i + 1], cfg).loss for i in range(4)]
    expected = sum(per_row[:3]) / 3 + 0.1 * per_row[3]
    torch.testing.assert_close(fera_loss(pred, base, noise, cfg, w).loss, expected)


def test_global_draws_split_over_processes_give_the_batch_loss(objective, reference_io):
    """A data-parallel trainer draws (u, noise) for the global batch and hands each process its rows: the
    mean of the per-process losses is the whole batch's loss (only summation order differs), and drawing
    from a generator inside the step is the same as passing noise_draws of that generator."""
    x0, cond = reference_io["target"][:4, :, :16, :16], reference_io["encoder_hidden_states"][:4]
    cfg = objective.fera.config
    objective.fera.adapter.requires_grad_(False)
    for layer in objective.fera.fera_layers:
        torch.nn.init.normal_(layer.experts.up, std=0.1)  # experts that change the output, so FECL is not 0
    whole = training_step(objective, x0, cond, cfg, torch.Generator().manual_seed(2)).loss
    u, noise = noise_draws(x0.shape, torch.Generator().manual_seed(2))
    torch.testing.assert_close(training_step(objective, x0, cond, cfg, draws=(u, noise)).loss, whole)
    halves = [training_step(objective, x0[s], cond[s], cfg, draws=(u[s], noise[s])).loss for s in (slice(0, 2), slice(2, 4))]
    torch.testing.assert_close(sum(halves) / 2, whole, rtol=1e-5, atol=1e-6)
    own = [training_step(objective, x0[s], cond[s], cfg, torch.Generator().manual_seed(2 + i)).loss
           for i, s in enumerate((slice(0, 2), slice(2, 4)))]
    assert abs(sum(own) / 2 - whole) > 1e-2 * whole  # per-process draws would give another loss
