"""GCL (SogCLR / FastCLIP v0, v1, v3) and GloFND gradients against brute-force references.

The references below are written from the equations of docs gcl.md (sections 1.2, 2.2, 3), with
explicit loops over anchors and negatives, independently of training/losses.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.losses import LossConfig, build_loss

DTYPE = torch.float64
N_DATA = 10


# ----------------------------------------------------------------------------- brute-force reference


def sims(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """S[i, j] = s(e1_i, e2_j): image anchor i vs text j, and text anchor j vs image i."""
    return image @ text.T


def side_views(S: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per anchor side, X[i, j] = similarity of anchor i to negative j (image side: S, text side: S.T)."""
    return {"im": S, "tt": S.T}


def ref_lambda_step(X, lam, m, v, *, alpha, lr, epoch):
    """GloFND: grad = alpha - frac(neg > lam); Adam(0.9, 0.98, 1e-8) with bias exponent epoch+1; clamp."""
    n = X.shape[0]
    lam, m, v = lam.clone(), m.clone(), v.clone()
    for i in range(n):
        above = sum(1 for j in range(n) if j != i and X[i, j] > lam[i])
        grad = alpha - above / (n - 1)
        m[i] = 0.9 * m[i] + 0.1 * grad
        v[i] = 0.98 * v[i] + 0.02 * grad**2
        m_hat = m[i] / (1 - 0.9 ** (epoch + 1))
        v_hat = v[i] / (1 - 0.98 ** (epoch + 1))
        lam[i] = min(1.0, max(-1.0, float(lam[i] - lr * m_hat / (math.sqrt(v_hat) + 1e-8))))
    return lam, m, v


def ref_keep(X, lam):
    n = X.shape[0]
    return torch.tensor(
        [[j != i and (lam is None or bool(X[i, j] <= lam[i])) for j in range(n)] for i in range(n)]
    )


def ref_g(X, tau, keep):
    """g_i = (1/n_i) sum_{j kept} exp((X_ij - X_ii)/tau), n_i = number of kept negatives."""
    n = X.shape[0]
    out = torch.zeros(n, dtype=DTYPE)
    for i in range(n):
        kept = [j for j in range(n) if keep[i, j]]
        out[i] = sum(math.exp((X[i, j] - X[i, i]) / tau) for j in kept) / len(kept)
    return out


def ref_estimator(image, text, u, tau, keep):
    """E = (1/n) sum_i (1/u_i) grad g_i over both sides, written as weights on grad s_ij - grad s_ii.

    Returns (dE/dimage, dE/dtext) as the feature-gradient of the estimator, and
    (1/n) sum_i (1/u_i) dg_i/dtau for the temperature.
    """
    S = sims(image, text)
    n = S.shape[0]
    g_img, g_txt = torch.zeros_like(image), torch.zeros_like(text)
    dtau = ref_side(S, image, text, g_img, g_txt, u["im"], keep["im"], tau)  # image anchors
    dtau += ref_side(S.T, text, image, g_txt, g_img, u["tt"], keep["tt"], tau)  # text anchors
    return g_img / n, g_txt / n, float(dtau) / n


def ref_side(S, anchor, other, g_anchor, g_other, u, keep, tau):
    """One direction of ``ref_estimator``: anchor i, kept negatives j with s_ij = S[i, j]; adds the
    feature gradients in place and returns the temperature term."""
    dtau = 0.0
    for i in range(S.shape[0]):
        kept = [j for j in range(S.shape[0]) if keep[i, j]]
        for j in kept:
            w = math.exp((S[i, j] - S[i, i]) / tau) / (u[i] * len(kept))
            g_anchor[i] += w / tau * (other[j] - other[i])
            g_other[j] += w / tau * anchor[i]
            g_other[i] -= w / tau * anchor[i]
            dtau += -w * (S[i, j] - S[i, i]) / tau**2
    return dtau


def ref_gamma(epoch, gamma_min, decay):
    if epoch == 0:
        return 1.0
    if epoch >= decay:
        return gamma_min
    return 0.5 * (1 + math.cos(math.pi * epoch / decay)) * (1 - gamma_min) + gamma_min


