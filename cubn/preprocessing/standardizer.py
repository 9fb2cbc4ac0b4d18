"""``Standardizer``: scikit-learn's ``StandardScaler`` on cubn's kernels.

The interface and the numbers are ``sklearn.preprocessing.StandardScaler``'s
(``fit``, ``partial_fit``, ``transform``, ``inverse_transform``,
``fit_transform``, ``sample_weight``, ``mean_``, ``var_``, ``scale_``,
``n_samples_seen_``, ``get_params``/``set_params``), and three additions for
GPU pipelines: uint8/uint16/float16/bfloat16 inputs, an output dtype, and an
image layout with an optional layout change -- a uint8 NHWC batch becomes a
float16 NCHW model input in one kernel launch.
"""
from __future__ import annotations

import inspect

import numpy as np

from .._backend import array_module, is_array, select
from .._checks import arg_error, check_positive_epsilon, describe
from .._args import as_like
from .._welford import mean_or_nan
from . import image
from .running_moments import RunningMoments, is_dask_array


class NotFittedError(ValueError, AttributeError):
    """A fitted attribute or ``transform`` was used before ``fit``.

    A ValueError and an AttributeError, like scikit-learn's own
    ``NotFittedError``, so ``hasattr(scaler, "mean_")`` is False before fit.
    """


_FLOAT64_EPS = float(np.finfo(np.float64).eps)


def _as_array(func, name, X):
    """Arrays pass through; lists, tuples and DataFrames become NumPy arrays (floats as float64, as in sklearn)."""
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


class Standardizer:
    """Standardize features: ``z = (x - mean_) / scale_``, as scikit-learn's ``StandardScaler``.

    ``fit``/``partial_fit`` accumulate per-feature statistics with
    :class:`RunningMoments` (Welford per batch, Chan merges between batches;
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
    or cupy; lists are converted like scikit-learn does), and dask arrays
    (``fit``/``partial_fit`` reduce them with :mod:`cubn.dask`; ``transform``
    returns a lazy dask array). NaN is not treated as missing (unlike
    scikit-learn, which ignores NaNs in fit): it propagates to its feature.
    On the GPU, ``partial_fit`` is two kernel launches and no host
    synchronization; reading ``n_samples_seen_`` after weighted fits reads the
    sum of weights back from the device.
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
                raise arg_error(ValueError, "Standardizer.set_params", key, f"one of {valid}", "an unknown parameter")
            setattr(self, key, value)
        return self

    def __repr__(self):
        defaults = {p.name: p.default for p in inspect.signature(type(self).__init__).parameters.values()
                    if p.name != "self"}
        changed = [f"{k}={v!r}" for k, v in self.get_params().items() if v is not defaults[k] and v != defaults[k]]
        return f"Standardizer({', '.join(changed)})"

    def __sklearn_is_fitted__(self):
        return self._rm is not None and self._rm.shape is not None

    def __sklearn_tags__(self):
        try:
            from sklearn.utils import Tags, TargetTags, TransformerTags
        except ImportError:  # pragma: no cover - scikit-learn absent or too old for tags
            return None
        return Tags(estimator_type=None, target_tags=TargetTags(required=False),
                    transformer_tags=TransformerTags(preserves_dtype=["float64", "float32"]))

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

    # -- state ---------------------------------------------------------------
    def _reset(self):
        self._rm = None
        self._n_values = 0       # values seen per feature, ignoring weights (exact, on the host)
        self._n_unknown = False  # a dask array of unknown shape was fitted: only the state knows
        self._weighted = False   # any weighted fit: n_samples_seen_ is the state's count (sum of weights)
        self._version = 0        # bumped by every partial_fit: invalidates the caches below
        self._cache = {}

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
        X = _as_array(func, "X", X)
        if not is_dask_array(X):
            image.check_input(f, "X", X)
        in_last, _, ch = self._layout(func, X)
        n_features = int(X.shape[ch])
        if n_features == 0:
            raise arg_error(ValueError, f, "X", "at least one feature", f"shape {tuple(X.shape)}")
        if self.__sklearn_is_fitted__() and n_features != self.n_features_in_:
            raise arg_error(ValueError, f, "X", f"{self.n_features_in_} features, as in the earlier fits",
                            f"{n_features} features (shape {tuple(X.shape)})")
        n = X.shape[0]
        if n == 0:
            raise arg_error(ValueError, f, "X", "at least one sample (as scikit-learn)", f"shape {tuple(X.shape)}")
        sw = self._sample_weight(f, sample_weight, X, n)
        axes = tuple(a for a in range(X.ndim) if a != ch)
        rm = self._rm if self._rm is not None else RunningMoments(axis=axes)
        old_axis, rm.axis = rm.axis, axes  # a batch of another rank is refused by the accumulator (naming X)
        try:
            rm._update(X, sw, f, "X", "sample_weight")
        except Exception:
            rm.axis = old_axis
            raise
        self._rm = rm
        values = float(np.prod([X.shape[a] for a in axes], dtype=np.float64))  # NaN: dask's unknown chunks
        if np.isfinite(values):
            self._n_values += int(values)
        else:
            self._n_unknown = True
        self._weighted = self._weighted or sw is not None
        self._version += 1
        self._cache = {}
        return self

    def _sample_weight(self, f, sample_weight, X, n):
        if sample_weight is None:
            return None
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
    def n_features_in_(self):
        """Number of features (channels for images) seen in fit."""
        self._check_fitted("n_features_in_")
        return int(np.prod(self._rm.shape))

    @property
    def n_samples_seen_(self):
        """Samples seen per feature: an int, or the sum of ``sample_weight`` (a float) after weighted fits.

        For images, the number of values per channel (N·H·W per batch).
        """
        self._check_fitted("n_samples_seen_")
        if not self._n_unknown and not self.with_mean and not self.with_std:
            # scikit-learn counts rows here even with weights (a float then).
            return np.float64(self._n_values) if self._weighted else np.int64(self._n_values)
        if not self._weighted and not self._n_unknown:
            return np.int64(self._n_values)
        c = self._rm._state[0][:1]
        return np.float64(c.get()[0] if not isinstance(c, np.ndarray) else c[0])  # a device read on the GPU

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
        """Undo :meth:`transform`: ``X * scale_ + mean_``, back to ``data_format``; keeps ``X``'s float dtype."""
        return self._apply("inverse_transform", X, inverse=True)

    def fit_transform(self, X, y=None, **fit_params):
        """``fit(X, y, **fit_params)`` then ``transform(X)``."""
        return self.fit(X, y, **fit_params).transform(X)

    def _apply(self, func, X, inverse):
        f = "Standardizer." + func
        _, odt = self._checked_params(func)
        self._check_fitted(func)
        X = _as_array(func, "X", X)
        if not is_dask_array(X):
            image.check_input(f, "X", X)
        in_last, out_last, ch = self._layout(func, X, inverse=inverse)
        if X.shape[ch] != self.n_features_in_:
            raise arg_error(ValueError, f, "X", f"{self.n_features_in_} features, as in fit",
                            f"{X.shape[ch]} features (shape {tuple(X.shape)})")
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
