"""Two gloo processes must reproduce one process on the global batch.

After DDP-style averaging (parameter gradient = mean over ranks, so a rank's feature gradient / K is
the single-process gradient of its rows), gradients, loss values and every per-sample table must equal
the single-process run on the concatenated batch; the CLIP loss must also equal open_clip's ClipLoss
on each rank.
"""

from __future__ import annotations

import datetime
import importlib.util
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from training.losses import LossConfig, build_loss

WORLD = 2
LOCAL = 4
N_DATA = 12
DTYPE = torch.float64
CASES = {
    "clip": dict(name="clip"),
    "clip_full": dict(name="clip", local_loss=False, gather_with_grad=True),
    "v1": dict(name="fastclip", version="v1"),
    "v3": dict(name="fastclip", version="v3"),
    "v3_paper": dict(name="fastclip", version="v3", grad_convention="paper"),
    "v2": dict(name="fastclip", version="v2", lr_tau=0.05, lr_tau_scheduler="const", temperature=0.3),
    "v2_paper": dict(
        name="fastclip",
        version="v2",
        lr_tau=0.05,
        lr_tau_scheduler="const",
        temperature=0.3,
        grad_convention="paper",
    ),
    "v3_glofnd": dict(name="fastclip", version="v3", glofnd="glofnd", glofnd_alpha=0.2, glofnd_lr_lda=0.3),
    "v1_glofnd": dict(name="fastclip", version="v1", glofnd="glofnd", glofnd_alpha=0.2, glofnd_lr_lda=0.3),
}
STEPS = [(0, 1, torch.arange(8)), (2, 2, torch.tensor([6, 7, 8, 9, 10, 11, 0, 1]))]  # (epoch, seed, ids)


def global_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(WORLD * LOCAL, 5, generator=gen, dtype=DTYPE), dim=1)
    text = F.normalize(image + 0.7 * torch.randn(WORLD * LOCAL, 5, generator=gen, dtype=DTYPE), dim=1)
    # Near-duplicates across the two ranks give GloFND false negatives that cross rank boundaries.
    for src, dst in ((0, 5), (2, 7)):
        image[dst] = F.normalize(image[src] + 0.05 * torch.randn(5, generator=gen, dtype=DTYPE), dim=0)
        text[dst] = F.normalize(text[src] + 0.05 * torch.randn(5, generator=gen, dtype=DTYPE), dim=0)
    return image, text


def run_case(cfg: LossConfig, rank: int, world: int, compare_open_clip: bool) -> dict:
    loss = build_loss(cfg, rank=rank, world_size=world, device="cpu", table_dtype=DTYPE)
    rows = slice(rank * LOCAL, (rank + 1) * LOCAL) if world > 1 else slice(None)
    record = {"steps": []}
    for epoch, seed, ids in STEPS:
        loss.set_epoch(epoch)
        image, text = (x[rows].clone().requires_grad_() for x in global_batch(seed))
        scale = torch.tensor(4.0, dtype=DTYPE, requires_grad=True)
        out = loss(image, text, scale, ids[rows])
        sum(v for k, v in out.items() if k.endswith("_loss")).backward()
        step = {
            "out": {k: v.detach() for k, v in out.items()},
            "image": image.grad,
            "text": text.grad,
            "scale": scale.grad,
        }
        if compare_open_clip:
            step["open_clip"] = open_clip_reference(cfg, rank, world, image.detach(), text.detach())
        record["steps"].append(step)
    record["state"] = {k: v for k, v in loss.state_dict().items() if isinstance(v, torch.Tensor)}
    return record


def open_clip_loss_module():
    """open_clip/loss.py loaded on its own: importing the package (timm, torchvision) would double the
    start-up time of every spawned worker."""
    path = Path(importlib.util.find_spec("open_clip").submodule_search_locations[0]) / "loss.py"
    spec = importlib.util.spec_from_file_location("open_clip_loss_only", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def open_clip_reference(cfg, rank, world, image, text):
    ref = open_clip_loss_module().ClipLoss(
        local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad, rank=rank, world_size=world
    )
    image, text = image.clone().requires_grad_(), text.clone().requires_grad_()
    scale = torch.tensor(4.0, dtype=DTYPE, requires_grad=True)
    value = ref(image, text, scale)
    value.backward()
    return {"value": value.detach(), "image": image.grad, "text": text.grad, "scale": scale.grad}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        results = {
            name: run_case(LossConfig(data_size=N_DATA, **kw), rank, WORLD, kw["name"] == "clip")
            for name, kw in CASES.items()
        }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out_dir = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(free_port(), str(out_dir)), nprocs=WORLD, join=True)
    ranks = [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]
    single = {name: run_case(LossConfig(data_size=N_DATA, **kw), 0, 1, False) for name, kw in CASES.items()}
    return {"ranks": ranks, "single": single}


def close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", [c for c in CASES if c != "clip_full"])
def test_two_ranks_equal_one_process_on_the_global_batch(runs, case):
    ranks = [r[case] for r in runs["ranks"]]
    single = runs["single"][case]
    for step_index, want in enumerate(single["steps"]):
        got = [r["steps"][step_index] for r in ranks]
        for key in ("image", "text"):
            close(torch.cat([g[key] for g in got]) / WORLD, want[key], f"step {step_index} grad {key}")
        if want["scale"] is None:
            assert all(g["scale"] is None for g in got)
        else:
            close(sum(g["scale"] for g in got) / WORLD, want["scale"], f"step {step_index} grad scale")
        for key, value in want["out"].items():
            close(sum(g["out"][key] for g in got) / WORLD, value, f"step {step_index} output {key}")
    for rank in ranks:
        assert rank["state"].keys() == single["state"].keys()
        for key, value in single["state"].items():
            close(rank["state"][key], value, f"table {key}")
    if "glofnd" in case:
        assert float(single["steps"][1]["out"]["kept_frac"]) < 1.0, "the data must trigger GloFND masking"


@pytest.mark.parametrize("case", ["clip", "clip_full"])
def test_clip_loss_equals_open_clip_on_each_rank(runs, case):
    for rank in runs["ranks"]:
        for step in rank[case]["steps"]:
            ref = step["open_clip"]
            close(step["out"]["contrastive_loss"], ref["value"], "loss")
            for key in ("image", "text", "scale"):
                close(step[key], ref[key], f"grad {key}")
