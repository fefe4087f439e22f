"""Stage-1 hierarchical merge: the fast heap algorithm against the quadratic oracle."""
from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hassod.discover.merge import hierarchical_merge  # noqa: E402
from hassod.images import load_rgb  # noqa: E402
from tests.oracles import colour_gradient_features, quadratic_merge, segment_features  # noqa: E402

DATA = ROOT / ".." / "shared" / "data"
PAPER = (0.4, 0.2, 0.1)


def assert_same(features: np.ndarray, thresholds) -> np.ndarray:
    fast = hierarchical_merge(features, thresholds)
    slow = quadratic_merge(features, thresholds)
    assert fast.dtype == np.int32 and fast.shape == slow.shape
    assert np.array_equal(fast, slow), (
        f"partitions differ for shape {features.shape}, thresholds {thresholds}: "
        f"fast {[len(np.unique(p)) for p in fast]} regions, oracle {[len(np.unique(p)) for p in slow]}"
    )
    return fast


def region_counts(partitions: np.ndarray) -> list[int]:
    return [int(p.max()) + 1 for p in partitions]


def test_random_grids_match_oracle():
    rng = np.random.default_rng(0)
    shapes = [(1, 1), (1, 9), (9, 1), (2, 2), (3, 5), (5, 3), (6, 6), (4, 9), (10, 10)]
    shapes += [tuple(int(v) for v in rng.integers(1, 12, size=2)) for _ in range(30)]
    merges = 0
    for i, (h, w) in enumerate(shapes):
        c = int(rng.choice([1, 2, 3, 8, 16]))
        features = rng.normal(size=(h, w, c)).astype(np.float32 if i % 2 else np.float64)
        thresholds = sorted(rng.uniform(-0.5, 0.9, size=int(rng.integers(1, 5))), reverse=True)
        fast = assert_same(features, thresholds)
        merges += h * w - region_counts(fast)[-1]
    # Low-dimensional random features have large cosines: plenty of merging.
    assert merges > 500


# Noise 1.5 at 20x20 grows large regions whose candidate heaps get compacted.
@pytest.mark.parametrize(
    "seed, size, channels, noise", [(1, 12, 32, 1.0), (3, 14, 24, 1.0), (0, 20, 64, 1.5), (2, 20, 64, 1.5)]
)
def test_structured_grids_match_oracle(seed, size, channels, noise):
    rng = np.random.default_rng(seed)
    features = segment_features(rng, size, size, channels, noise=noise)
    fast = assert_same(features, (0.6, 0.4, 0.2, 0.1, 0.0))
    counts = region_counts(fast)
    assert counts[1] <= size * size // 4  # most patches merged by 0.4
    assert counts[-1] < counts[0]


def test_duplicated_features_ties_match_oracle():
    # Patches drawn from 4 vectors: every merge of equal patches is an exact tie.
    rng = np.random.default_rng(4)
    palette = rng.normal(size=(4, 8))
    for trial in range(6):
        h, w = int(rng.integers(4, 11)), int(rng.integers(4, 11))
        features = palette[rng.integers(0, 4, size=(h, w))]
        assert_same(features, (0.999, 0.5, 0.0, -0.3))


