"""latent_prior.cache: the shard writer, the manifest, and the streaming reader `open_latents`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from latent_prior.cache import FORMAT_VERSION, CacheWriter, EncodedLatents, LatentSource, open_latents, shard_name
from latent_prior.errors import LatentPriorError
from latent_prior.vae import LatentNormalization

SHAPE = (2, 3, 3)


def _indexed(n: int, offset: float = 0.0) -> torch.Tensor:
    """(n, *SHAPE) latents whose every value is the item index (+ offset): batches reveal their items."""
    return (torch.arange(n, dtype=torch.float32) + offset).view(n, 1, 1, 1).expand(n, *SHAPE).contiguous()


def _writer(out, files, shard_size=4, flip=False, deterministic=False, **identity):
    return CacheWriter(
        out,
        files=files,
        shard_size=shard_size,
        identity={"resolution": 32, **identity},
        latent_shape=SHAPE,
        deterministic=deterministic,
        flip=flip,
    )


def _write_cache(out, n=10, shard_size=4, flip=False, skip=(), world_size=1):
    """A complete cache of n planned files; the files in `skip` are recorded as skipped."""
    files = [f"d/img{i:02d}.png" for i in range(n)]
    writer = _writer(out, files, shard_size, flip)
    writer.prepare()
    kept = 0
    for k in range(writer.num_chunks):
        names = [f for f in writer.chunk_files(k) if f not in skip]
        rows = _indexed(len(names), kept)
        kwargs = dict(mean=rows, logvar=-rows)
        if flip:
            kwargs.update(mean_flip=rows + 1000, logvar_flip=-rows - 1000)
        writer.write_shard(
            k,
            files=names,
            skipped=[{"path": f, "reason": "OSError: bad"} for f in skip if f in writer.chunk_files(k)],
            rank=k % world_size,
            world_size=world_size,
            **kwargs,
        )
        kept += len(names)
    manifest = writer.finalize({"vae": {"source": "test"}, "normalization": {"scaling_factor": 0.5, "shift_factor": 0.1}})
    return writer, manifest


def _item_ids(batch_mean: torch.Tensor) -> list[int]:
    return batch_mean[:, 0, 0, 0].round().long().tolist()


# ---- writing ------------------------------------------------------------------------------------
def test_cache_round_trip_with_manifest_and_sources(tmp_path):
    out = tmp_path / "cache"
    writer, manifest = _write_cache(out, n=10, shard_size=4, skip=("d/img05.png",))
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, "plan.json", *[shard_name(k) for k in range(3)]]
    assert manifest["format_version"] == FORMAT_VERSION and manifest["count"] == 9
    assert [s["count"] for s in manifest["shards"]] == [4, 3, 2]
    assert manifest["skipped"] == [{"path": "d/img05.png", "reason": "OSError: bad"}]
    assert json.loads((out / MANIFEST_NAME).read_text()) == manifest

    source = open_latents(out)
    assert isinstance(source, LatentSource) and len(source) == 9
    assert source.latent_shape == SHAPE and not source.deterministic
    assert source.normalization == LatentNormalization(scaling_factor=0.5, shift_factor=0.1)
    assert source.provenance == {"source": "test"}
    mean, logvar = source.read([8, 0, 4, 4])
    assert _item_ids(mean) == [8, 0, 4, 4] and torch.equal(logvar, -mean)
    assert source.sources([4, 5]) == ["d/img04.png", "d/img06.png"]  # img05 was skipped
    assert len(source.sources()) == 9
    with pytest.raises(LatentPriorError, match="out of range"):
        source.read([9])


MANIFEST_NAME = "manifest.json"


def test_flip_copies_are_extra_items_when_asked(tmp_path):
    out = tmp_path / "cache"
    _write_cache(out, n=6, shard_size=4, flip=True)
    plain = open_latents(out)
    assert len(plain) == 6 and plain.has_flips
    flips = open_latents(out, include_flips=True)
    assert len(flips) == 12
    mean, logvar = flips.read([0, 6, 11])
    assert _item_ids(mean) == [0, 1000, 1005]  # item N + i is the flip of item i
    assert flips.sources([1, 7]) == ["d/img01.png", "d/img01.png"]
    assert sorted(_item_ids(torch.cat([m for m, _ in flips.iter_moments(5, seed=3)]))) == list(range(6)) + list(range(1000, 1006))
    _write_cache(tmp_path / "noflip", n=3)
    with pytest.raises(LatentPriorError, match="no flip copies"):
        open_latents(tmp_path / "noflip", include_flips=True)


def test_writer_refuses_a_different_identity(tmp_path):
    out = tmp_path / "cache"
    files = [f"{i}.png" for i in range(5)]
    _writer(out, files).prepare()
    _writer(out, files).check_compatible()  # same identity: fine
    with pytest.raises(LatentPriorError, match=r"resolution 32 then, 64 now.*same settings.*new --out"):
        _writer(out, files, resolution=64).check_compatible()
    with pytest.raises(LatentPriorError, match=r"image list changed \(5 files then, 4 now\)"):
        _writer(out, files[:4]).check_compatible()
    with pytest.raises(LatentPriorError, match="another VAE"):
        _writer(out, files, vae={"fingerprint": "b"}).check_compatible()
    with pytest.raises(LatentPriorError, match="shard_size 4 then, 2 now"):
        _writer(out, files, shard_size=2).check_compatible()


def test_prepare_cleans_tmp_leftovers_and_refuses_orphan_shards(tmp_path):
    out = tmp_path / "cache"
    out.mkdir()
    (out / ".shard-00001.safetensors.tmp").write_bytes(b"half a shard")
    writer = _writer(out, ["a.png", "b.png"], shard_size=1)
    writer.prepare()
    assert not list(out.glob(".*.tmp")) and (out / "plan.json").exists()
    assert writer.pending_chunks() == [0, 1] and writer.pending_chunks(rank=1, world_size=2) == [1]

    orphan = tmp_path / "orphan"
    orphan.mkdir()
    save_file({"mean": torch.zeros(1, *SHAPE)}, str(orphan / shard_name(0)))
    with pytest.raises(LatentPriorError, match="shards but no plan.json"):
        _writer(orphan, ["a.png"]).check_compatible()


def test_a_shard_that_does_not_match_the_plan_is_pending_again(tmp_path):
    out = tmp_path / "cache"
    writer, _ = _write_cache(out, n=6, shard_size=3)
    assert writer.pending_chunks() == []
    save_file({"mean": torch.zeros(3, *SHAPE)}, str(out / shard_name(1)))  # foreign file, no metadata
    assert writer.shard_problem(1) == "written by another plan"
    (out / shard_name(0)).unlink()
    assert writer.pending_chunks() == [0, 1]
    with pytest.raises(ValueError, match="expected"):
        writer.write_shard(0, files=["d/img00.png"], mean=torch.zeros(2, *SHAPE), logvar=torch.zeros(2, *SHAPE))


def test_incomplete_newer_and_broken_caches_are_refused(tmp_path):
    out = tmp_path / "cache"
    _write_cache(out, n=5, shard_size=2)
    manifest = json.loads((out / MANIFEST_NAME).read_text())

    (out / shard_name(1)).rename(tmp_path / "moved")
    with pytest.raises(LatentPriorError, match=r"missing shard-00001.safetensors.*rerun `latent-prior encode`"):
        open_latents(out)
    (tmp_path / "moved").rename(out / shard_name(1))

    (out / MANIFEST_NAME).write_text(json.dumps({**manifest, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(LatentPriorError, match="newer.*upgrade latent-prior"):
        open_latents(out)
    (out / MANIFEST_NAME).write_text(json.dumps({**manifest, "format_version": "one"}))
    with pytest.raises(LatentPriorError, match="format_version"):
        open_latents(out)

    (out / MANIFEST_NAME).unlink()
    with pytest.raises(LatentPriorError, match=r"incomplete.*rerun `latent-prior encode` with the same arguments to resume"):
        open_latents(out)
    (out / "plan.json").unlink()
    with pytest.raises(LatentPriorError, match="not a latent cache"):
        open_latents(out)
    with pytest.raises(LatentPriorError, match="no such cache"):
        open_latents(tmp_path / "missing")


# ---- bare .safetensors files ----------------------------------------------------------------------
def test_bare_file_with_mean_only_is_deterministic_with_identity_normalization(tmp_path):
    path = tmp_path / "z.safetensors"
    save_file({"mean": _indexed(7)}, str(path))
    source = open_latents(path)
    assert len(source) == 7 and source.deterministic and source.provenance is None
    assert source.normalization == LatentNormalization()
    mean, logvar = source.read([6, 1])
    assert logvar is None and _item_ids(mean) == [6, 1]
    assert source.sources() is None


def test_bare_file_errors_name_the_file_and_keys(tmp_path):
    path = tmp_path / "latents.safetensors"
    save_file({"latents": torch.zeros(3, *SHAPE), "labels": torch.zeros(3)}, str(path))
    with pytest.raises(LatentPriorError, match=r"latents.safetensors: no `mean` tensor \(it holds labels, latents\)"):
        open_latents(path)
    save_file({"mean": torch.zeros(3, *SHAPE), "logvar": torch.zeros(3, 2, 3, 4)}, str(path))
    with pytest.raises(LatentPriorError, match=r"`logvar` has shape \(3, 2, 3, 4\) but `mean` has \(3, 2, 3, 3\)"):
        open_latents(path)
    path.write_bytes(b"garbage, not safetensors")
    with pytest.raises(LatentPriorError, match="not a readable .safetensors"):
        open_latents(path)


def test_nonfinite_values_are_counted_chunk_by_chunk(tmp_path):
    path = tmp_path / "z.safetensors"
    mean = _indexed(40)
    mean[17, 0, 1, 1] = float("nan")
    mean[17, 1, 0, 0] = float("inf")
    mean[33, 1, 2, 2] = float("-inf")
    logvar = torch.zeros_like(mean)
    save_file({"mean": mean, "logvar": logvar}, str(path))
    item_bytes = 2 * 4 * int(np.prod(SHAPE))
    # A 5-item buffer forces the scan through 8 separate reads; the count spans them.
    with pytest.raises(LatentPriorError, match=r"3 non-finite values \(NaN or inf\) in `mean`, first at item 17"):
        open_latents(path, buffer_bytes=5 * item_bytes)
    source = open_latents(path, check_finite=False)  # opt out, e.g. for a huge trusted cache
    assert len(source) == 40
    logvar[3, 0, 0, 0] = float("nan")
    save_file({"mean": _indexed(40), "logvar": logvar}, str(path))
    with pytest.raises(LatentPriorError, match=r"1 non-finite values .* `logvar`, first at item 3"):
        open_latents(path)


# ---- streaming ----------------------------------------------------------------------------------
@pytest.fixture
def big_source(tmp_path):
    """A 3-shard cache of 103 items (one skipped file) read through a 16-item buffer."""
    _write_cache(tmp_path / "cache", n=104, shard_size=40, skip=("d/img50.png",))
    item_bytes = 2 * 4 * int(np.prod(SHAPE))
    return open_latents(tmp_path / "cache", buffer_bytes=16 * item_bytes)


def test_iter_moments_two_ranks_cover_every_item_once_per_epoch(big_source):
    n = len(big_source)
    assert n == 103
    for epoch in range(2):
        per_rank = []
        for rank in range(2):
            batches = list(big_source.iter_moments(8, seed=5, epoch=epoch, rank=rank, world_size=2))
            assert all(m.dtype == torch.float32 and torch.equal(lv, -m) for m, lv in batches)
            assert all(len(m) == 8 for m, _ in batches[:-1])
            per_rank.append([i for m, _ in batches for i in _item_ids(m)])
        assert not set(per_rank[0]) & set(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == list(range(n))
        assert abs(len(per_rank[0]) - len(per_rank[1])) <= 1


def test_iter_moments_shuffles_deterministically_per_seed_and_epoch(big_source):
    def order(**kw):
        return [i for m, _ in big_source.iter_moments(10, **kw) for i in _item_ids(m)]

    assert order(seed=1, epoch=0) == order(seed=1, epoch=0)
    assert order(seed=1, epoch=0) != order(seed=1, epoch=1)
    assert order(seed=1, epoch=0) != order(seed=2, epoch=0)
    assert order(shuffle=False) == list(range(103))
    # A small buffer shuffles window by window: the first 16 items come from one 16-row block, and the
    # block order itself is shuffled. A buffer that holds the whole cache gives a full permutation.
    starts = {order(seed=s)[0] // 16 for s in range(8)}
    assert len(starts) >= 3
    whole = open_latents(big_source.path)
    first = [i for m, _ in whole.iter_moments(10, seed=1) for i in _item_ids(m)][:20]
    assert {i * 3 // 103 for i in first} == {0, 1, 2}


def test_iter_moments_indices_drop_last_and_with_indices(big_source):
    wanted = [3, 90, 41, 41, 7, 60, 61, 99]
    got = list(big_source.iter_moments(3, indices=wanted, shuffle=False, with_indices=True))
    ids = torch.cat([b[0] for b in got]).tolist()
    assert ids == sorted(set(wanted))
    assert all(_item_ids(m) == i.tolist() for i, m, _ in got)
    dropped = list(big_source.iter_moments(8, drop_last=True, world_size=2, rank=1))
    assert len(dropped) == 103 // 16 and all(len(m) == 8 for m, _ in dropped)
    with pytest.raises(LatentPriorError, match="rank"):
        next(big_source.iter_moments(4, rank=2, world_size=2))


def test_in_memory_latents_shard_like_the_cache_and_refuse_non_finite_values(big_source):
    mean, logvar = big_source.read(range(len(big_source)))
    memory = EncodedLatents(mean, logvar)
    for rank in range(2):  # unshuffled, both orders are 0..102, so both must give the same batches to each rank
        for drop_last in (False, True):
            ours = [_item_ids(m) for m, _ in memory.iter_moments(8, shuffle=False, rank=rank, world_size=2, drop_last=drop_last)]
            cache = [_item_ids(m) for m, _ in big_source.iter_moments(8, shuffle=False, rank=rank, world_size=2, drop_last=drop_last)]
            assert ours == cache
    broken = mean.clone()
    broken[17, 0, 0, 0] = float("nan")
    with pytest.raises(LatentPriorError, match=r"<mine>: 1 non-finite values \(NaN or inf\) in `mean`, first at item 17"):
        EncodedLatents(broken, description="<mine>")


def test_iter_moments_streams_in_bounded_reads(big_source, monkeypatch):
    """Every read is of at most one buffer's worth of rows, and each row is read once per epoch."""
    rows_read = []
    original = LatentSource._read_rows

    def spy(self, segment, rows):
        rows_read.append(len(rows))
        return original(self, segment, rows)

    monkeypatch.setattr(LatentSource, "_read_rows", spy)
    batches = list(big_source.iter_moments(4, seed=0))
    assert sum(len(m) for m, _ in batches) == 103
    assert max(rows_read) <= 16 and sum(rows_read) == 103 and len(rows_read) >= 7


def test_bare_file_streams_like_a_cache(tmp_path):
    path = tmp_path / "z.safetensors"
    save_file({"mean": _indexed(50), "mean_flip": _indexed(50, 1000)}, str(path))
    source = open_latents(path, include_flips=True, buffer_bytes=7 * 4 * int(np.prod(SHAPE)))
    assert len(source) == 100 and source.deterministic
    ids = sorted(i for m, lv in source.iter_moments(6, seed=2) for i in _item_ids(m))
    assert ids == list(range(50)) + list(range(1000, 1050))