class Reference:
    """Replays the loss on a sequence of batches from the formulas: u tables, lambda tables, gradients."""

    def __init__(self, cfg: LossConfig):
        self.cfg = cfg
        self.u = {s: torch.zeros(N_DATA, dtype=DTYPE) for s in ("im", "tt")}
        self.lam = {s: torch.ones(N_DATA, dtype=DTYPE) for s in ("im", "tt")}
        self.lam_m = {s: torch.zeros(N_DATA, dtype=DTYPE) for s in ("im", "tt")}
        self.lam_v = {s: torch.zeros(N_DATA, dtype=DTYPE) for s in ("im", "tt")}

    def step(self, image, text, ids, tau, epoch):
        cfg = self.cfg
        X = side_views(sims(image, text))
        keep, u_new = {}, {}
        for s in ("im", "tt"):
            lam = None
            if cfg.glofnd == "glofnd" and epoch >= cfg.glofnd_start_update:
                new = ref_lambda_step(
                    X[s],
                    self.lam[s][ids],
                    self.lam_m[s][ids],
                    self.lam_v[s][ids],
                    alpha=cfg.glofnd_alpha,
                    lr=cfg.glofnd_lr_lda,
                    epoch=epoch,
                )
                self.lam[s][ids], self.lam_m[s][ids], self.lam_v[s][ids] = new
                if epoch >= cfg.glofnd_start_lda:
                    lam = new[0]
            keep[s] = ref_keep(X[s], lam)
            g = ref_g(X[s], tau, keep[s])
            gamma = ref_gamma(epoch, cfg.gamma, cfg.gamma_decay_epochs)
            old = self.u[s][ids]
            u_new[s] = torch.where(old == 0, g, (1 - gamma) * old + gamma * g)
            self.u[s][ids] = u_new[s]
        return u_new, keep


# ----------------------------------------------------------------------------- helpers


def make_batch(seed, n=6, d=5):
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=gen, dtype=DTYPE), dim=1)
    text = F.normalize(image + 0.8 * torch.randn(n, d, generator=gen, dtype=DTYPE), dim=1)
    # A near-duplicate pair gives GloFND genuine false negatives to find.
    image[1] = F.normalize(image[0] + 0.05 * torch.randn(d, generator=gen, dtype=DTYPE), dim=0)
    text[1] = F.normalize(text[0] + 0.05 * torch.randn(d, generator=gen, dtype=DTYPE), dim=0)
    return image, text


BATCHES = [
    (make_batch(1), torch.tensor([0, 1, 2, 3, 4, 5])),
    (make_batch(2), torch.tensor([3, 4, 5, 6, 7, 8])),
]
EPOCHS = [0, 2]
TAU = 0.2


def run_loss(cfg, table_dtype=DTYPE):
    """Two steps (epoch 0 then epoch 2); returns the second step's outputs and gradients."""
    loss = build_loss(cfg, rank=0, world_size=1, device="cpu", table_dtype=table_dtype)
    for ((image, text), ids), epoch in zip(BATCHES, EPOCHS, strict=True):
        loss.set_epoch(epoch)
        image, text = image.clone().requires_grad_(), text.clone().requires_grad_()
        scale = torch.tensor(1 / TAU, dtype=DTYPE, requires_grad=True)
        out = loss(image, text, scale, ids)
        total = sum(v for k, v in out.items() if k.endswith("_loss"))
        total.backward()
    return loss, out, image.grad, text.grad, scale.grad


def cfg_for(variant: str, **extra) -> LossConfig:
    version, _, flavour = variant.partition("+")
    kwargs = dict(
        name="fastclip", version=version, data_size=N_DATA, gamma=0.3, gamma_decay_epochs=4, rho=0.7
    )
    if flavour == "glofnd":
        kwargs.update(glofnd="glofnd", glofnd_alpha=0.2, glofnd_lr_lda=0.3)
    if flavour == "paper":
        kwargs.update(grad_convention="paper")
    kwargs.update(extra)
    return LossConfig(**kwargs)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("variant", ["v0", "v1", "v3", "v0+paper", "v3+paper", "v1+glofnd", "v3+glofnd"])