def test_tie_break_prefers_smallest_pair():
    # sim(0,1) == sim(1,2) == 1/sqrt(2); after merging either pair the union's
    # cosine to the third patch is 1/sqrt(5) < 0.5, so the tie-break decides.
    features = np.array([[[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]])
    expected = np.array([[[0, 0, 1]]])
    assert np.array_equal(hierarchical_merge(features, [0.5]), expected)
    assert np.array_equal(quadratic_merge(features, [0.5]), expected)
    # Pairs (0,1) and (0,2) share their min id: the smaller max id wins.
    # Patch 3 is a zero vector: cosine 0 with everything.
    grid = np.array([[[1.0, 1.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 0.0]]])
    expected = np.array([[[0, 0], [1, 2]]])
    assert np.array_equal(hierarchical_merge(grid, [0.5]), expected)
    assert np.array_equal(quadratic_merge(grid, [0.5]), expected)


def test_similarities_within_rounding_quantum_are_ties():
    # sim(1,2) exceeds sim(0,1) by ~7e-14, below the 2**-32 rounding of
    # scores: a tie, so the smaller pair (0,1) is merged first.
    features = np.array([[[1.0, 0.0], [1.0, 1.0], [1e-13, 1.0]]])
    assert np.array_equal(hierarchical_merge(features, [0.5]), [[[0, 0, 1]]])
    assert np.array_equal(quadratic_merge(features, [0.5]), [[[0, 0, 1]]])


def _photo_features(name: str, grid: tuple[int, int]) -> np.ndarray:
    images = DATA / "coco128" / "images"
    if not images.is_dir():
        pytest.fail(f"test photos missing: expected {images.resolve()} (see /work/shared/data/README.md)")
    return colour_gradient_features(load_rgb(images / name), grid)


@pytest.mark.parametrize("name", ["000000000009.jpg", "000000000030.jpg", "000000000061.jpg"])
def test_real_photo_features_match_oracle(name):
    features = _photo_features(name, (18, 18))
    fast = assert_same(features, (0.8, 0.6, 0.4, 0.2))
    counts = region_counts(fast)
    assert counts[0] < 18 * 18 and counts[-1] < counts[0]


def _check_partition_properties(partitions: np.ndarray) -> None:
    counts = region_counts(partitions)
    assert counts == sorted(counts, reverse=True)
    for labels in partitions:
        k = int(labels.max()) + 1
        assert np.array_equal(np.unique(labels), np.arange(k))  # consecutive
        first = np.unique(labels.reshape(-1), return_index=True)[1]
        assert np.all(np.diff(first) > 0)  # numbered by first appearance
        for label in range(k):
            _, components = ndimage.label(labels == label)  # 4-connectivity
            assert components == 1, f"region {label} has {components} components"
    for fine, coarse in zip(partitions[:-1], partitions[1:]):
        pairs = np.unique(np.stack([fine.reshape(-1), coarse.reshape(-1)]), axis=1)
        assert pairs.shape[1] == int(fine.max()) + 1  # each fine region inside one coarse


@pytest.mark.parametrize("seed", [0, 1])
def test_partitions_are_connected_nested_and_coarsening(seed):
    rng = np.random.default_rng(seed)
    structured = segment_features(rng, 30, 40, 64, noise=1.5)
    _check_partition_properties(hierarchical_merge(structured, (0.5, 0.4, 0.3, 0.2, 0.1, 0.0)))
    noisy = rng.normal(size=(25, 20, 4))
    _check_partition_properties(hierarchical_merge(noisy, (0.9, 0.6, 0.3, 0.0, -0.5)))


def test_extreme_thresholds():
    rng = np.random.default_rng(5)
    features = segment_features(rng, 20, 24, 16)
    identity, single = hierarchical_merge(features, (1.01, -1.0))
    assert np.array_equal(identity, np.arange(20 * 24).reshape(20, 24))
    assert np.array_equal(single, np.zeros((20, 24), np.int32))
    # Everything merges at -1 even with zero vectors in the grid.
    features[3:7, 5:9] = 0
    assert hierarchical_merge(features, [-1.0]).max() == 0


def test_threshold_order_and_dtype_do_not_change_partitions():
    rng = np.random.default_rng(6)
    features = segment_features(rng, 20, 20, 32)
    expected = hierarchical_merge(features, PAPER)
    assert np.array_equal(hierarchical_merge(features, [0.1, 0.4, 0.2]), expected)
    assert np.array_equal(hierarchical_merge(features.astype(np.float64), PAPER), expected)
    twice = hierarchical_merge(features, [0.4, 0.4])
    assert np.array_equal(twice[0], twice[1]) and np.array_equal(twice[0], expected[0])


def test_invalid_input_is_rejected():
    good = np.ones((3, 3, 2), np.float32)
    with pytest.raises(ValueError, match="shape"):
        hierarchical_merge(np.ones((3, 3)), PAPER)
    with pytest.raises(TypeError, match="float"):
        hierarchical_merge(np.ones((3, 3, 2), np.int64), PAPER)
    with pytest.raises(ValueError, match="threshold"):
        hierarchical_merge(good, [])
    bad = good.copy()
    bad[1, 1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        hierarchical_merge(bad, PAPER)


def test_full_arenas_restart_the_merge_with_the_same_result(monkeypatch):
    # The neighbour lists and local heaps live in per-thread scratch arenas;
    # when one fills up the merge starts over with a larger one. Start them
    # at 4 rows per patch, in a fresh thread-local store, to force restarts.
    from hassod.discover import merge

    features = segment_features(np.random.default_rng(2), 20, 20, 64, noise=1.5)
    expected = quadratic_merge(features, PAPER)
    monkeypatch.setattr(merge, "_SCRATCH", threading.local())
    monkeypatch.setattr(merge, "_NBRS_ROWS", 4)
    monkeypatch.setattr(merge, "_LOCAL_ROWS", 4)
    np.testing.assert_array_equal(hierarchical_merge(features, PAPER), expected)
    grown = {key: buffer.size for key, buffer in merge._SCRATCH.held.items() if key[0] in ("nbrs", "local")}
    assert grown[("nbrs", np.dtype(np.int64))] > 4 * 400 * 2 and grown[("local", np.dtype(np.int64))] > 4 * 400 * 4
