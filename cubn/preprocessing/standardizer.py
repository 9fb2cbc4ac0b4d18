"""``Standardizer``: scikit-learn's ``StandardScaler`` on cubn's kernels.

The interface and the numbers are ``sklearn.preprocessing.StandardScaler``'s
(``fit``, ``partial_fit``, ``transform``, ``inverse_transform``,
``fit_transform``, ``sample_weight``, ``mean_``, ``var_``, ``scale_``,
``n_samples_seen_``, ``n_features_in_``, ``feature_names_in_``,
``get_params``/``set_params``, ``set_output``), and three additions for GPU
pipelines: uint8/uint16/float16/bfloat16 inputs, an output dtype, and an
image layout with an optional layout change -- a uint8 NHWC batch becomes a
float16 NCHW model input in one kernel launch.

With scikit-learn installed, ``Standardizer`` is a real scikit-learn
transformer: it subclasses ``BaseEstimator``, ``OneToOneFeatureMixin`` and
``TransformerMixin`` and validates NumPy, list, DataFrame and sparse input
with scikit-learn's own helpers, so it passes
``sklearn.utils.estimator_checks.check_estimator``. scikit-learn stays
optional: ``import cubn`` does not import it (``cubn.Standardizer`` is loaded
on first use), and without it the class keeps the same parameter protocol
on a small base of its own.
"""
from __future__ import annotations

import inspect

import numpy as np

from .._backend import array_module, is_array, is_cupy_array, select, take_dlpack
from .._checks import arg_error, check_positive_epsilon, describe
from .._memory import readable
from .._args import as_like
from .._welford import mean_or_nan
from . import image
from .running_moments import RunningMoments, is_dask_array

try:
    from sklearn.base import BaseEstimator, OneToOneFeatureMixin, TransformerMixin
    from sklearn.exceptions import NotFittedError as _SklearnNotFitted
    from sklearn.utils.validation import _check_sample_weight, validate_data
except ImportError:  # scikit-learn is optional
    BaseEstimator = None


if BaseEstimator is not None:
    class NotFittedError(_SklearnNotFitted):
        """A fitted attribute or ``transform`` was used before ``fit`` (scikit-learn's ``NotFittedError``)."""
else:
    class NotFittedError(ValueError, AttributeError):
        """A fitted attribute or ``transform`` was used before ``fit``.

        A ValueError and an AttributeError, like scikit-learn's own
        ``NotFittedError``, so ``hasattr(scaler, "mean_")`` is False before fit.
        """


_FLOAT64_EPS = float(np.finfo(np.float64).eps)


def _as_array(func, name, X):
    """Arrays pass through; lists, tuples and DataFrames become NumPy arrays (floats as float64, as in sklearn)."""
    X, = take_dlpack("Standardizer." + func, **{name: X})
    if is_array(X) or is_dask_array(X):
        return X
    if X is None or isinstance(X, (str, bytes, dict)) or not hasattr(X, "__len__") and not hasattr(X, "__array__"):
        raise arg_error(TypeError, "Standardizer." + func, name, "an array (numpy, cupy or dask) or array-like",
                        describe(X))
    try:
        a = np.asarray(X)
    except (TypeError, ValueError):
        raise arg_error(TypeError, "Standardizer." + func, name, "an array or array-like", describe(X)) from None
    if a.dtype.kind in "biu" and a.dtype.name not in image.INT_DTYPES or a.dtype.kind == "O":
        try:
            a = a.astype(np.float64)
        except (TypeError, ValueError):
            raise arg_error(TypeError, "Standardizer." + func, name, "numbers", describe(X)) from None
    return a


