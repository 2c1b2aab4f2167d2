"""`extract --ray`: chunks computed by Ray actors on a local cluster (and on a two-node cluster) give
byte-identical features to a single process; a killed worker or driver loses nothing."""

from __future__ import annotations

import numpy as np
import pytest

# each command in a process of its own: Ray's client lives in the process that started it
from conftest import make_folder, run_cli_isolated as run_cli
from pipeline.extract import ExtractRequest, RunOptions, extract, plan
from pipeline.features.store import FeatureFile

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")


def req(data) -> ExtractRequest:
    return ExtractRequest(data=str(data), backbone="vgg16", weights="none", image_size=32)


def opts(cache, **kw) -> RunOptions:
    return RunOptions(cache_dir=cache, progress=False, chunk_units=4, batch_size=4, **kw)


@pytest.fixture(scope="module")
def data_and_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    data = make_folder(root / "d", per_class=10, splits=())          # 20 images: 5 chunks of 4
    with FeatureFile(extract(req(data), opts(root / "single")).path) as ff:
        return data, ff.load(dtype=ff.features.dtype), list(ff.paths)


@pytest.fixture(scope="module")
def local_ray():
    # address="local": a new cluster even while another test worker has one up (it would join that one)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _same(path, reference) -> None:
    expected, paths = reference
    with FeatureFile(path) as ff:
        assert list(ff.paths) == paths
        np.testing.assert_array_equal(ff.load(dtype=ff.features.dtype), expected)


def test_local_cluster_byte_identical_and_a_killed_worker_is_replaced(data_and_reference, local_ray, tmp_path):
    from pipeline.extract.ray_distributor import extract_ray
    data, *reference = data_and_reference
    said: list[str] = []
    result = extract_ray(req(data), opts(tmp_path / "a"), n_workers=2, log=said.append)
    assert result.n_rows == 20 and result.computed == 20
    _same(result.path, reference)
    with FeatureFile(result.path) as ff:  # the Ray run's time and rate, not the driver's assembly (0.0 s, none)
        assert ff.attrs["extract_seconds"] >= round(result.seconds, 3) > 0 and ff.attrs["images_per_s"] > 0
    assert not [line for line in said if line.startswith("resuming")], said  # a fresh run resumes nothing

    killed = []

    def kill_one(n_done, actors):
        if n_done == 1 and not killed:
            ray.kill(actors[0])
            killed.append(True)

    logs: list[str] = []
    again = extract_ray(req(data), opts(tmp_path / "b"), n_workers=2, on_chunk=kill_one, log=logs.append)
    assert killed and again.n_rows == 20
    _same(again.path, reference)


def test_chunks_sent_back_to_the_driver_without_a_shared_folder(data_and_reference, local_ray, tmp_path):
    """transport='driver' (what an actor that does not see the driver's probe file does): it computes
    into a node-local folder and returns each chunk's bytes; the driver writes them, and the file is
    byte-identical. 'auto' on one machine sees the probe and writes to the shared folder."""
    from pipeline.extract.ray_distributor import _ChunkWorker, _sees, extract_ray
    data, *reference = data_and_reference
    result = extract_ray(req(data), opts(tmp_path / "d"), n_workers=2, transport="driver")
    assert result.n_rows == 20 and result.computed == 20
    _same(result.path, reference)
    p = plan(req(data), tmp_path / "d")
    assert not list(p.parts.glob("ray-probe-*")) if p.parts.exists() else True  # the probe is removed
    probe = tmp_path / "probe"
    probe.write_text("token")
    assert _sees((str(probe), "token")) and not _sees((str(probe), "other")) and not _sees((str(tmp_path / "no"), "t"))
    local = _ChunkWorker(req(data).to_json(), {**opts(tmp_path / "e").__dict__, "cache_dir": str(tmp_path / "e")},
                         plan(req(data), tmp_path / "e").key, str(tmp_path), (str(tmp_path / "no"), "t"))
    assert local.local.is_dir() and not any(local.local.iterdir())  # only its private, empty folder
    assert oct(local.local.stat().st_mode & 0o777) == "0o700"
    chunks, n, payload = local.compute([1])
    assert not any(local.local.iterdir())  # no chunk data stays after its chunk
    assert chunks == [1] and n == 4 and set(payload) == {1} and payload[1][:2] == b"PK"  # an .npz (zip)
    assert not local.job.p.parts.is_relative_to(tmp_path / "e")  # computed outside the driver's cache
    folder = local.local
    local.close()
    assert not folder.exists()  # removed when the driver is done with the actor


