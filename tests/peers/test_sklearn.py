"""scikit-learn: ``check_estimator`` in full (``parametrize_with_checks``) and StandardScaler's own
tests (``sklearn/preprocessing/tests/test_data.py``), each against the real ``StandardScaler``."""
from __future__ import annotations

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn", reason="scikit-learn is not installed")
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

import cubn  # noqa: E402
from cubn import Standardizer  # noqa: E402


@parametrize_with_checks([Standardizer(), Standardizer(with_mean=False), Standardizer(with_std=False)])
def test_check_estimator(estimator, check):
    check(estimator)


def test_is_a_scikit_learn_transformer():
    from sklearn.base import BaseEstimator, OneToOneFeatureMixin, TransformerMixin

    assert issubclass(Standardizer, (BaseEstimator,)) and issubclass(Standardizer, OneToOneFeatureMixin)
    assert issubclass(Standardizer, TransformerMixin)
    assert issubclass(cubn.preprocessing.NotFittedError, sklearn.exceptions.NotFittedError)


def test_import_cubn_does_not_import_sklearn():
    import subprocess
    import sys

    code = "import sys, cubn; assert 'sklearn' not in sys.modules; cubn.Standardizer; assert 'sklearn' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# test_data.py test_scaler_n_samples_seen_with_nan / test_standard_scaler_nan-style: NaN ignored in fit, kept
@pytest.mark.parametrize("weighted", [False, True])
def test_nan_is_missing(backend, rng, weighted):
    X = rng.standard_normal((12, 3)) * 3 + 1
    X[[0, 4, 5], 0] = np.nan
    X[2, 2] = np.nan
    sw = rng.random(12) + 0.1 if weighted else None
    ours = Standardizer().fit(backend.asarray(X), sample_weight=backend.asarray(sw))
    theirs = StandardScaler().fit(X, sample_weight=sw)
    np.testing.assert_allclose(backend.to_numpy(ours.mean_), theirs.mean_, rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(ours.var_), theirs.var_, rtol=1e-11)
    np.testing.assert_allclose(ours.n_samples_seen_, theirs.n_samples_seen_, rtol=1e-12)
    assert np.shape(ours.n_samples_seen_) == np.shape(theirs.n_samples_seen_) == (3,)
    out = backend.to_numpy(ours.transform(backend.asarray(X)))
    want = theirs.transform(X)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(want))
    np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-12)
    # without NaN the count is one number again (StandardScaler's rule)
    assert np.ndim(Standardizer().fit(backend.asarray(np.nan_to_num(X))).n_samples_seen_) == 0


def test_inf_is_refused(backend, rng):
    X = rng.standard_normal((5, 2))
    X[1, 1] = np.inf
    with pytest.raises(ValueError, match="infinity"):
        Standardizer().fit(backend.asarray(X))
    with pytest.raises(ValueError, match="infinity"):
        StandardScaler().fit(X)


# test_data.py test_scaler_int: integers are converted to float64
def test_integers_as_standard_scaler(rng):
    X = rng.integers(-50, 50, (20, 3)).astype(np.int64)
    ours, theirs = Standardizer().fit(X), StandardScaler().fit(X)
    np.testing.assert_allclose(ours.mean_, theirs.mean_, rtol=1e-12)
    out = ours.transform(X)
    assert out.dtype == theirs.transform(X).dtype == np.float64
    np.testing.assert_allclose(out, theirs.transform(X), rtol=1e-12)