class _ParamsProtocol:
    """scikit-learn's parameter protocol, for when scikit-learn is not installed."""

    @classmethod
    def _get_param_names(cls):
        sig = inspect.signature(cls.__init__)
        return sorted(p.name for p in sig.parameters.values() if p.name != "self")

    def get_params(self, deep=True):
        """The constructor's parameters, as a dict (scikit-learn's protocol)."""
        return {name: getattr(self, name) for name in self._get_param_names()}

    def set_params(self, **params):
        """Set constructor parameters; returns ``self``. Unknown names are a ValueError."""
        valid = self._get_param_names()
        for key, value in params.items():
            if key not in valid:
                raise ValueError(f"Invalid parameter {key!r} for estimator {self!r}. Valid parameters are: {valid!r}.")
            setattr(self, key, value)
        return self

    def __repr__(self):
        defaults = {p.name: p.default for p in inspect.signature(type(self).__init__).parameters.values()
                    if p.name != "self"}
        changed = [f"{k}={v!r}" for k, v in self.get_params().items() if v is not defaults[k] and v != defaults[k]]
        return f"{type(self).__name__}({', '.join(changed)})"

    def fit_transform(self, X, y=None, **fit_params):
        """``fit(X, y, **fit_params)`` then ``transform(X)``."""
        return self.fit(X, y, **fit_params).transform(X)

    def get_feature_names_out(self, input_features=None):
        """One output feature per input feature (as ``StandardScaler``): ``x0, x1, ...`` unless given."""
        self._check_fitted("get_feature_names_out")
        if input_features is not None:
            names = np.asarray(input_features, dtype=object)
            if names.shape != (self.n_features_in_,):
                raise arg_error(ValueError, "Standardizer.get_feature_names_out", "input_features",
                                f"{self.n_features_in_} names", f"shape {names.shape}")
            return names
        return np.asarray([f"x{i}" for i in range(self.n_features_in_)], dtype=object)


_BASES = (OneToOneFeatureMixin, TransformerMixin, BaseEstimator) if BaseEstimator is not None else (_ParamsProtocol,)