def test_surrogate_gradient_equals_brute_force_estimator(variant):
    cfg = cfg_for(variant)
    loss, out, grad_img, grad_txt, grad_scale = run_loss(cfg)

    ref = Reference(cfg)
    for ((image, text), ids), epoch in zip(BATCHES, EPOCHS, strict=True):
        u, keep = ref.step(image, text, ids, TAU, epoch)
    if cfg.glofnd == "glofnd":
        assert not bool(keep["im"].sum() == 30), "test data must trigger GloFND filtering"
    e_img, e_txt, e_tau = ref_estimator(image, text, u, TAU, keep)

    # Features: grad L = E / 2 (v0, v1); v3 scales the model gradient by tau.
    factor = 0.5 * (TAU if cfg.multiply_tau else 1.0)
    torch.testing.assert_close(grad_img, factor * e_img, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_txt, factor * e_txt, rtol=1e-10, atol=1e-12)

    # Tables follow the moving-average rule (first visit: u = g), lambda the GloFND Adam rule.
    torch.testing.assert_close(loss.tables.u_im, ref.u["im"], rtol=1e-12, atol=0)
    torch.testing.assert_close(loss.tables.u_tt, ref.u["tt"], rtol=1e-12, atol=0)
    if cfg.glofnd == "glofnd":
        torch.testing.assert_close(loss.tables.lda_im, ref.lam["im"], rtol=0, atol=1e-12)
        torch.testing.assert_close(loss.tables.lda_tt, ref.lam["tt"], rtol=0, atol=1e-12)
        kept = (keep["im"].sum() + keep["tt"].sum()) / (2 * 30)
        assert float(out["kept_frac"]) == pytest.approx(float(kept))

    # Temperature: dL/dtau from gcl.md 2.2 step 7; both passes carry it under "upstream", one under "paper".
    passes = 0.5 if cfg.grad_convention == "paper" else 1.0
    if cfg.temperature_scheme == "global_constant":
        assert grad_scale is None
        return
    dl_dtau = passes * e_tau
    if cfg.multiply_tau:
        mean_log_u = (torch.log(u["im"] + cfg.eps) + torch.log(u["tt"] + cfg.eps)).mean()
        dl_dtau = 0.5 * float(mean_log_u) + cfg.rho + TAU * dl_dtau
    expected_scale_grad = dl_dtau * (-(TAU**2))  # tau = 1/s
    assert float(grad_scale) == pytest.approx(expected_scale_grad, rel=1e-9, abs=1e-12)


def true_objective(image, text, log_scale, eps):
    """F = (tau/n) sum_i [log(eps + g1_i) + log(eps + g2_i)] and G = F / tau, by autograd-able ops."""
    scale = log_scale.exp()
    S = image @ text.T
    n = S.shape[0]
    off = ~torch.eye(n, dtype=torch.bool)
    g1 = (torch.exp(scale * (S - S.diag()[:, None])) * off).sum(1) / (n - 1)
    g2 = (torch.exp(scale * (S.T - S.diag()[:, None])) * off).sum(1) / (n - 1)
    G = (torch.log(eps + g1) + torch.log(eps + g2)).sum() / n
    return G / scale, G


def one_full_batch_step(cfg, image, text, tau):
    loss = build_loss(cfg, rank=0, world_size=1, device="cpu", table_dtype=DTYPE)
    image, text = image.clone().requires_grad_(), text.clone().requires_grad_()
    scale = torch.tensor(1 / tau, dtype=DTYPE, requires_grad=True)
    out = loss(image, text, scale, torch.arange(image.shape[0]))
    out["contrastive_loss"].backward()
    return loss, image.grad, text.grad, scale.grad


