"""`hassod index build --ray` (indexer/distributed.py) on a local 2-CPU Ray cluster started by the tests."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from indexer import distributed
from indexer.build import CatalogWriter, build_index
from indexer.catalog import Catalog
from indexer.index import Index
from retrieval.cli import app
from retrieval.searcher import Searcher
from tests.indexer.test_build import _catalog_dump

ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs on 127.0.0.1, no dashboard; shut down after the module."""
    # Ray binds to the machine's address unless told, before it is imported, that this is a laptop-style
    # cluster: then to 127.0.0.1
    previous = os.environ.get(LOOPBACK)
    os.environ[LOOPBACK] = "0"
    try:
        ray = pytest.importorskip("ray")
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
        assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
        yield ray
    finally:
        ray.shutdown()
        if previous is None:
            os.environ.pop(LOOPBACK, None)
        else:
            os.environ[LOOPBACK] = previous


def coco_parts(truth: str):
    """Regions from the scenes' true regions, described with the offline backbone on the CPU."""
    from hassod.features import build_backbone
    from indexer.descriptors import RegionDescriber
    from indexer.regions import CocoRegions

    return CocoRegions(truth), RegionDescriber(build_backbone("efficientnet_lite0", device="cpu"))


class _DiesOnce:
    """A region source whose first call kills its actor's process (once per marker file)."""

    def __init__(self, source, marker: str):
        self.source, self.marker = source, Path(marker)
        self.identity, self.query_settings, self.recipe = source.identity, source.query_settings, source.recipe

    def regions(self, paths):
        if not self.marker.exists() and self.marker.parent.exists():
            self.marker.touch()
            os._exit(1)  # the actor dies mid-batch, as on a lost node
        return self.source.regions(paths)


def dying_parts(truth: str, marker: str):
    source, describer = coco_parts(truth)
    return _DiesOnce(source, marker), describer


def _ray_build(folder: Path, truth: Path, index_dir: Path | Index, **kwargs):
    return distributed.build_index_ray(sorted(folder.glob("*.png")), index_dir, functools.partial(coco_parts, str(truth)),
                                       actors=2, show_progress=False, **kwargs)


def _top(searcher: Searcher, scenes, folder: Path) -> list[list[tuple]]:
    """Top 5 (file, box) of a query with every object's box in its first holder."""
    tops = []
    for obj in sorted({o for s in scenes for o in s.objects}):
        first = next(i for i, s in enumerate(scenes) if obj in s.objects)
        matches = searcher.search(folder / f"scene_{first:02d}.png", box=scenes[first].boxes[scenes[first].objects.index(obj)], k=5)
        tops.append([(Path(m.path).name, tuple(round(v, 1) for v in m.box)) for m in matches])
    return tops


def test_ray_build_matches_a_single_process_build(tmp_path, ray_cluster, instance_folder, instance_scenes,
                                                  offline_backbone, postgres_url):
    folder, truth = instance_folder
    local = build_index(sorted(folder.glob("*.png")), tmp_path / "local", *coco_parts(str(truth)),
                        index_type="flat", show_progress=False)
    # catalog on PostgreSQL; shards of 3 images after a 30-vector training sample, merged at the end
    summary = _ray_build(folder, truth, Index(tmp_path / "ray", postgres_url), shard_images=3, train_sample=30)
    assert summary.added == local.added == 8 and summary.regions == local.regions
    assert _catalog_dump(Index(tmp_path / "ray").catalog_url) == _catalog_dump(Index(tmp_path / "local").catalog_url)
    ray_search = Searcher(tmp_path / "ray", backbone=offline_backbone)
    assert ray_search.store.kind == "ondisk" and list((tmp_path / "ray").glob("vectors.*.ivfdata"))
    with Catalog(Index(tmp_path / "ray").catalog_url) as catalog:
        np.testing.assert_array_equal(ray_search.store.ids(), catalog.region_ids())
    # the collection is one IVF list (too few vectors for more): the search is exact, as flat's
    assert _top(ray_search, instance_scenes, folder) == _top(Searcher(tmp_path / "local", backbone=offline_backbone),
                                                             instance_scenes, folder)


