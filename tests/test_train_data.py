"""Sample format, datasets, bad-data handling (avatarforcing/train/data.py)."""
import logging

import pytest
import torch

from avatarforcing import AvatarForcingError
from avatarforcing.config import load_config
from avatarforcing.train import data as D
from avatarforcing.train.synthetic import write_clip_samples


@pytest.fixture()
def cfg(tmp_path):
    return load_config("configs/train_teacher_tiny.yaml", [f"data.shards={tmp_path / 'shards'}"])


def test_roundtrip_text_padding_and_metadata(tmp_path, cfg):
    paths = write_clip_samples(cfg, tmp_path / "shards", 2)
    s, meta = D.read_sample(paths[0], with_metadata=True)
    assert set(s) == set(D.CLIP_FIELDS)
    assert s["latents"].shape == (16, 7, 8, 8) and s["audio"].shape == (7, 256) and s["text"].shape == (3, 32)
    assert meta["format"] == D.FORMAT and meta["kind"] == "clip" and meta["caption"] == "synthetic 0"
    ds = D.ShardDataset(tmp_path / "shards", D.CLIP_FIELDS, text_len=8)
    assert len(ds) == 2 and ds.get(0)["text"].shape == (8, 32)
    assert torch.equal(ds.get(0)["text"][:3], s["text"]) and ds.get(0)["text"][3:].abs().sum() == 0
    null = D.read_null_text(tmp_path / "shards", 8, 32)
    assert null["empty"].shape == null["negative"].shape == (8, 32)
    # no half files: writes go through a temp name
    assert not list((tmp_path / "shards").glob(".*tmp"))


def test_bad_data_is_reported_with_the_file_name_and_skipped_or_fails(tmp_path, cfg, caplog):
    root = tmp_path / "shards"
    paths = write_clip_samples(cfg, root, 5)
    corrupt = paths[1]
    corrupt.write_bytes(corrupt.read_bytes()[:100])                       # truncated file
    s = D.read_sample(paths[3])
    del s["audio"]
    D.write_sample(paths[3], s)                                            # missing field

    ds = D.ShardDataset(root, D.CLIP_FIELDS, text_len=8, on_error="skip")
    stream = D.BatchStream(ds, 1, seed=0)
    with caplog.at_level(logging.WARNING):
        got = [int(stream.next()["index"][0]) for _ in range(5)]
    assert 1 not in got and 3 not in got
    assert ds.skipped >= 2 and set(ds.bad) == {corrupt.name, paths[3].name}
    log = caplog.text
    assert corrupt.name in log and paths[3].name in log and "missing field" in log

    ds = D.ShardDataset(root, D.CLIP_FIELDS, text_len=8, on_error="fail")
    with pytest.raises(AvatarForcingError, match=corrupt.name):
        ds.get(1)
    with pytest.raises(AvatarForcingError, match=f"{paths[3].name}.*missing field"):
        ds.get(3)


def test_batch_stream_is_deterministic_and_splits_ranks(tmp_path, cfg):
    write_clip_samples(cfg, tmp_path / "shards", 6)
    ds = D.ShardDataset(tmp_path / "shards", D.CLIP_FIELDS, text_len=8)
    a0, a1 = D.BatchStream(ds, 1, rank=0, world=2, seed=3), D.BatchStream(ds, 1, rank=1, world=2, seed=3)
    seen = [(a0.indices(p), a1.indices(p)) for p in range(6)]
    for i0, i1 in seen[:3]:                                                # one epoch: disjoint, complete
        assert not set(i0) & set(i1)
    assert sorted(sum((i0 + i1 for i0, i1 in seen[:3]), [])) == list(range(6))
    b = D.BatchStream(ds, 1, rank=0, world=2, seed=3)
    b.load_state_dict({"position": 4})
    assert b.indices(b.position) == seen[4][0] and int(b.next()["index"][0]) == seen[4][0][0]
    with pytest.raises(AvatarForcingError, match="fewer than batch_size"):
        D.BatchStream(ds, 4, world=2)
