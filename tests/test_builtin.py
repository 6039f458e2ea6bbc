"""The built-in digits data, the shipped teacher and classifier, and the analytic Gaussian-mixture teacher."""

import json
import math

import pytest
import torch

from perflow.builtin.digits import digits_tensors, load_digits_dataset
from perflow.builtin.gaussian_mixture import GaussianMixture, default_mixture


# ----------------------------------------------------------------------------- digits loader


def test_digits_splits_are_fixed_disjoint_and_cover_the_data():
    train, test = load_digits_dataset("train"), load_digits_dataset("test")
    assert len(train) + len(test) == 1797 and len(test) == round(0.2 * 1797)
    item = train[0]
    assert set(item) == {"pixel_values", "label"}
    assert item["pixel_values"].shape == (1, 8, 8) and item["pixel_values"].dtype == torch.float32
    assert isinstance(item["label"], int)
    x_tr, y_tr = digits_tensors("train")
    x_te, y_te = digits_tensors("test")
    x_all, _ = digits_tensors("all")
    assert x_tr.min() == -1.0 and x_tr.max() <= 1.0  # 0..16 mapped by x / 8 - 1
    assert torch.equal(((x_all + 1) * 8).round(), (x_all + 1) * 8)  # exactly the integer grey levels
    assert set(y_te.tolist()) == set(range(10)) and set(y_tr.tolist()) == set(range(10))
    # disjoint: no test image equals a train image at the same position in the full set
    assert torch.equal(torch.cat([x_tr, x_te]).sort(0).values, x_all.sort(0).values)
    # fixed: the same split twice
    assert torch.equal(digits_tensors("test")[0], x_te)


def test_digits_upsampled_and_bad_arguments():
    ds = load_digits_dataset("test", image_size=16)
    x = ds[3]["pixel_values"]
    assert x.shape == (1, 16, 16) and x.min() >= -1 and x.max() <= 1
    with pytest.raises(ValueError, match="split"):
        load_digits_dataset("validation")
    with pytest.raises(ValueError, match="image_size"):
        load_digits_dataset("train", image_size=2)


# ----------------------------------------------------------------------------- shipped weights


def test_shipped_teacher_format_and_schedule():
    from perflow.training.teachers import load_teacher

    teacher = load_teacher("digits")
    assert teacher.kind == "class" and teacher.vae is None
    path = __import__("perflow.builtin", fromlist=["x"]).__path__[0] + "/weights/digits_teacher"
    sched = json.loads(open(f"{path}/scheduler/scheduler_config.json").read())
    assert sched["_class_name"] == "DDIMScheduler"
    assert sched["beta_schedule"] == "scaled_linear" and sched["beta_start"] == 0.00085 and sched["beta_end"] == 0.012
    assert sched["num_train_timesteps"] == 1000 and sched["set_alpha_to_one"] is False
    assert sched["prediction_type"] == "epsilon"
    assert teacher.label_encoder.null_label == 10
    n_params = sum(p.numel() for p in teacher.unet.parameters())
    assert n_params < 3_000_000


def test_shipped_classifier_is_accurate_on_held_out_digits():
    from perflow.builtin.classifier import accuracy, load_digit_classifier

    clf = load_digit_classifier()
    x, y = digits_tensors("test")
    assert accuracy(clf, x, y) >= 0.97  # chance is 0.1
    assert clf.features(x[:5]).shape == (5, clf.config.feature_dim)
    with pytest.raises(ValueError, match="resize"):
        clf(torch.zeros(2, 1, 16, 16))