@pytest.mark.parametrize("version", ["v0", "v1", "v3"])
@pytest.mark.parametrize("convention", ["upstream", "paper"])
def test_gamma_one_full_batch_gradient_is_true_objective_gradient(version, convention):
    """gamma = 1, batch = whole dataset: grad_features L = grad F / (2 tau) (v0, v1) and grad F / 2 (v3)."""
    (image, text), _ = BATCHES[0]
    n = image.shape[0]
    cfg = LossConfig(name="fastclip", version=version, data_size=n, rho=0.7, grad_convention=convention)
    loss, grad_img, grad_txt, grad_scale = one_full_batch_step(cfg, image, text, TAU)

    img, txt = image.clone().requires_grad_(), text.clone().requires_grad_()
    log_s = torch.tensor(math.log(1 / TAU), dtype=DTYPE, requires_grad=True)
    F_val, G_val = true_objective(img, txt, log_s, cfg.eps)
    dF_img, dF_txt = torch.autograd.grad(F_val, (img, txt), retain_graph=True)
    factor = 0.5 if cfg.multiply_tau else 0.5 / TAU
    torch.testing.assert_close(grad_img, factor * dF_img, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_txt, factor * dF_txt, rtol=1e-10, atol=1e-12)

    scale = torch.tensor(1 / TAU, dtype=DTYPE)
    (dG_dlog_s,) = torch.autograd.grad(G_val, log_s, retain_graph=True)
    dG_ds = float(dG_dlog_s / scale)
    if version == "v1":
        assert grad_scale is None
    elif version == "v0":
        # v0 trains s on d/ds of mean log g (the GCL without its tau prefactor); "paper" on half of it.
        assert float(grad_scale) == pytest.approx(dG_ds * (0.5 if convention == "paper" else 1.0), rel=1e-9)
    else:
        rgclg = F_val + 2 * cfg.rho / log_s.exp()
        (d_rgclg_dlog_s,) = torch.autograd.grad(rgclg, log_s)
        paper = 0.5 * float(d_rgclg_dlog_s / scale)
        # upstream counts tau * dG/dtau twice: the extra term is (tau/2) dG/ds.
        expected = paper if convention == "paper" else paper + 0.5 * TAU * dG_ds
        assert float(grad_scale) == pytest.approx(expected, rel=1e-9)
    torch.testing.assert_close(loss.tables.u_im, ref_g(image @ text.T, TAU, ref_keep(image @ text.T, None)))


def test_first_visit_and_invalid_entries_take_the_batch_estimate():
    cfg = cfg_for("v1")
    loss = build_loss(cfg, rank=0, world_size=1, device="cpu", table_dtype=DTYPE)
    loss.set_epoch(3)
    (image, text), ids = BATCHES[0]
    loss.tables.u_im[ids[0]] = float("nan")
    loss.tables.u_im[ids[1]] = float("inf")
    loss.tables.u_im[ids[2]] = 5.0
    loss(image, text, torch.tensor(1 / TAU, dtype=DTYPE), ids)
    g = ref_g(image @ text.T, TAU, ref_keep(image @ text.T, None))
    gamma = ref_gamma(3, cfg.gamma, cfg.gamma_decay_epochs)
    expected = g.clone()
    expected[2] = (1 - gamma) * 5.0 + gamma * g[2]
    torch.testing.assert_close(loss.tables.u_im[ids], expected, rtol=1e-12, atol=0)
    assert float(loss.gamma) == pytest.approx(gamma)


def test_float32_tables_and_half_features_work():
    cfg = cfg_for("v3+glofnd")
    loss = build_loss(cfg, rank=0, world_size=1, device="cpu")
    (image, text), ids = BATCHES[0]
    image = image.to(torch.bfloat16).requires_grad_()
    out = loss(image, text.to(torch.bfloat16), torch.tensor(1 / TAU), ids)
    out["contrastive_loss"].backward()
    assert loss.tables.u_im.dtype == torch.float32
    assert image.grad is not None and torch.isfinite(image.grad.float()).all()


def test_pair_ids_out_of_range_are_refused():
    loss = build_loss(cfg_for("v1"), rank=0, world_size=1, device="cpu")
    (image, text), _ = BATCHES[0]
    with pytest.raises(ValueError, match=r"pair_ids: must be in \[0, data_size=10\)"):
        loss(image, text, torch.tensor(5.0), torch.tensor([0, 1, 2, 3, 4, 10]))