def test_a_killed_driver_resumes(data_and_reference, local_ray, tmp_path):
    from pipeline.extract.ray_distributor import extract_ray
    data, *reference = data_and_reference

    def die(n_done, actors):
        if n_done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_ray(req(data), opts(tmp_path / "c"), n_workers=1, on_chunk=die)
    p = plan(req(data), tmp_path / "c")
    assert not p.path.exists() and len(list(p.parts.glob("chunk-*.npz"))) >= 2
    resumed = extract_ray(req(data), opts(tmp_path / "c"), n_workers=1)
    assert resumed.computed <= 12 and resumed.n_rows == 20
    _same(resumed.path, reference)
    assert extract_ray(req(data), opts(tmp_path / "c")).cache_hit


def test_two_node_cluster(data_and_reference, tmp_path):
    from ray.cluster_utils import Cluster

    from pipeline.extract.ray_distributor import extract_ray
    data, *reference = data_and_reference
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        result = extract_ray(req(data), opts(tmp_path / "d"), address=cluster.address, n_workers=2)
        assert result.n_rows == 20
        _same(result.path, reference)
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_cli_ray_flag_and_errors(tmp_path):
    data = make_folder(tmp_path / "d", per_class=3, splits=())
    args = ["extract", "--data", str(data), "--backbone", "vgg16", "--weights", "none", "--image-size", "32",
            "--no-progress", "--cache-dir", str(tmp_path / "c")]
    both = run_cli(*args, "--ray", "--shard", "0/2")
    assert both.returncode == 2 and "use one" in both.stderr
    ok = run_cli(*args, "--ray", "--workers", "1")
    assert ok.returncode == 0 and "ray: 1 worker(s)" in ok.stderr and "6 rows" in ok.stdout, ok.stderr


def test_folders_of_dead_actors_are_swept(tmp_path):
    """An actor killed mid-chunk leaves its node-local folder; the next actor on the node removes
    folders of this host's processes that no longer run, and nothing else."""
    import os
    import subprocess
    import sys

    from pipeline.extract.ray_distributor import _host, _sweep_dead_actor_folders
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = _host()
    dead = tmp_path / f"featurecache-ray-{gone.stdout.strip()}-{host}-x1"
    alive = tmp_path / f"featurecache-ray-{os.getpid()}-{host}-x2"
    elsewhere = tmp_path / f"featurecache-ray-{gone.stdout.strip()}-otherhost-x3"  # a /tmp shared with another host
    odd = [tmp_path / "featurecache-ray-notapid-x4", tmp_path / f"featurecache-ray-{10**30}-{host}-x5"]
    for folder in (dead, alive, elsewhere, *odd):
        (folder / "a.parts").mkdir(parents=True)
    _sweep_dead_actor_folders(tmp_path)
    assert not dead.exists() and alive.exists() and elsewhere.exists() and all(f.exists() for f in odd)


def test_an_unreachable_cluster_is_one_line(tmp_path, monkeypatch, capfd):
    """Ray's C++ client prints each failed connection retry to fd 2; only our error line is left."""
    import os

    from pipeline.errors import UserError
    from pipeline.extract import ray_distributor as distributed

    def failing_init(**kwargs):
        os.write(2, b"gcs_client.cc:210: Failed to get cluster ID from GCS server\n" * 20)
        raise ConnectionError("Failed to connect to Ray cluster at 192.0.2.1:6379")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", failing_init)
    monkeypatch.setattr(distributed, "_check_reachable", lambda address: None)  # as if the port answered
    with pytest.raises(UserError, match="could not reach a Ray cluster at '192.0.2.1:6379'"):
        distributed._run_on_ray(ray, None, opts(tmp_path / "c"), [0], "192.0.2.1:6379", None, print, None)
    assert "gcs_client" not in capfd.readouterr().err


def test_an_address_nothing_listens_on_fails_in_seconds(tmp_path, monkeypatch):
    """ray.init retries a dead address for minutes; the port check answers before it is called."""
    import socket
    import time

    from pipeline.errors import UserError
    from pipeline.extract import ray_distributor as distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nothing listens there
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: pytest.fail("ray.init was called"))
    t = time.perf_counter()
    with pytest.raises(UserError, match=f"could not reach a Ray cluster at '127.0.0.1:{port}'"):
        distributed._run_on_ray(ray, None, opts(tmp_path / "c"), [0], f"127.0.0.1:{port}", None, print, None)
    assert time.perf_counter() - t < 5
    with pytest.raises(UserError, match="--ray takes host:port"):
        distributed._check_reachable("no-port-here")