class Standardizer(*_BASES):
    """Standardize features: ``z = (x - mean_) / scale_``, as scikit-learn's ``StandardScaler``.

    ``fit``/``partial_fit`` accumulate per-feature statistics with
    [`RunningMoments`][RunningMoments] (Welford per batch, Chan merges between batches;
    float64 state); ``transform`` is one fused pass that converts the input,
    standardizes it and writes ``out_dtype`` in ``out_format``.

    The numbers are scikit-learn's: ``var_`` is the population variance,
    ``scale_ = sqrt(var_)`` with near-constant features (by sklearn's own
    test) given scale 1, ``mean_``/``var_``/``scale_`` are float64 arrays,
    ``with_std=False`` leaves ``var_`` and ``scale_`` None, and
    ``with_mean=False`` still computes ``mean_`` (it is needed for the
    variance) but does not subtract it. ``sample_weight`` are frequency
    weights; ``n_samples_seen_`` is then their sum.

    Args:
        copy: accepted for scikit-learn compatibility; ``transform`` always
            returns a new array (it changes dtype and layout anyway).
        with_mean: subtract the mean in ``transform``.
        with_std: divide by the standard deviation in ``transform``.
        epsilon: added to ``var_`` before the square root (as batch
            normalization does). The default 0 gives scikit-learn's numbers,
            with the near-constant rule; with ``epsilon > 0`` every feature
            gets ``sqrt(var_ + epsilon)``.
        out_dtype: dtype of ``transform``'s result: float16, bfloat16,
            float32 or float64. None: the input's dtype for float inputs,
            float32 for uint8/uint16 (scikit-learn would give float64; pass
            ``out_dtype="float64"`` for its exact numbers).
        data_format: None for scikit-learn's ``(n_samples, n_features)``
            matrices; ``"NHWC"`` or ``"NCHW"`` (``"NDHWC"``/``"NCDHW"``) for
            images of rank 2 to 5, whose channels are the features
            (statistics over all other axes).
        out_format: layout of ``transform``'s result for images (None: as
            ``data_format``); ``inverse_transform`` maps back.

    Inputs: uint8, uint16, float16, bfloat16, float32, float64 arrays (numpy
    or cupy), dask arrays (``fit``/``partial_fit`` reduce them with
    [`cubn.dask`][cubn.dask]; ``transform`` returns a lazy dask array), and -- for
    ``(n_samples, n_features)`` data -- anything scikit-learn takes: lists,
    DataFrames (``feature_names_in_``), other integer dtypes (converted to
    float64 as ``StandardScaler`` does) and ``scipy.sparse`` matrices
    (``with_mean=False`` only, as ``StandardScaler``; the result stays sparse).

    Missing values, as in ``StandardScaler``: for ``(n_samples, n_features)``
    data, NaN is ignored by ``fit`` (each feature's statistics use its
    non-NaN values; ``n_samples_seen_`` becomes one count per feature when
    they differ) and kept by ``transform``; Inf is refused. For images
    (``data_format`` set) NaN is not missing but propagates to its channel,
    as in batch normalization. On the GPU, ``partial_fit`` of images is two
    kernel launches and no host synchronization; on ``(n_samples,
    n_features)`` CuPy data the Inf check reads one flag back.
    """

    def __init__(self, *, copy=True, with_mean=True, with_std=True, epsilon=0.0, out_dtype=None,
                 data_format=None, out_format=None):
        # As in scikit-learn: parameters are stored untouched and checked by fit/transform.
        self.copy = copy
        self.with_mean = with_mean
        self.with_std = with_std
        self.epsilon = epsilon
        self.out_dtype = out_dtype
        self.data_format = data_format
        self.out_format = out_format
        self._reset()

    # -- scikit-learn's estimator protocol ------------------------------------
    def __sklearn_is_fitted__(self):
        return getattr(self, "_rm", None) is not None and self._rm.shape is not None

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True
        tags.input_tags.sparse = not self.with_mean  # as StandardScaler: sparse data cannot be centered
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    # -- state ---------------------------------------------------------------
    def _reset(self):
        self._rm = None
        self._n_values = 0       # values seen per feature, ignoring weights (exact, on the host)
        self._n_unknown = False  # a dask array of unknown shape was fitted: only the state knows
        self._weighted = False   # any weighted fit: n_samples_seen_ is the state's count (sum of weights)
        self._version = 0        # bumped by every partial_fit: invalidates the caches below
        self._nan_seen = False   # a NaN was ignored: counts may differ per feature
        self._cache = {}
        for fitted in ("n_features_in_", "feature_names_in_"):
            self.__dict__.pop(fitted, None)

    def _check_fitted(self, what):
        if not self.__sklearn_is_fitted__():
            raise NotFittedError(
                f"Standardizer.{what}: this Standardizer is not fitted yet; call 'fit' or 'partial_fit' first"
            )

    def _checked_params(self, func):
        f = "Standardizer." + func
        eps = check_positive_epsilon(f, "epsilon", self.epsilon)
        for name in ("with_mean", "with_std"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise arg_error(TypeError, f, name, "a bool", describe(getattr(self, name)))
        odt = None if self.out_dtype is None else image.check_out_dtype(f, "out_dtype", self.out_dtype)
        return eps, odt

    def _layout(self, func, X, inverse=False):
        """(input channels last, output channels last, channel axis of X) for this call."""
        f = "Standardizer." + func
        if self.data_format is None:
            if self.out_format is not None:
                raise arg_error(ValueError, f, "out_format", "None when data_format is None (2-D data)",
                                repr(self.out_format))
            if X.ndim != 2:
                raise arg_error(ValueError, f, "X", "a 2-D array (n_samples, n_features); pass data_format for images",
                                f"shape {tuple(X.shape)}")
            return True, True, 1
        if not 2 <= X.ndim <= 5:
            raise arg_error(ValueError, f, "X", "a tensor of rank 2 to 5", f"shape {tuple(X.shape)} (rank {X.ndim})")
        data_last = image.channels_last(f, "data_format", self.data_format, X.ndim)
        out_last = data_last
        if self.out_format is not None:
            out_last = image.channels_last(f, "out_format", self.out_format, X.ndim)
        if inverse:  # X is in out_format; the result in data_format
            data_last, out_last = out_last, data_last
        return data_last, out_last, (X.ndim - 1 if data_last or X.ndim == 2 else 1)

    # -- fitting ---------------------------------------------------------------
    def fit(self, X, y=None, sample_weight=None):
        """Compute the mean and standard deviation of ``X`` (forgetting earlier fits). Returns ``self``."""
        saved = dict(self.__dict__)
        self._reset()
        try:
            return self.partial_fit(X, y, sample_weight)
        except Exception:
            self.__dict__.update(saved)  # a refused X leaves the earlier fit in place
            raise

    def partial_fit(self, X, y=None, sample_weight=None):
        """Add ``X`` to the running statistics (one batch of a stream). Returns ``self``.

        Args:
            X: ``(n_samples, n_features)`` (or images in ``data_format``).
            y: ignored.
            sample_weight: one weight per sample (per image for images), or
                a number; None for unit weights.
        """
        func = "partial_fit"
        f = "Standardizer." + func
        self._checked_params(func)
        X, kind = self._validated(func, X, reset=not self.__sklearn_is_fitted__())
        if kind == "sparse":
            return self._partial_fit_sparse(f, X, sample_weight)
        in_last, _, ch = self._layout(func, X)
        n_features = int(X.shape[ch])
        if n_features == 0:
            raise ValueError(f"Found array with 0 feature(s) (shape={tuple(X.shape)}) while a minimum of 1 is "
                             "required by Standardizer.")
        if self.__sklearn_is_fitted__() and n_features != self.n_features_in_:
            raise ValueError(f"X has {n_features} features, but Standardizer is expecting {self.n_features_in_} "
                             f"features as input ({f}: argument 'X' of shape {tuple(X.shape)}).")
        n = X.shape[0]
        if n == 0:
            raise ValueError(f"Found array with 0 sample(s) (shape={tuple(X.shape)}) while a minimum of 1 is "
                             "required by Standardizer.")
        sw = self._sample_weight(f, sample_weight, X, n)
        if is_array(X) and self.data_format is None and np.dtype(X.dtype).kind == "f":
            sw = self._missing_as_zero_weight(f, X, sw)
        axes = tuple(a for a in range(X.ndim) if a != ch)
        rm = self._rm if self._rm is not None else RunningMoments(axis=axes)
        old_axis, rm.axis = rm.axis, axes  # a batch of another rank is refused by the accumulator (naming X)
        try:
            rm._update(X, sw, f, "X", "sample_weight")
        except Exception:
            rm.axis = old_axis
            raise
        self._rm = rm
        if kind != "numpy":
            self.n_features_in_ = n_features
        values = float(np.prod([X.shape[a] for a in axes], dtype=np.float64))  # NaN: dask's unknown chunks
        if np.isfinite(values):
            self._n_values += int(values)
        else:
            self._n_unknown = True
        self._weighted = self._weighted or sample_weight is not None
        self._version += 1
        self._cache = {}
        return self

    def _validated(self, func, X, reset):
        """X as an array and where it goes: "numpy" (checked by scikit-learn), "sparse", or "device"
        (CuPy, dask and the narrow dtypes cubn keeps: checked here)."""
        f = "Standardizer." + func
        X, = take_dlpack(f, X=X)  # torch tensors, JAX arrays: NumPy or CuPy arrays, zero-copy
        if isinstance(X, np.ndarray):
            X = readable(f, "X", X)  # native byte order, aligned, no subclass: as the plain array
        if is_array(X) and not isinstance(X, np.ndarray) or is_dask_array(X):
            if self.data_format is None and is_cupy_array(X) and X.dtype.kind in "biu" \
                    and np.dtype(X.dtype).name not in image.INT_DTYPES:
                X = X.astype(np.float64)  # other integers become float64, as in scikit-learn (on the device)
            if not is_dask_array(X):
                image.check_input(f, "X", X)
            return X, "device"
        if self.data_format is not None or BaseEstimator is None:
            X = _as_array(func, "X", X)
            image.check_input(f, "X", X)
            return X, "device"
        if _is_sparse(X):
            if self.with_mean:
                raise ValueError("Cannot center sparse matrices: pass `with_mean=False` instead. See docstring "
                                 "for motivation and alternatives.")
            X = validate_data(self, X, reset=reset, accept_sparse=("csr", "csc"), dtype=(np.float64, np.float32),
                              ensure_all_finite="allow-nan")
            return X, "sparse"
        if isinstance(X, np.ndarray) and np.dtype(X.dtype).name in ("uint8", "uint16", "float16", "bfloat16"):
            if X.ndim != 2:
                self._layout(func, X)  # the rank error, naming data_format
            if not reset and hasattr(self, "feature_names_in_"):
                del self.feature_names_in_
            if X.dtype.kind == "f" and X.size and np.isinf(X).any():
                raise ValueError("Input X contains infinity or a value too large for dtype('float64').")
            return X, "device"
        if getattr(X, "ndim", 2) > 2:
            self._layout(func, X)  # rank > 2: say that images need data_format
        X = validate_data(self, X, reset=reset, dtype=(np.float64, np.float32), ensure_all_finite="allow-nan",
                          ensure_min_features=1)
        return X, "numpy"

    def _missing_as_zero_weight(self, f, X, sw):
        """NaN is missing (as in scikit-learn): weight 0 for it; Inf is an error."""
        xp = array_module(X)
        if X.size == 0:
            return sw
        nan = xp.isnan(X)
        flags = xp.stack([nan.any(), xp.isinf(X).any()])
        flags = flags.get() if not isinstance(flags, np.ndarray) else flags  # CuPy: one flag read back
        if flags[1]:
            raise ValueError(f"Input X contains infinity or a value too large for dtype({np.dtype(X.dtype).name!r}) "
                             f"({f}: Inf is refused; NaN is treated as missing).")
        if not flags[0]:
            return sw
        self._nan_seen = True
        keep = (~nan).astype(np.float64)
        return keep if sw is None else keep * sw

    def _partial_fit_sparse(self, f, X, sample_weight):
        from sklearn.utils.sparsefuncs import mean_variance_axis

        n, n_features = X.shape
        sw = None if sample_weight is None else _check_sample_weight(sample_weight, X, dtype=X.dtype)
        mean, var, total = mean_variance_axis(X, axis=0, weights=sw, return_sum_weights=True)
        rm = self._rm if self._rm is not None else RunningMoments(axis=(0,))
        rm._merge_triple(f, "X", 2, (0,), (n_features,), X.dtype, total, mean, np.asarray(var) * total)
        self._rm = rm
        if sw is None and np.ptp(total) != 0:
            self._nan_seen = True
        self._n_values += n
        self._weighted = self._weighted or sample_weight is not None
        self._version += 1
        self._cache = {}
        return self

    def _sample_weight(self, f, sample_weight, X, n):
        w = self._sample_weight_array(f, sample_weight, X, n)
        if w is not None and not _any_nonzero(w):
            # scikit-learn's rule (and its message): all-zero weights are no data at all.
            raise ValueError(f"Sample weights must contain at least one non-zero number ({f}: argument "
                             "'sample_weight').")
        return w

    def _sample_weight_array(self, f, sample_weight, X, n):
        sample_weight, = take_dlpack(f, sample_weight=sample_weight)
        if sample_weight is None:
            return None
        if BaseEstimator is not None and isinstance(X, np.ndarray) and not is_array(sample_weight) \
                and not isinstance(sample_weight, (int, float, np.number)):
            sample_weight = np.asarray(sample_weight)  # pandas Series, lists: scikit-learn's conversions
        if BaseEstimator is not None and isinstance(X, np.ndarray) and isinstance(sample_weight, np.ndarray) \
                and X.ndim == 2 and self.data_format is None:
            w = _check_sample_weight(sample_weight, X, dtype=np.float64)  # shape, all-zero: scikit-learn's errors
            return w.reshape((n,) + (1,) * (X.ndim - 1))
        if is_dask_array(X) or is_dask_array(sample_weight):
            w = sample_weight if hasattr(sample_weight, "ndim") else np.asarray(sample_weight, np.float64)
            if w.ndim == 0:
                w = np.full((n,), float(w))
            if w.ndim != 1 or w.shape[0] != n:
                raise arg_error(ValueError, f, "sample_weight", f"shape ({n},)", f"shape {tuple(w.shape)}")
            return w.reshape((n,) + (1,) * (X.ndim - 1))
        if isinstance(sample_weight, (int, float, np.number)) and not isinstance(sample_weight, bool):
            w = array_module(X).full((n,), float(sample_weight), dtype=np.float64)
            return w.reshape((n,) + (1,) * (X.ndim - 1))
        xp = select(f, "X", X, sample_weight=sample_weight if is_array(sample_weight) else None).xp
        w = as_like(f, "sample_weight", sample_weight, X, xp)
        if w.dtype.kind not in "fiu" and w.dtype.name != "bfloat16":
            raise arg_error(TypeError, f, "sample_weight", "real numbers", describe(sample_weight))
        if w.ndim != 1 or w.shape[0] != n:
            raise arg_error(ValueError, f, "sample_weight", f"shape ({n},) (one weight per sample)",
                            f"shape {tuple(w.shape)}")
        # (n,) against rank-r X: one weight per sample, like weighted_moments' batch weights.
        return w.reshape((n,) + (1,) * (X.ndim - 1))

    # -- fitted attributes -----------------------------------------------------
    def _cached(self, key, make):
        v = self._cache.get(key)
        if v is None:
            v = self._cache[key] = make()
        return v

    @property
    def n_samples_seen_(self):
        """Samples seen per feature: an int, or the sum of ``sample_weight`` (a float) after weighted fits;
        an array of one count per feature when ignored NaNs made the counts differ (as scikit-learn).

        For images, the number of values per channel (N·H·W per batch).
        """
        self._check_fitted("n_samples_seen_")
        if not self._n_unknown and not self.with_mean and not self.with_std:
            # scikit-learn counts rows here even with weights (a float then).
            return np.float64(self._n_values) if self._weighted else np.int64(self._n_values)
        if not self._weighted and not self._n_unknown and not self._nan_seen:
            return np.int64(self._n_values)
        c = self._rm._state[0]
        c = c.get() if not isinstance(c, np.ndarray) else c  # a device read on the GPU
        c = c.astype(np.float64 if self._weighted else np.int64)
        # one count per feature when NaNs made them differ, else one number (scikit-learn's rule)
        return c if np.ptp(c) != 0 else c[0]

    @property
    def mean_(self):
        """Per-feature mean (float64), or None with ``with_mean=False`` and ``with_std=False``."""
        self._check_fitted("mean_")
        if not self.with_mean and not self.with_std:
            return None
        return self._cached("mean", self._mean64)

    def _mean64(self):
        s = self._rm._state
        return mean_or_nan(s[0], s[1])

    @property
    def var_(self):
        """Per-feature population variance (float64), or None with ``with_std=False``."""
        self._check_fitted("var_")
        if not self.with_std:
            return None
        return self._cached("var", self._rm._var64)

    @property
    def scale_(self):
        """Per-feature scale, ``sqrt(var_)`` (near-constant features: 1), or None with ``with_std=False``."""
        self._check_fitted("scale_")
        if not self.with_std:
            return None
        return self._cached("scale", self._scale)

    def _scale(self):
        eps = float(self.epsilon)
        var = self._rm._var64()
        xp = array_module(var)
        if eps > 0:
            return xp.sqrt(var + eps)
        # scikit-learn's _is_constant_feature: a variance within the rounding
        # error bound of a two-pass computation counts as zero.
        n = self._rm._state[0]
        mean = self._mean64()
        with np.errstate(all="ignore"):
            bound = n * _FLOAT64_EPS * var + (n * mean * _FLOAT64_EPS) ** 2
            return xp.where(var <= bound, 1.0, xp.sqrt(var))

    # -- transforming ----------------------------------------------------------
    def _coefficients(self, A, inverse):
        """(a, d) in compute dtype A: transform is (x - a) / d, the inverse x * d + a."""
        def make():
            xp = array_module(self._rm._state)
            c = self._rm._state.shape[1]
            a = self.mean_.astype(A) if self.with_mean else xp.zeros(c, A)
            d = self.scale_.astype(A) if self.with_std else xp.ones(c, A)
            return xp.ascontiguousarray(a), xp.ascontiguousarray(d)

        return self._cached(("coef", np.dtype(A).name), make)

    def transform(self, X, copy=None):
        """Standardize ``X``: ``(X - mean_) / scale_``, in ``out_dtype`` and ``out_format``.

        One kernel launch on the GPU. A dask array gives a lazy dask array.
        """
        return self._apply("transform", X, inverse=False)

    def inverse_transform(self, X, copy=None):
        """Undo [`transform`][transform]: ``X * scale_ + mean_``, back to ``data_format``; keeps ``X``'s float dtype."""
        return self._apply("inverse_transform", X, inverse=True)

    def _apply(self, func, X, inverse):
        f = "Standardizer." + func
        _, odt = self._checked_params(func)
        self._check_fitted(func)
        X, kind = self._validated(func, X, reset=False)
        if kind == "sparse":
            return self._apply_sparse(X, inverse)
        if not is_dask_array(X):
            X = readable(f, "X", X)
        in_last, out_last, ch = self._layout(func, X, inverse=inverse)
        if X.shape[ch] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[ch]} features, but Standardizer is expecting {self.n_features_in_} "
                             f"features as input ({f}: argument 'X' of shape {tuple(X.shape)}).")
        name = np.dtype(X.dtype).name
        if inverse:
            if name not in image.OUT_DTYPES:
                raise arg_error(TypeError, f, "X", "a float16, bfloat16, float32 or float64 array",
                                f"dtype {name}")
            out = np.dtype(X.dtype)
        else:
            out = odt if odt is not None else (np.dtype(X.dtype) if name in image.OUT_DTYPES else np.dtype(np.float32))
        A = image.compute_dtype(name, out.name)
        a, d = self._coefficients(A, inverse)
        if is_dask_array(X):
            from .dask_reduction import map_affine  # imports dask: only for dask inputs

            return map_affine(X, in_last, out_last, ch, a, d, out, inverse)
        backend = select(f, "X", X, **{"fitted statistics": a})
        lay = image.make_layout(f, X.shape, in_last, out_last, name="X")
        return image.affine_map(backend, X, lay, a, d, out, inverse)

    def _apply_sparse(self, X, inverse):
        """Sparse input (with_mean=False): scale the stored values, as StandardScaler (the result stays sparse)."""
        from sklearn.utils.sparsefuncs import inplace_column_scale

        X = X.copy()
        if self.with_std:
            scale = np.asarray(self.scale_, dtype=np.float64)
            inplace_column_scale(X, (scale if inverse else 1.0 / scale).astype(X.dtype))
        return X


def _is_sparse(X) -> bool:
    try:
        import scipy.sparse
    except ImportError:  # pragma: no cover - scipy comes with scikit-learn
        return False
    return scipy.sparse.issparse(X)


def _any_nonzero(w) -> bool:
    """Whether any weight is non-zero (for a dask array, computed: the weights are one value per sample)."""
    if is_dask_array(w):
        return bool((w != 0).any().compute())
    return bool((w != 0).any())
