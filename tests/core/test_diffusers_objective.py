"""The trainer's objective per scheduler type against a hand computation and diffusers' own noising."""
import pytest
import torch

from fera_core import FeRAConfig
from fera_core.training.diffusers_objective import SchedulerObjective
from fera_core.training.step import EPSILON, FLOW, SAMPLE, V_PREDICTION, fera_loss, noise_draws, training_step

diffusers = pytest.importorskip("diffusers")
SD = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def hand_alphas_cumprod():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def half(x_t, t, cond, experts):
    """A stand-in model whose output is known: half the input, plus 0.1 when the experts are on."""
    return 0.5 * x_t + (0.1 if experts else 0.0)


@pytest.mark.parametrize("name, kind, prediction", [
    ("DDPMScheduler", "epsilon", EPSILON), ("DDPMScheduler", "v_prediction", V_PREDICTION),
    ("PNDMScheduler", "epsilon", EPSILON), ("EulerDiscreteScheduler", "v_prediction", V_PREDICTION),
    ("DDIMScheduler", "sample", SAMPLE),
])
def test_ddpm_family(name, kind, prediction):
    sched = getattr(diffusers, name)(prediction_type=kind, **SD)
    obj = SchedulerObjective(sched, half)
    assert obj.prediction == prediction
    u = torch.tensor([0.0, 0.2503, 0.6, 0.9999])
    a, b, t = obj.coefficients(u)
    assert t.tolist() == [0, 250, 600, 999]  # floor(u T)
    abar = hand_alphas_cumprod()[t]
    torch.testing.assert_close(a.double(), abar.sqrt(), rtol=1e-6, atol=1e-7)
    # diffusers' alphas_cumprod is float32: 1 - abar at t = 0 (8.5e-4) carries ~6e-8 of rounding, which
    # sqrt turns into ~1e-6; the levels compared differ from each other by > 0.1.
    torch.testing.assert_close(b.double(), (1 - abar).sqrt(), rtol=1e-6, atol=2e-6)
    x0, noise = torch.randn(2, 4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    if hasattr(sched, "add_noise") and name != "EulerDiscreteScheduler":  # Euler's add_noise needs inference sigmas
        torch.testing.assert_close(a[:, None, None, None] * x0 + b[:, None, None, None] * noise,
                                   sched.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)
    # The whole step by hand: x_t, the target of this prediction space, then MSE + FECL.
    draws = noise_draws(x0.shape, torch.Generator().manual_seed(1))
    u, noise = draws
    a, b, _ = obj.coefficients(u)
    x_t = a[:, None, None, None] * x0 + b[:, None, None, None] * noise
    target = {EPSILON: noise, V_PREDICTION: a[:, None, None, None] * noise - b[:, None, None, None] * x0,
              SAMPLE: x0}[prediction]
    if prediction == V_PREDICTION and name == "DDPMScheduler":
        torch.testing.assert_close(target, sched.get_velocity(x0, noise, obj.coefficients(u)[2]), rtol=1e-5, atol=1e-5)
    cfg = FeRAConfig()
    expected = fera_loss(0.5 * x_t + 0.1, 0.5 * x_t, target, cfg).loss
    got = training_step(obj, x0, None, cfg, draws=draws).loss
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_matching_uses_the_shifted_sigma(shift):
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    obj = SchedulerObjective(sched, half)
    assert obj.prediction == FLOW
    index = torch.tensor([0, 1, 500, 999])
    u = torch.linspace(1, 1 / 1000, 1000)[index]  # the scheduler's unshifted training sigmas
    a, b, timestep = obj.coefficients(u)
    torch.testing.assert_close(b, sched.sigmas[index])  # the scheduler's own shift
    torch.testing.assert_close(b, shift * u / (1 + (shift - 1) * u))  # by hand
    torch.testing.assert_close(timestep, sched.timesteps[index])
    torch.testing.assert_close(a, 1 - b)
    x0, noise = torch.randn(2, 4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x_t = torch.cat([sched.scale_noise(x0[i:i + 1], timestep[i:i + 1], noise[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(x_t, a[:, None, None, None] * x0 + b[:, None, None, None] * noise)
    draws = noise_draws(x0.shape, torch.Generator().manual_seed(1))
    a, b, _ = obj.coefficients(draws[0])
    x_t = a[:, None, None, None] * x0 + b[:, None, None, None] * draws[1]
    cfg = FeRAConfig()
    expected = fera_loss(0.5 * x_t + 0.1, 0.5 * x_t, draws[1] - x0, cfg).loss
    torch.testing.assert_close(training_step(obj, x0, None, cfg, draws=draws).loss, expected)
    if shift != 1.0:  # the shift matters: without it the levels differ
        assert (b - u).abs().max() > 0.1


def test_unknown_objectives_are_refused():
    with pytest.raises(ValueError, match="dynamic"):
        SchedulerObjective(diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), half)
    with pytest.raises(ValueError, match="prediction_type 'x0'"):
        SchedulerObjective(diffusers.DDPMScheduler(prediction_type="x0"), half)

    class Odd:
        config = diffusers.configuration_utils.FrozenDict(num_train_timesteps=10)

    with pytest.raises(ValueError, match="Odd is neither"):
        SchedulerObjective(Odd(), half)