# test_data.py test_scaler_without_centering / test_partial_fit_sparse_input (with_mean=False, sparse stays sparse)
@pytest.mark.parametrize("fmt", ["csr", "csc"])
def test_sparse_with_mean_false(rng, fmt):
    import scipy.sparse as sp

    X = rng.standard_normal((30, 4))
    X[X < 0.5] = 0
    Xs = sp.csr_matrix(X) if fmt == "csr" else sp.csc_matrix(X)
    ours, theirs = Standardizer(with_mean=False), StandardScaler(with_mean=False)
    for part in (slice(0, 12), slice(12, 30)):
        ours.partial_fit(Xs[part])
        theirs.partial_fit(Xs[part])
    np.testing.assert_allclose(ours.var_, theirs.var_, rtol=1e-12)
    np.testing.assert_allclose(ours.mean_, theirs.mean_, rtol=1e-12)
    assert ours.n_samples_seen_ == theirs.n_samples_seen_ == 30
    out = ours.transform(Xs)
    assert sp.issparse(out) and out.format == fmt
    np.testing.assert_allclose(out.toarray(), theirs.transform(Xs).toarray(), rtol=1e-12)
    np.testing.assert_allclose(ours.inverse_transform(out).toarray(), X, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="Cannot center sparse matrices"):
        Standardizer().fit(Xs)


# check_sample_weights_not_an_array / check_all_zero_sample_weights_error / check_fit1d / empty data
def test_scikit_learn_errors(rng):
    X = rng.standard_normal((6, 2))
    with pytest.raises(ValueError, match="Sample weights must contain at least one non-zero number"):
        Standardizer().fit(X, sample_weight=np.zeros(6))
    with pytest.raises(ValueError, match="Expected 2D array, got 1D array"):
        Standardizer().fit(X[:, 0])
    with pytest.raises(ValueError, match=r"0 sample\(s\)"):
        Standardizer().fit(np.empty((0, 2)))
    with pytest.raises(ValueError, match=r"0 feature\(s\)"):
        Standardizer().fit(np.empty((3, 0)))


def test_feature_names_and_set_output(rng):
    pd = pytest.importorskip("pandas", reason="pandas is not installed")
    df = pd.DataFrame(rng.standard_normal((8, 3)), columns=["a", "b", "c"])
    s = Standardizer().set_output(transform="pandas").fit(df)
    assert list(s.feature_names_in_) == ["a", "b", "c"] and s.n_features_in_ == 3
    out = s.transform(df)
    assert isinstance(out, pd.DataFrame) and list(out.columns) == ["a", "b", "c"]
    np.testing.assert_allclose(out.to_numpy(), StandardScaler().fit_transform(df.to_numpy()), rtol=1e-12)
    assert list(s.get_feature_names_out()) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="feature names"):
        s.transform(df.rename(columns={"a": "z"}))


# the additions keep working next to the estimator protocol: narrow dtypes, images, out_dtype
def test_narrow_inputs_and_images_still_work(backend, rng):
    X = rng.integers(0, 255, (16, 3)).astype(np.uint8)
    s = Standardizer().fit(backend.asarray(X))
    assert s.n_features_in_ == 3
    out = backend.to_numpy(s.transform(backend.asarray(X)))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, StandardScaler().fit_transform(X.astype(np.float64)), atol=1e-5)
    img = rng.integers(0, 255, (2, 4, 4, 3)).astype(np.uint8)
    si = Standardizer(data_format="NHWC", out_format="NCHW", out_dtype="float16").fit(backend.asarray(img))
    assert backend.to_numpy(si.transform(backend.asarray(img))).shape == (2, 3, 4, 4)
    assert si.n_features_in_ == 3


def test_without_scikit_learn_the_protocol_remains():
    """scikit-learn is optional: blocked, Standardizer keeps get_params/set_params, NaN as missing, its errors."""
    import subprocess
    import sys

    code = """
import sys; sys.modules["sklearn"] = None
import numpy as np, cubn
X = np.arange(12.0).reshape(4, 3); X[0, 0] = np.nan
s = cubn.Standardizer().fit(X)
assert type(s).__mro__[1].__name__ == "_ParamsProtocol"
assert np.allclose(s.mean_, [6.0, 5.5, 6.5]) and list(s.n_samples_seen_) == [3, 4, 4]
assert s.get_params()["with_mean"] is True and repr(s.set_params(with_std=False)) == "Standardizer(with_std=False)"
try:
    cubn.Standardizer().transform(X)
except cubn.preprocessing.NotFittedError:
    pass
else:
    raise AssertionError("no NotFittedError")
"""
    subprocess.run([sys.executable, "-c", code], check=True)
