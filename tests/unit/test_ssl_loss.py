"""The unimodal losses (SogCLR dcl, SimCLR NT-Xent) against a float64 brute force, and 2 gloo ranks
against one process on the global batch."""

from __future__ import annotations

import datetime
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from tests.unit.test_losses_distributed import free_port
from training.losses.unimodal import UnimodalContrastiveLoss

DTYPE = torch.float64
B, D, N, T, GAMMA = 6, 5, 10, 0.1, 0.9
WORLD = 2
STEPS = [(1, torch.arange(6)), (2, torch.tensor([4, 5, 6, 7, 8, 9])), (3, torch.tensor([0, 9, 1, 8, 2, 7]))]


def views(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(B, D, generator=gen, dtype=DTYPE)
    return a, a + 0.5 * torch.randn(B, D, generator=gen, dtype=DTYPE)


def brute(a: torch.Tensor, b: torch.Tensor, u: dict[int, float], ids: list[int], loss_type: str):
    """Loss value whose gradient is the expected one, and the new u values, by explicit loops."""
    za, zb = F.normalize(a, dim=1), F.normalize(b, dim=1)
    n = za.shape[0]
    total = torch.zeros((), dtype=DTYPE)
    new_u = {}
    for i in range(n):
        per_view = []
        for anchor, other in ((za, zb), (zb, za)):
            negs = [other[j] for j in range(n) if j != i] + [anchor[j] for j in range(n) if j != i]
            sims = torch.stack([anchor[i] @ v for v in negs])
            pos = anchor[i] @ other[i]
            if loss_type == "simclr":
                total = total - torch.log(torch.exp(pos / T) / (torch.exp(pos / T) + torch.exp(sims / T).sum()))
                continue
            g = torch.exp(sims / T).sum() / (2 * (n - 1))
            old = u.get(ids[i], 0.0)
            u_new = g.detach() if old == 0.0 else (1 - GAMMA) * old + GAMMA * g.detach()
            per_view.append(u_new)
            # d/dw of T * g / u_new (u_new constant) = T grad(g) / u_new = T grad log g at u = g.
            total = total - pos + T * g / u_new
        if per_view:
            new_u[ids[i]] = float((per_view[0] + per_view[1]) / 2)
    return total / n, new_u


@pytest.mark.parametrize("loss_type", ["dcl", "simclr"])
def test_matches_float64_brute_force_over_steps(loss_type):
    loss = UnimodalContrastiveLoss(loss_type=loss_type, data_size=N, temperature=T, gamma=GAMMA, table_dtype=DTYPE)
    u: dict[int, float] = {}
    for seed, ids in STEPS:
        a, b = views(seed)
        a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
        out = loss(a1, b1, ids)
        out["contrastive_loss"].backward()
        a2, b2 = a.clone().requires_grad_(), b.clone().requires_grad_()
        value, new_u = brute(a2, b2, u, ids.tolist(), loss_type)
        value.backward()
        torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(b1.grad, b2.grad, rtol=1e-10, atol=1e-12)
        if loss_type == "simclr":
            torch.testing.assert_close(out["contrastive_loss"].detach(), value.detach())
            continue
        u.update(new_u)
        table = loss.tables.u
        for k, v in u.items():
            assert math.isclose(float(table[k]), v, rel_tol=1e-12)
        assert float(out["u_q90"]) >= float(out["u_q50"]) >= float(out["u_q10"]) > 0


def test_simclr_equals_cross_entropy_form():
    a, b = views(7)
    za, zb = F.normalize(a, dim=1), F.normalize(b, dim=1)
    z = torch.cat([za, zb])
    sim = z @ z.T / T
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(B) + B, torch.arange(B)])
    want = F.cross_entropy(sim, target) * 2
    got = UnimodalContrastiveLoss(loss_type="simclr")(a, b, torch.arange(B))["contrastive_loss"]
    torch.testing.assert_close(got, want)


def run(loss_type: str, rank: int, world: int) -> dict:
    loss = UnimodalContrastiveLoss(
        loss_type=loss_type, data_size=N, temperature=T, gamma=GAMMA, rank=rank, world_size=world, table_dtype=DTYPE
    )
    rows = slice(rank * B // world, (rank + 1) * B // world)
    steps = []
    for seed, ids in STEPS:
        a, b = (x[rows].clone().requires_grad_() for x in views(seed))
        out = loss(a, b, ids[rows])
        out["contrastive_loss"].backward()
        steps.append({"a": a.grad, "b": b.grad, "loss": out["contrastive_loss"].detach()})
    return {"steps": steps, "u": loss.tables.u.clone() if loss.tables is not None else None}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        torch.save({t: run(t, rank, WORLD) for t in ("dcl", "simclr")}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for loss_type in ("dcl", "simclr"):
        single = run(loss_type, 0, 1)
        for k, want in enumerate(single["steps"]):
            for key in ("a", "b"):
                # DDP averages parameter gradients over ranks: rank r's feature gradient / K is the
                # single-process gradient of its rows.
                got = torch.cat([r[loss_type]["steps"][k][key] for r in ranks]) / WORLD
                torch.testing.assert_close(got, want[key], rtol=1e-10, atol=1e-12)
            got_loss = sum(r[loss_type]["steps"][k]["loss"] for r in ranks) / WORLD
            torch.testing.assert_close(got_loss, want["loss"])
        if loss_type == "dcl":
            for r in ranks:
                torch.testing.assert_close(r[loss_type]["u"], single["u"], rtol=1e-12, atol=0)
