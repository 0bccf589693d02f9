"""The expert data stream: selection, splitting between readers, determinism and exact resume."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch

from training.data import (
    ExpertData,
    ExpertStream,
    SampleDecoder,
    ShardCache,
    StreamLayout,
    StreamOrder,
    build_loader,
    load_expert_data,
    resolve_split,
)
from training.models import create_model
from training.synthetic import make_synthetic_run

NUM_SHARDS, PER_SHARD, RATIO = 4, 40, 0.1


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """4 tars x 40 pairs of 4 classes; 2 experts (class id % 2)."""
    return make_synthetic_run(
        tmp_path_factory.mktemp("train_data"),
        num_shards=NUM_SHARDS,
        per_shard=PER_SHARD,
        overrides=[f"train.ooc_ratio={RATIO}"],
    )


@pytest.fixture(scope="module")
def expert0(run) -> ExpertData:
    return load_expert_data(run.cfg, 0)


@pytest.fixture(scope="module")
def decoder(expert0) -> SampleDecoder:
    bundle = create_model("mode-micro-vit")
    return SampleDecoder(
        bundle.train_transform, 0, expert0.image_keys, expert0.caption_keys, expert0.json_fields
    )


def _stream(data, decoder, split, rank=0, world=1, workers=1, batch=8, window=16, start=0) -> ExpertStream:
    return ExpertStream(
        data,
        StreamLayout(split, rank, world, workers, batch, window),
        decoder,
        "mode-micro-vit",
        start_batch=start,
    )


def _epoch_items(streams: list[ExpertStream], epoch: int) -> list[int]:
    """Pair ids of ``epoch`` read by every (rank, worker) of a job, without decoding."""
    items = []
    for stream in streams:
        cache = ShardCache(stream.data)
        for worker in range(stream.layout.workers):
            order = stream.order_for(worker)
            for batch in itertools.count(worker, stream.layout.workers):
                sources = stream.batch_sources(batch, order)
                items += [cache.picks(s, e)[k][1] for e, s, k in sources if e == epoch]
                if min(e for e, _, _ in sources) > epoch:
                    break
    return items


def test_selection_is_the_cluster_plus_a_seeded_out_of_cluster_fraction(run, expert0):
    inside = {f"{k}": v for k, v in run.labels.items() if v % 2 == 0}
    assert sum(s.num_in for s in expert0.shards) == len(inside)
    assert expert0.epoch_size == pytest.approx(len(inside) + RATIO * (len(run.labels) - len(inside)))
    key_of = {}
    for shard in range(NUM_SHARDS):
        for epoch in range(3):
            picked = expert0.selected(shard, epoch)
            key_of.update({pid: key for key, pid in picked.items()})
            ooc = [k for k in picked if run.labels[k] % 2 == 1]
            info = expert0.shards[shard]
            assert {k for k in picked if run.labels[k] % 2 == 0} == {
                k for k in inside if k.startswith(f"{shard:03d}_")
            }
            assert int(RATIO * info.num_out) <= len(ooc) <= int(RATIO * info.num_out) + 1
            assert picked == expert0.selected(shard, epoch)  # seeded: same draw again
    draws = [frozenset(expert0.selected(0, e)) for e in range(6)]
    assert len(set(draws)) > 1  # a fresh out-of-cluster sample per epoch


def test_decoded_stream_yields_exactly_one_epoch_of_the_expert(run, expert0, decoder):
    stream = _stream(expert0, decoder, "shards", batch=8)
    expected = Counter(pid for s in range(NUM_SHARDS) for pid in expert0.selected(s, 0).values())
    length = sum(expected.values())
    seen: list[int] = []
    for images, tokens, ids in itertools.islice(iter(stream), -(-length // 8)):
        assert images.shape == (8, 3, 32, 32) and tokens.shape == (8, 16) and tokens.dtype == torch.int64
        seen += ids.tolist()
    assert Counter(seen[:length]) == expected
    ooc = sum(1 for pid in seen[:length] if run.labels[_key(run, expert0, pid)] % 2 == 1)
    assert ooc == length - sum(s.num_in for s in expert0.shards) > 0


def _key(run, data: ExpertData, pair_id: int) -> str:
    for shard in range(len(data.shards)):
        for epoch in range(2):
            for key, pid in data.selected(shard, epoch).items():
                if pid == pair_id:
                    return key
    raise KeyError(pair_id)


@pytest.mark.parametrize("split,world,workers", [("shards", 2, 2), ("samples", 2, 3), ("samples", 1, 1)])
def test_readers_are_disjoint_and_cover_the_epoch(expert0, decoder, split, world, workers):
    streams = [_stream(expert0, decoder, split, rank=r, world=world, workers=workers) for r in range(world)]
    for epoch in (0, 1):
        items = _epoch_items(streams, epoch)
        expected = sorted(pid for s in range(NUM_SHARDS) for pid in expert0.selected(s, epoch).values())
        assert sorted(items) == expected


def test_auto_split_picks_samples_when_shards_are_too_few(expert0):
    assert resolve_split("auto", expert0, 4) == "shards"
    assert resolve_split("auto", expert0, 6) == "samples"
    with pytest.raises(ValueError, match="data_split"):
        resolve_split("shards", expert0, 6)


def test_samples_split_gives_the_same_global_batches_for_any_world_size(expert0, decoder):
    single = _stream(expert0, decoder, "samples", world=1, workers=2, batch=8)
    pair = [_stream(expert0, decoder, "samples", rank=r, world=2, workers=1, batch=4) for r in range(2)]
    for batch in range(30):  # crosses epoch boundaries
        assert single.batch_pair_ids(batch) == pair[0].batch_pair_ids(batch) + pair[1].batch_pair_ids(batch)


def test_same_seed_same_batches_other_seed_other_order(run, expert0, decoder):
    a = [_stream(expert0, decoder, "shards").batch_pair_ids(b) for b in range(6)]
    b = [_stream(expert0, decoder, "shards").batch_pair_ids(b) for b in range(6)]
    other = load_expert_data(run.cfg, 0).__class__(**{**expert0.__dict__, "seed": 1})
    c = [_stream(other, decoder, "shards").batch_pair_ids(b) for b in range(6)]
    assert a == b and a != c


def test_resume_continues_the_stream_exactly(expert0, decoder):
    full = list(itertools.islice(iter(_stream(expert0, decoder, "shards", workers=1)), 7))
    tail = list(itertools.islice(iter(_stream(expert0, decoder, "shards", workers=1, start=4)), 3))
    for (ia, ta, pa), (ib, tb, pb) in zip(full[4:], tail, strict=True):
        assert torch.equal(pa, pb) and torch.equal(ta, tb) and torch.equal(ia, ib)


def test_worker_processes_interleave_in_order_and_resume(expert0, decoder):
    stream = _stream(expert0, decoder, "shards", workers=2)
    expected = [stream.batch_pair_ids(b) for b in range(3, 8)]
    loader = build_loader(_stream(expert0, decoder, "shards", workers=2, start=3), workers=2)
    got = [ids.tolist() for _, _, ids in itertools.islice(loader, 5)]
    assert got == expected


def test_visit_caption_and_augmentation_are_seeded_by_epoch_and_pair(expert0, decoder):
    cache = ShardCache(expert0)
    key, pid = cache.picks(0, 0)[0]
    raw = cache.tar(0).read(key)
    image_a, caption_a = decoder(raw, 0, pid)
    image_b, caption_b = decoder(raw, 0, pid)
    assert caption_a == caption_b and torch.equal(image_a, image_b)
    captions = {decoder(raw, epoch, pid)[1] for epoch in range(12)}
    assert len(captions) > 1 and all("circle" in c or "triangle" in c for c in captions)


def test_stream_order_skips_empty_epochs_and_locates_positions(expert0):
    order = StreamOrder(expert0, reader=None, readers=1, window=16)
    total = sum(expert0.num_selected(s, 0) for s in range(NUM_SHARDS))
    assert order.locate(0) == (0, 0)
    assert order.locate(total) == (1, 0)
    assert order.locate(total - 1) == (0, total - 1)