def test_shipped_teacher_samples_are_the_digits_they_were_asked_for():
    """A real check that the shipped teacher is trained: its samples, drawn for labels 0..9 with a
    plain 25-step DDIM, are recognised as those labels by the independently trained classifier
    (an untrained or label-blind teacher scores about 0.1)."""
    from perflow.builtin.classifier import load_digit_classifier
    from perflow.evaluation.digits import class_model_fn, teacher_scheduler_config
    from perflow.evaluation.samplers import baseline_scheduler, sample
    from perflow.training.teachers import load_teacher

    teacher = load_teacher("digits")
    labels = torch.arange(100) % 10
    noise = torch.randn(100, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    fn = class_model_fn(teacher.unet, teacher.label_encoder, labels, guidance_scale=1.0)
    out = sample(fn, baseline_scheduler("ddim", teacher_scheduler_config("digits")), noise, 25).samples
    acc = (load_digit_classifier()(out.clamp(-1, 1)).argmax(-1) == labels).float().mean().item()
    assert acc >= 0.9, f"label accuracy of the teacher's samples {acc}"
    assert out.abs().max() < 1.5  # samples live in the data range, not blown up


# ----------------------------------------------------------------------------- Gaussian mixture


def test_gmm_score_matches_autograd_of_log_density():
    gmm = default_mixture()
    g = torch.Generator().manual_seed(0)
    z = (2 * torch.randn(64, 2, generator=g, dtype=torch.float64)).requires_grad_(True)
    abar = torch.rand(64, generator=g, dtype=torch.float64) * 0.98 + 0.01
    (grad,) = torch.autograd.grad(gmm.log_prob(z, abar).sum(), z)
    assert torch.allclose(gmm.score(z.detach(), abar), grad, rtol=1e-9, atol=1e-12)
    eps = gmm.eps(z.detach(), abar)
    assert torch.allclose(eps, -(1 - abar).sqrt().unsqueeze(1) * grad, rtol=1e-9, atol=1e-12)


def test_gmm_log_prob_is_a_normalised_density():
    # integrate exp(log p) over a grid covering the mass: the trapezoid error is far below 1e-3
    gmm = default_mixture()
    xs = torch.linspace(-4, 4, 401, dtype=torch.float64)
    X, Y = torch.meshgrid(xs, xs, indexing="xy")
    p = gmm.log_prob(torch.stack([X.ravel(), Y.ravel()], 1)).exp()
    assert (p.sum() * (xs[1] - xs[0]) ** 2).item() == pytest.approx(1.0, abs=1e-3)


def test_gmm_single_component_equals_the_gaussian_teacher():
    # one isotropic component N(mu, s^2 I): eps = sqrt(1 - a)(z - sqrt(a) mu) / (a s^2 + 1 - a), as perflow.denoisers
    from gaussian_helpers import gaussian_denoiser
    from perflow.evaluation.toy2d import sd_alphas_cumprod

    mu, s = torch.tensor([0.5, -1.0], dtype=torch.float64), 0.7
    gmm = GaussianMixture(torch.ones(1), mu.view(1, 2), (s**2 * torch.eye(2, dtype=torch.float64)).view(1, 2, 2))
    ac = sd_alphas_cumprod()
    z = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    i = torch.randint(0, 1000, (16,), generator=torch.Generator().manual_seed(2))
    ours = torch.cat([gmm.denoiser(ac)(z[k:k + 1], i[k:k + 1]) for k in range(16)])
    assert torch.allclose(ours, gaussian_denoiser(mu, s, ac)(z, i), rtol=1e-10, atol=1e-12)


def test_gmm_samples_have_the_mixture_moments():
    gmm = default_mixture()
    x = gmm.sample(200_000, torch.Generator().manual_seed(0))
    mean = (gmm.weights.unsqueeze(1) * gmm.means).sum(0)
    second = (gmm.weights.view(-1, 1, 1) * (gmm.covariances + gmm.means.unsqueeze(2) * gmm.means.unsqueeze(1))).sum(0)
    cov = second - mean.outer(mean)
    # standard error of a mean over 200k samples with variance <= 3: about 0.004; allow 5 sigma
    assert torch.allclose(x.mean(0), mean, atol=0.02)
    assert torch.allclose(torch.cov(x.T), cov, atol=0.05)


def test_gmm_rejects_bad_parameters():
    with pytest.raises(ValueError, match="sum to 1"):
        GaussianMixture(torch.tensor([0.5, 0.6]), torch.zeros(2, 2), torch.eye(2).repeat(2, 1, 1))
    with pytest.raises(ValueError, match="covariances"):
        GaussianMixture(torch.tensor([1.0]), torch.zeros(1, 2), torch.eye(3).view(1, 3, 3))


def test_gmm_teacher_window_solve_converges_to_the_exact_flow():
    # DDIM on the exact eps converges (first order) to the probability-flow map: with a single
    # Gaussian the exact map is known (perflow.denoisers.gaussian_flow); the mixture's solve
    # must agree with a much finer solve of itself, better with more steps.
    from perflow.solver import solve_window
    from perflow.evaluation.toy2d import sd_alphas_cumprod

    gmm = default_mixture()
    ac = sd_alphas_cumprod()
    z = torch.randn(256, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    t_s, t_e = torch.tensor(0.75, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    fine = solve_window(gmm.denoiser(ac), z, t_s, t_e, 200, ac)
    err = [(solve_window(gmm.denoiser(ac), z, t_s, t_e, n, ac) - fine).pow(2).mean().sqrt().item() for n in (2, 8, 32)]
    assert err[0] > err[1] > err[2]
    assert err[2] < 0.01 * math.sqrt(2)


def test_saved_teacher_folder_follows_the_umask(tmp_path):
    """save_teacher writes through perflow.io.atomic_folder: the folder and its files get the umask's
    modes (formerly fixed 0o755/0o644 whatever the umask), and no temporary is left beside it."""
    import os
    import stat

    from diffusers import DDIMScheduler

    from perflow.builtin.train_teacher import save_teacher
    from perflow.tiny import tiny_class_teacher

    teacher = tiny_class_teacher()
    mask = os.umask(0o077)
    try:
        save_teacher(tmp_path / "t", teacher.unet, teacher.label_encoder, DDIMScheduler())
    finally:
        os.umask(mask)
    out = tmp_path / "t"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]
    for p in [out, *out.rglob("*")]:
        assert stat.S_IMODE(p.stat().st_mode) == (0o700 if p.is_dir() else 0o600), p
