"""FastCLIP-v2 (individual temperatures) against the formulas of gcl.md 2.2 step 9."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.losses import LossConfig, build_loss

DTYPE = torch.float64
N_DATA = 10
SIDES = ("im", "tt")


def make_batch(seed, n=6, d=5):
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=gen, dtype=DTYPE), dim=1)
    text = F.normalize(image + 0.7 * torch.randn(n, d, generator=gen, dtype=DTYPE), dim=1)
    return image, text


BATCHES = [
    (make_batch(11), torch.tensor([0, 1, 2, 3, 4, 5])),
    (make_batch(12), torch.tensor([2, 3, 4, 5, 6, 7])),
]
EPOCHS = [0, 1]


def views(image, text):
    S = image @ text.T
    return {"im": S, "tt": S.T}


class Reference:
    """Per-sample u, tau, bound, Adam state replayed from the formulas."""

    def __init__(self, cfg: LossConfig):
        self.cfg = cfg
        self.state = {
            s: {
                "u": torch.zeros(N_DATA, dtype=DTYPE),
                "tau": torch.full((N_DATA,), cfg.temperature, dtype=DTYPE),
                "b": torch.zeros(N_DATA, dtype=DTYPE),
                "m": torch.zeros(N_DATA, dtype=DTYPE),
                "v": torch.zeros(N_DATA, dtype=DTYPE),
            }
            for s in SIDES
        }

    def step(self, image, text, ids, epoch, gamma):
        """Returns per side: (tau_old, tau_new, bound, u) for the batch rows, after updating the tables."""
        cfg, out = self.cfg, {}
        for side, X in views(image, text).items():
            st = {k: v[ids].clone() for k, v in self.state[side].items()}
            n = X.shape[0]
            tau_old = st["tau"].clone()
            for i in range(n):
                d = [(X[i, j] - X[i, i]) / tau_old[i] for j in range(n)]
                b_new = max(float(st["b"][i]), max(float(x) for x in d))
                g = sum(math.exp(d[j] - b_new) for j in range(n) if j != i) / (n - 1)
                u_old = float(st["u"][i])
                u = g if u_old == 0 else (1 - gamma) * u_old * math.exp(float(st["b"][i]) - b_new) + gamma * g
                grad = (
                    math.log(u + cfg.eps)
                    + b_new
                    + cfg.rho
                    - sum(math.exp(d[j] - b_new) * d[j] for j in range(n) if j != i) / (u + cfg.eps) / (n - 1)
                )
                grad = min(5.0, max(-5.0, grad))
                beta1, beta2 = (0.9, 0.999) if epoch > 0 else (0.0, 0.0)
                m = beta1 * float(st["m"][i]) + (1 - beta1) * grad
                v = beta2 * float(st["v"][i]) + (1 - beta2) * grad**2
                m_hat, v_hat = m / (1 - beta1 ** (epoch + 1)), v / (1 - beta2 ** (epoch + 1))
                denom = math.sqrt(v_hat) if cfg.tau_adam_sqrt else v_hat
                lr = (
                    cfg.lr_tau / 3
                    if cfg.lr_tau_scheduler == "step_thresh" and tau_old[i] <= 0.03
                    else cfg.lr_tau
                )
                tau = min(1.0, max(0.01, float(tau_old[i]) - lr * m_hat / (denom + 1e-8)))
                st["u"][i], st["tau"][i], st["b"][i], st["m"][i], st["v"][i] = u, tau, b_new, m, v
            for k, val in st.items():
                self.state[side][k][ids] = val
            out[side] = (tau_old, st["tau"], st["b"], st["u"])
        return out


def ref_feature_grad(image, text, out, convention):
    """(1/2)(1/n) sum_i w_i (1/u_i) grad g_i, split as fast_clip computes it.

    The anchor/positive part uses tau_old; the negative part uses tau_new ("upstream") or tau_old
    ("paper"); w_i = 1 ("upstream") or tau_old_i ("paper"). Bounds shift both passes.
    """
    S = image @ text.T
    n = S.shape[0]
    g_img, g_txt = torch.zeros_like(image), torch.zeros_like(text)
    feats = {"im": (image, text, g_img, g_txt), "tt": (text, image, g_txt, g_img)}
    for side, (anchor, other, g_anchor, g_other) in feats.items():
        X = S if side == "im" else S.T
        tau_old, tau_new, bound, u = out[side]
        for i in range(n):
            weight = float(tau_old[i]) if convention == "paper" else 1.0
            tau_neg = tau_old[i] if convention == "paper" else tau_new[i]
            for j in range(n):
                if j == i:
                    continue
                c = weight / (2 * n * float(u[i]) * (n - 1))
                w_anchor = math.exp((X[i, j] - X[i, i]) / tau_old[i] - bound[i]) / tau_old[i]
                w_neg = math.exp((X[i, j] - X[i, i]) / tau_neg - bound[i]) / tau_neg
                g_anchor[i] += c * w_anchor * (other[j] - other[i])
                g_other[i] -= c * w_anchor * anchor[i]
                g_other[j] += c * w_neg * anchor[i]
    return g_img, g_txt


def cfg_for(**extra) -> LossConfig:
    kwargs = dict(
        name="fastclip",
        version="v2",
        data_size=N_DATA,
        gamma=0.4,
        gamma_decay_epochs=5,
        rho=0.6,
        temperature=0.3,
        lr_tau=0.05,
        lr_tau_scheduler="const",
    )
    kwargs.update(extra)
    return LossConfig(**kwargs)


def run(cfg):
    loss = build_loss(cfg, rank=0, world_size=1, device="cpu", table_dtype=DTYPE)
    for ((image, text), ids), epoch in zip(BATCHES, EPOCHS, strict=True):
        loss.set_epoch(epoch)
        image, text = image.clone().requires_grad_(), text.clone().requires_grad_()
        scale = torch.tensor(10.0, dtype=DTYPE, requires_grad=True)
        out = loss(image, text, scale, ids)
        out["contrastive_loss"].backward()
    return loss, image.grad, text.grad, scale.grad


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"grad_convention": "paper"},
        {"tau_adam_sqrt": False},
        {"lr_tau_scheduler": "step_thresh", "temperature": 0.03},
    ],
)
def test_v2_gradients_and_tables_match_formulas(extra):
    cfg = cfg_for(**extra)
    loss, grad_img, grad_txt, grad_scale = run(cfg)
    ref = Reference(cfg)
    for ((image, text), ids), epoch in zip(BATCHES, EPOCHS, strict=True):
        gamma = 1.0 if epoch == 0 else 0.5 * (1 + math.cos(math.pi * epoch / 5)) * 0.6 + 0.4
        out = ref.step(image, text, ids, epoch, gamma)

    assert grad_scale is None, "v2 must not train the model's logit scale"
    e_img, e_txt = ref_feature_grad(image, text, out, cfg.grad_convention)
    torch.testing.assert_close(grad_img, e_img, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_txt, e_txt, rtol=1e-10, atol=1e-12)
    for side in SIDES:
        st = ref.state[side]
        for name, key in (("u", "u"), ("tau", "tau"), ("bound", "b"), ("tau_m", "m"), ("tau_v", "v")):
            torch.testing.assert_close(
                getattr(loss.tables, f"{name}_{side}"), st[key], rtol=1e-11, atol=1e-14
            )
    assert not torch.equal(loss.tables.tau_im[ids], torch.full((6,), cfg.temperature, dtype=DTYPE))


def test_v2_tau_gradient_is_rgcl_derivative_and_paper_gradient_is_half_rgcl():
    """gamma = 1, batch = whole dataset: the tau step uses d/dtau_i [tau_i (log(eps + g_i) + rho)]
    and the "paper" feature gradient is half the RGCL gradient at the pre-update taus."""
    (image, text), _ = BATCHES[0]
    n = image.shape[0]
    cfg = cfg_for(data_size=n, gamma=1.0, grad_convention="paper", rho=0.1)
    loss = build_loss(cfg, rank=0, world_size=1, device="cpu", table_dtype=DTYPE)
    ids = torch.arange(n)
    loss(image, text, torch.tensor(1.0, dtype=DTYPE), ids)  # epoch 0: taus take sign steps and differ
    loss.set_epoch(1)
    taus = {s: getattr(loss.tables, f"tau_{s}").clone() for s in SIDES}
    m_old = {s: getattr(loss.tables, f"tau_m_{s}").clone() for s in SIDES}
    img, txt = image.clone().requires_grad_(), text.clone().requires_grad_()
    loss(img, txt, torch.tensor(1.0, dtype=DTYPE), ids)["contrastive_loss"].backward()

    tau_req = {s: taus[s].clone().requires_grad_() for s in SIDES}
    img2, txt2 = image.clone().requires_grad_(), text.clone().requires_grad_()
    S = img2 @ txt2.T
    off = ~torch.eye(n, dtype=torch.bool)
    rgcl = 0.0
    per_sample = {}
    for side, X in (("im", S), ("tt", S.T)):
        g = (torch.exp((X - X.diag()[:, None]) / tau_req[side][:, None]) * off).sum(1) / (n - 1)
        per_sample[side] = tau_req[side] * (torch.log(cfg.eps + g) + cfg.rho)
        rgcl = rgcl + per_sample[side].sum() / n
    d_img, d_txt = torch.autograd.grad(rgcl, (img2, txt2), retain_graph=True)
    torch.testing.assert_close(img.grad, 0.5 * d_img, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(txt.grad, 0.5 * d_txt, rtol=1e-10, atol=1e-12)
    for side in SIDES:
        (d_tau,) = torch.autograd.grad(per_sample[side].sum(), tau_req[side], retain_graph=True)
        grad_used = (getattr(loss.tables, f"tau_m_{side}") - 0.9 * m_old[side]) / 0.1
        torch.testing.assert_close(grad_used, d_tau.clamp(-5, 5), rtol=1e-9, atol=1e-12)


def test_v2_tau_stays_projected():
    cfg = cfg_for(lr_tau=5.0, rho=100.0)
    loss, *_ = run(cfg)
    assert float(loss.tables.tau_im.min()) >= 0.01 and float(loss.tables.tau_tt.max()) <= 1.0
    assert float(loss.tables.tau_im[0]) == pytest.approx(0.01)
