"""`extract --shard I/N`: job-array shards compute their share of chunks side by side; the last one
(or a plain extract) assembles the same file a single process writes."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_folder, run_cli
from pipeline.cli.shared import report_extraction
from pipeline.errors import UserError
from pipeline.extract import ExtractRequest, RunOptions, extract, plan
from pipeline.features.store import FeatureFile


def req(data) -> ExtractRequest:
    return ExtractRequest(data=str(data), backbone="vgg16", weights="none", image_size=32)


def opts(cache, **kw) -> RunOptions:
    return RunOptions(cache_dir=cache, progress=False, chunk_units=4, batch_size=4, **kw)


def test_two_shards_assemble_the_single_process_file(tmp_path):
    data = make_folder(tmp_path / "d", per_class=5, splits=())       # 10 images: chunks 0, 1, 2
    single = extract(req(data), opts(tmp_path / "one"))
    cache = tmp_path / "c"
    first = extract(req(data), opts(cache, shard=(0, 2)))
    assert first.missing_chunks == [1] and first.computed == 6 and not first.path.exists()
    with pytest.raises(UserError, match=r"chunks are missing \(1\).*shard\(s\) 1/2"):
        extract(req(data), opts(cache))                                # a plain extract says what is missing
    with pytest.raises(UserError, match="already split into 2 shards"):
        extract(req(data), opts(cache, shard=(0, 3)))
    again = extract(req(data), opts(cache, shard=(0, 2)))              # a rerun of a finished shard: no work
    assert again.computed == 0 and again.missing_chunks == [1]
    last = extract(req(data), opts(cache, shard=(1, 2)))
    assert last.computed == 4 and last.n_rows == 10 and last.path.exists()
    assert not plan(req(data), cache).parts.exists()
    with FeatureFile(single.path) as a, FeatureFile(last.path) as b:
        assert a.paths == b.paths and list(a.splits) == list(b.splits)
        np.testing.assert_array_equal(b.load(), a.load())              # byte-identical features
    assert extract(req(data), opts(cache)).cache_hit

    other = tmp_path / "c2"                                            # what the error message suggests:
    extract(req(data), opts(other, shard=(1, 3)))                      # --shard 0/1 finishes any split
    here = extract(req(data), opts(other, shard=(0, 1)))
    assert here.computed == 6 and here.n_rows == 10


def test_a_copy_of_a_shard_that_waited_for_the_other_stops_when_that_one_finished_the_file(tmp_path, monkeypatch):
    """The same shard run twice at once: the second waits for the first's lock; where the first
    finished the file meanwhile, the second computed its chunks all over again."""
    import contextlib

    import pipeline.extract.distributor as dist

    data = make_folder(tmp_path / "d", per_class=5, splits=())
    cache = tmp_path / "c"
    extract(req(data), opts(cache, shard=(0, 2)))
    real, raced = dist.exclusive_lock, []

    @contextlib.contextmanager
    def other_copy_first(path, on_wait=None):
        if ".shard-1-of-2" in str(path) and not raced:  # while this copy waits, the other one runs to the end
            raced.append(None)
            raced[0] = extract(req(data), opts(cache, shard=(1, 2)))
        with real(path, on_wait) as got:
            yield got

    monkeypatch.setattr(dist, "exclusive_lock", other_copy_first)
    second = extract(req(data), opts(cache, shard=(1, 2)))
    assert raced[0].n_rows == 10 and second.cache_hit and not second.computed
    assert not plan(req(data), cache).parts.exists()  # no partial left beside the finished file


def test_shards_that_saw_other_files_and_a_shard_with_no_chunk_are_said(tmp_path):
    """A file touched between two shards of one job gives the second another key: it starts a new job
    that will never join the first, silently; and --shard 9/10 of a job of 3 chunks computed nothing."""
    import os
    import warnings

    from pipeline.errors import DataWarning

    data = make_folder(tmp_path / "d", per_class=5, splits=())
    cache = tmp_path / "c"
    extract(req(data), opts(cache, shard=(0, 2)))
    os.utime(next(data.rglob("*.jpg")), (1, 1))
    with pytest.warns(DataWarning, match=r"a sharded extraction of this request on .* is unfinished under another "
                                         r"key .* the data changed since its shards ran"):
        extract(req(data), opts(cache, shard=(1, 2)))
    other = make_folder(tmp_path / "other", per_class=5, splits=())  # another data set in the same cache: no word
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        extract(req(other), opts(cache, shard=(0, 2)))
    with pytest.warns(DataWarning, match=r"shard 9/10 has no chunk to compute: this job has 3 chunk"):
        extract(req(data), opts(tmp_path / "c2", shard=(9, 10)))


def test_shard_0_of_1_leaves_running_shards_their_chunks_and_a_shard_waits_for_a_running_0_of_1(tmp_path, monkeypatch, capsys):
    """`--shard 0/1` (every missing chunk) run while other shards run computed their chunks a second
    time; a shard started while a 0/1 runs did the same with its own share."""
    import contextlib

    import pipeline.extract.distributor as dist
    from pipeline.locking import exclusive_lock

    data = make_folder(tmp_path / "d", per_class=5, splits=())       # 10 images: chunks 0, 1, 2 (4, 4, 2)
    cache = tmp_path / "c"
    p = plan(req(data), cache)
    extract(req(data), opts(cache, shard=(0, 3)))                      # chunk 0
    said = []
    with exclusive_lock(p.shard_lock(1, 3)) as held:                   # shard 1/3 is running now
        assert held
        mid = extract(req(data), opts(cache, shard=(0, 1)), log=said.append)
    assert mid.computed == 2 and mid.missing_chunks == [1] and mid.n_shards == 3 and not p.path.exists()
    assert "shard 1/3 is running: its 1 missing chunk(s) are left to it" in said
    import pipeline.extract.runner as runner
    real, calls = runner.ExtractionJob.running_shards, []
    with exclusive_lock(p.shard_lock(1, 3)):                           # running when 0/1 plans, gone when it ends
        monkeypatch.setattr(runner.ExtractionJob, "running_shards",
                            lambda job: calls.append(1) or (real(job) if len(calls) == 1 else []))
        said.clear()
        again = extract(req(data), opts(cache, shard=(0, 1)), log=said.append)
        monkeypatch.undo()
    assert again.missing_chunks == [1], said
    assert "shard(s) 1/3 stopped without finishing their chunks: run --shard 0/1 again to compute them here" in said
    report_extraction(mid)                                             # names the shard that owes the chunk
    assert "2 of 3 chunks present; waiting for shard(s) 1/3;" in capsys.readouterr().out
    last = extract(req(data), opts(cache, shard=(1, 3)))               # the running shard finishes: assembles
    assert last.computed == 4 and last.n_rows == 10

    other = tmp_path / "c2"                                            # a shard started while 0/1 runs waits
    q = plan(req(data), other)
    extract(req(data), opts(other, shard=(0, 3)))
    real, ran = dist.exclusive_lock, []

    @contextlib.contextmanager
    def zero_of_one_runs(path, on_wait=None):
        if path == q.shard_lock(0, 1) and on_wait is not None and not ran:  # it finishes while this shard waits
            on_wait()
            ran.append(None)
            ran[0] = extract(req(data), opts(other, shard=(0, 1)))
        with real(path, on_wait) as got:
            yield got

    monkeypatch.setattr(dist, "is_locked", lambda path: path == q.shard_lock(0, 1))
    monkeypatch.setattr(dist, "exclusive_lock", zero_of_one_runs)
    said.clear()
    waited = extract(req(data), opts(other, shard=(2, 3)), log=said.append)
    assert ran[0].computed == 6 and ran[0].n_rows == 10 and waited.cache_hit and not waited.computed
    assert any("--shard 0/1 of this request is running" in s for s in said)


def test_shard_cli(tmp_path):
    data = make_folder(tmp_path / "d", per_class=5, splits=())
    args = ["extract", "--data", str(data), "--backbone", "vgg16", "--weights", "none", "--image-size", "32",
            "--no-progress", "--chunk-size", "4", "--cache-dir", str(tmp_path / "c")]
    bad = run_cli(*args, "--shard", "2/2")
    assert bad.returncode == 2 and "0 <= I < N" in bad.stderr
    s0 = run_cli(*args, "--shard", "0/2")
    assert s0.returncode == 0, s0.stderr
    assert "shard 0/2: computed 6" in s0.stdout and "waiting for shard(s) 1/2" in s0.stdout
    plain = run_cli(*args)
    assert plain.returncode == 2 and "--shard" in plain.stderr and len(plain.stderr.strip().splitlines()) == 1
    s1 = run_cli(*args, "--shard", "1/2", "--chunk-size", "8")  # the chunks are cut already: said, not refused
    assert s1.returncode == 0 and "wrote" in s1.stdout and "10 rows" in s1.stdout, s1.stdout + s1.stderr
    assert "cuts chunks of 4 images, so --chunk-size 8 is not used" in s1.stdout + s1.stderr


def test_shards_hash_only_their_own_images(tmp_path, monkeypatch):
    """--content-hash with shards: each shard hashes the images of its own chunks (not the whole data
    set once per shard) and leaves a note in `.parts`; the shard that assembles takes the others'
    notes, so every file is hashed once in all, and the file holds every hash."""
    import pipeline.features.reuse as reuse
    data = make_folder(tmp_path / "d", per_class=5, splits=())       # 10 images: chunks 0, 1, 2
    single = extract(req(data), opts(tmp_path / "one", content_hash=True))
    hashed = []
    real = reuse._sha256
    monkeypatch.setattr(reuse, "_sha256", lambda path: hashed.append(path) or real(path))
    extract(req(data), opts(tmp_path / "c", shard=(0, 2)))
    assert hashed == []                                                # no --content-hash: nothing read
    first = extract(req(data), opts(tmp_path / "h", shard=(0, 2), content_hash=True))
    assert len(hashed) == 6 and first.missing_chunks == [1]            # chunks 0 and 2: 6 images
    last = extract(req(data), opts(tmp_path / "h", shard=(1, 2), content_hash=True))
    assert len(hashed) == 6 + 4 and last.path.exists()                 # its 4; the other 6 from shard 0's note
    with FeatureFile(single.path) as a, FeatureFile(last.path) as b:
        assert list(a._f["hashes"].asstr()[:]) == list(b._f["hashes"].asstr()[:]) and "" not in list(b._f["hashes"].asstr()[:])


def test_every_distributor_runs_behind_the_same_guard(tmp_path):
    """`extract(..., distributor=)` (how --ray plugs in): the distributor is called only on a miss,
    under the key's lock, inside a run record naming it, and a full disk in it is one UserError line."""
    import errno

    from pipeline.extract import local
    from pipeline.locking import is_locked
    from pipeline.tracking.runs import Registry

    data = make_folder(tmp_path / "d", per_class=2, splits=())
    calls = []

    def mine(p, options, log):
        calls.append(is_locked(p.lock))
        return local(p, options, log)

    first = extract(req(data), opts(tmp_path / "c"), distributor=mine)
    assert calls == [True] and first.n_rows == 4 and first.distributor == "local"
    assert Registry(tmp_path / "c").get(first.run_id).metrics["distributor"] == "local"
    assert extract(req(data), opts(tmp_path / "c"), distributor=mine).cache_hit and calls == [True]

    def full(p, options, log):
        raise OSError(errno.ENOSPC, "No space left on device", str(p.parts / "chunk-000000.npz"))

    with pytest.raises(UserError, match="no space left on the disk holding .*finished chunks are kept"):
        extract(req(data), opts(tmp_path / "e"), distributor=full)
