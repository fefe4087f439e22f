"""PCA-whitening learned from a collection: decorrelation, small collections, persistence."""
from __future__ import annotations

import numpy as np
import pytest

from indexer.whitening import PCAWhitening


def _correlated(n: int, d: int, seed: int = 0) -> np.ndarray:
    """(n, d) vectors with strongly unequal, correlated axes and a non-zero mean."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) * np.geomspace(10.0, 0.1, d)[:, None]
    return rng.normal(size=(n, d)) @ mixing + rng.normal(size=d) * 5.0


def _off_diagonal_correlation(x: np.ndarray) -> float:
    corr = np.corrcoef(x, rowvar=False)
    return float(np.abs(corr - np.diag(np.diag(corr))).max())


def test_full_whitening_gives_identity_covariance_and_unit_norm():
    data = _correlated(2000, 16)
    assert _off_diagonal_correlation(data) > 0.5  # the input really is correlated
    whitening = PCAWhitening.fit(data, shrinkage=0.0)
    assert (whitening.dim_in, whitening.dim_out) == (16, 16)

    raw = whitening.transform(data, normalize=False).astype(np.float64)
    np.testing.assert_allclose(raw.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.cov(raw, rowvar=False), np.eye(16), atol=1e-4)

    out = whitening.transform(data)
    assert out.dtype == np.float32 and out.shape == (2000, 16)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    assert _off_diagonal_correlation(out) < 0.1
    # Eigenvalues come sorted, largest first.
    assert np.all(np.diff(whitening.eigenvalues) <= 0)


def test_shrinkage_one_is_a_rotation_that_keeps_cosines_of_centred_vectors():
    data = _correlated(300, 8, seed=1)
    whitening = PCAWhitening.fit(data, shrinkage=1.0)
    centred = data - data.mean(axis=0)
    centred /= np.linalg.norm(centred, axis=1, keepdims=True)
    out = whitening.transform(data)
    np.testing.assert_allclose(out @ out.T, centred @ centred.T, atol=1e-5)


def test_dim_out_keeps_leading_components():
    data = _correlated(500, 12, seed=2)
    full = PCAWhitening.fit(data, shrinkage=0.0)
    reduced = PCAWhitening.fit(data, dim_out=4, shrinkage=0.0)
    assert reduced.dim_out == 4
    np.testing.assert_allclose(reduced.transform(data, normalize=False), full.transform(data, normalize=False)[:, :4],
                               atol=1e-4)


def test_fewer_vectors_than_dimensions_keeps_the_rank():
    data = _correlated(10, 50, seed=3)
    whitening = PCAWhitening.fit(data)
    assert whitening.dim_out == 9  # rank of 10 centred vectors
    assert PCAWhitening.fit(data, dim_out=5).dim_out == 5
    assert PCAWhitening.fit(data, dim_out=100).dim_out == 9
    unseen = _correlated(7, 50, seed=4)
    out = whitening.transform(unseen)
    assert out.shape == (7, 9) and np.isfinite(out).all()
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    # Two vectors: rank 1, one output component, the two land on opposite poles.
    pair = PCAWhitening.fit(data[:2], shrinkage=0.0)
    poles = pair.transform(data[:2])
    assert poles.shape == (2, 1)
    np.testing.assert_allclose(sorted(poles.ravel()), [-1.0, 1.0], atol=1e-6)


def test_save_load_and_dict_round_trips_are_identical(tmp_path):
    data = _correlated(200, 10, seed=5)
    whitening = PCAWhitening.fit(data, dim_out=6, shrinkage=0.3)
    path = tmp_path / "whitening.npz"
    whitening.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["whitening.npz"]  # no temporary left behind
    for restored in (PCAWhitening.load(path), PCAWhitening.from_dict(whitening.to_dict())):
        assert restored.shrinkage == 0.3
        for field in ("mean", "projection", "eigenvalues"):
            np.testing.assert_array_equal(getattr(restored, field), getattr(whitening, field))
        np.testing.assert_array_equal(restored.transform(data), whitening.transform(data))


def test_single_vector_transform_is_one_dimensional():
    data = _correlated(50, 6, seed=6)
    whitening = PCAWhitening.fit(data)
    np.testing.assert_array_equal(whitening.transform(data[3]), whitening.transform(data)[3])


@pytest.mark.parametrize(
    "vectors, kwargs, message",
    [
        (np.ones((1, 4)), {}, "n >= 2"),
        (np.array([[0.0, np.nan], [1.0, 2.0]]), {}, "NaN"),
        (np.ones((5, 4)), {}, "identical"),
        (np.eye(4), {"shrinkage": 1.5}, "shrinkage"),
        (np.eye(4), {"dim_out": 0}, "dim_out"),
    ],
)
def test_fit_rejects_bad_input(vectors, kwargs, message):
    with pytest.raises(ValueError, match=message):
        PCAWhitening.fit(vectors, **kwargs)


def test_transform_rejects_wrong_dimension():
    whitening = PCAWhitening.fit(_correlated(20, 5))
    with pytest.raises(ValueError, match="expects 5-d"):
        whitening.transform(np.zeros((3, 6)))