def test_an_interrupted_ray_build_resumes_without_duplicates_despite_a_killed_actor(tmp_path, ray_cluster, instance_folder, instance_scenes,
                                                             monkeypatch):
    folder, truth = instance_folder
    index_dir = tmp_path / "index"
    real_add, added = CatalogWriter.add, []

    def killed_after_six(writer, state, described):
        if len(added) == 6:
            raise KeyboardInterrupt  # the driver dies: no clean-up beyond the lock
        real_add(writer, state, described)
        added.append(described.path)

    monkeypatch.setattr(CatalogWriter, "add", killed_after_six)
    with pytest.raises(KeyboardInterrupt):  # four images per catalog transaction, however long they take
        _ray_build(folder, truth, index_dir, shard_images=2, train_sample=10, commit_images=4,
                   commit_seconds=float("inf"))
    monkeypatch.undo()
    shards = list((index_dir / "shards").glob("shard-*.index"))
    assert shards  # written by the killed build: all their images committed
    with Catalog(Index(index_dir).catalog_url) as catalog:
        assert len(catalog.images()) == 4  # the first batch; the next two images were waiting for theirs

    # the re-run loses an actor too (its process dies mid-batch): Ray replaces it and retries the batch
    marker = tmp_path / "died"
    summary = distributed.build_index_ray(sorted(folder.glob("*.png")), index_dir,
                                          functools.partial(dying_parts, str(truth), str(marker)), actors=2,
                                          show_progress=False, shard_images=2, train_sample=10)
    assert marker.exists()
    assert summary.added == 4 and summary.unchanged + summary.updated == 4
    assert not list((index_dir / "shards").glob("*"))
    with Catalog(Index(index_dir).catalog_url) as catalog:
        assert sorted(Path(i.path).name for i in catalog.images()) == [f"scene_{i:02d}.png" for i in range(8)]
        region_ids = catalog.region_ids()
    assert len(region_ids) == sum(len(s.masks) for s in instance_scenes)  # no region twice
    from indexer.vectors import VectorStore

    stored = VectorStore.load(index_dir / "vectors.faiss")
    np.testing.assert_array_equal(stored.ids(), region_ids)  # every region once, with its vector
    # through the command line, on the running cluster: nothing left to do
    result = CliRunner().invoke(app, ["index", "build", str(folder), "--index", str(index_dir), "--regions", str(truth),
                                      "--device", "cpu", "--ray", "auto", "--actors", "2", "--shard-images", "2",
                                      "--train-sample", "10", "--json"])
    assert result.exit_code == 0, result.output
    again = json.loads(result.stdout)
    assert again["unchanged"] == 8 and again["added"] == again["updated"] == 0


def test_a_multi_node_cluster_needs_postgresql():
    class TwoNodes:
        @staticmethod
        def nodes():
            return [{"Alive": True}, {"Alive": True}, {"Alive": False}]

    with pytest.raises(distributed.DistributedBuildError, match="2 nodes: the catalog must be PostgreSQL"):
        distributed._check_cluster(TwoNodes, "sqlite:///x.sqlite")
    distributed._check_cluster(TwoNodes, "postgresql+psycopg://u@/db")


def test_a_build_without_ray_never_imports_it(tmp_path, instance_folder, instance_scenes, offline_backbone):
    """Also the single-process on-disk build through the command line: its --json summary alone on stdout
    (faiss prints when it grows a lists file), its index searched as any other."""
    folder, truth = instance_folder
    code = ("import atexit, runpy, sys; atexit.register(lambda: print('ray' in sys.modules, file=sys.stderr)); "
            "runpy.run_module('retrieval.cli', run_name='__main__')")
    command = [sys.executable, "-c", code, "index", "build", str(folder), "--index", str(tmp_path / "index"),
               "--regions", str(truth), "--device", "cpu", "--index-type", "ondisk", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == "False"  # ray was never imported
    assert json.loads(done.stdout)["added"] == 8
    assert len(list((tmp_path / "index").glob("vectors.*.ivfdata"))) == 1
    stats = CliRunner().invoke(app, ["index", "stats", str(tmp_path / "index")])
    assert stats.exit_code == 0 and "ondisk index" in stats.output and "(memory-mapped)" in stats.output
    searcher = Searcher(tmp_path / "index", backbone=offline_backbone)
    assert searcher.store.kind == "ondisk"
    with Catalog(Index(tmp_path / "index").catalog_url) as catalog:
        np.testing.assert_array_equal(searcher.store.ids(), catalog.region_ids())
    top = searcher.search(folder / "scene_03.png", box=instance_scenes[3].boxes[0], k=1)[0]
    assert top.path.endswith("scene_03.png") and top.score > 0.99

