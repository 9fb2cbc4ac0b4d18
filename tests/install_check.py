"""What a user gets from ``pip install cubn`` alone: NumPy and nothing else.

A plain Python script (no pytest, no ml_dtypes, no SciPy): on the NumPy and
the emulated backends it computes moments, a training forward (the
functional op and the layer, with its moving statistics) and the backward,
for float16, float32 and float64, and checks each against a float64 NumPy
reference written out here. CI runs it in a fresh virtual environment made
with ``pip install .`` and nothing else, so a test environment richer than a
user's cannot hide a missing optional dependency.

    python tests/install_check.py [--bare] [--backends numpy,emulated]

``--bare`` also asserts that the optional packages are absent. Run it from
outside the source tree, so that ``import cubn`` finds the installed copy.
Exit status 0 when everything agrees; otherwise each failure is printed.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import pathlib
import shutil
import sys
import sysconfig
import traceback

import numpy as np

import cubn

OPTIONAL = ("ml_dtypes", "scipy", "pytest", "cupy", "torch")
DTYPES = ("float16", "float32", "float64")
# Error bounds relative to the scale of the values, per input dtype.
TOL = {"float16": 4e-3, "float32": 3e-5, "float64": 1e-11}
EPS = 1e-3
# (data_format, shape): channels last and first, rank 2 and 4; the last two large
# enough for the NumPy backend's compiled loops (more than 8192 elements).
CASES = (("NHWC", (4, 3, 5, 6)), ("NCHW", (3, 4, 5, 5)), ("NHWC", (9, 7)),
         ("NHWC", (16, 9, 9, 24)), ("NCHW", (6, 8, 15, 15)))


def channel_axis(fmt, ndim):
    return 1 if ndim == 2 or fmt == "NCHW" else ndim - 1


def bc(v, ndim, axis):
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(v, np.float64).reshape(shape)


def gelu(z):
    return 0.5 * z * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))


def reference(x, dy, gamma, beta, axis):
    """float64 (mean, var, y, dx, dgamma, dbeta) of training batch normalization + GELU."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    nd = x.ndim
    axes = tuple(a for a in range(nd) if a != axis)
    mean = x.mean(axis=axes)
    var = ((x - bc(mean, nd, axis)) ** 2).mean(axis=axes)
    invstd = 1.0 / np.sqrt(bc(var, nd, axis) + EPS)
    xhat = (x - bc(mean, nd, axis)) * invstd
    z = xhat * bc(gamma, nd, axis) + bc(beta, nd, axis)
    y = gelu(z)
    # d gelu(z)/dz = Phi(z) + z * phi(z)
    phi = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    dz = dy * (0.5 * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0))) + z * phi)
    dbeta = dz.sum(axis=axes)
    dgamma = (dz * xhat).sum(axis=axes)
    g = bc(gamma, nd, axis) * dz
    dx = invstd * (g - g.mean(axis=axes, keepdims=True) - xhat * (g * xhat).mean(axis=axes, keepdims=True))
    return mean, var, y, dx, dgamma, dbeta


class Checker:
    def __init__(self):
        self.failures = []
        self.checks = 0

    def close(self, where, actual, expected, dtype):
        self.checks += 1
        a = np.asarray(actual, np.float64)
        e = np.asarray(expected, np.float64)
        if a.shape != e.shape:
            self.failures.append(f"{where}: shape {a.shape}, expected {e.shape}")
            return
        if not np.isfinite(a).all():
            self.failures.append(f"{where}: non-finite values")
            return
        scale = max(1.0, float(np.abs(e).max()))
        err = float(np.abs(a - e).max()) / scale
        if err > TOL[dtype]:
            self.failures.append(f"{where}: relative error {err:.3g} > {TOL[dtype]}")


def run(backend, dtype, check, rng):
    for fmt, shape in CASES:
        where = f"{backend} {dtype} {fmt} {shape}"
        axis = channel_axis(fmt, len(shape))
        c = shape[axis]
        x = (3.0 + 2.0 * rng.standard_normal(shape)).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        gamma = rng.uniform(0.5, 1.5, c).astype(np.float32 if dtype != "float64" else np.float64)
        beta = rng.normal(size=c).astype(gamma.dtype)
        mean, var, y_ref, dx_ref, dg_ref, db_ref = reference(x, dy, gamma, beta, axis)
        axes = [a for a in range(len(shape)) if a != axis]
        with cubn.use_backend(backend):
            m, v = cubn.moments(x, axes)
            check.close(f"{where} moments mean", m, mean, dtype)
            check.close(f"{where} moments variance", v, var, dtype)
            y, bm, bv = cubn.fused_batch_norm(x, gamma, beta, epsilon=EPS, data_format=fmt, activation="gelu")
            n = x.size // c
            check.close(f"{where} fused_batch_norm y", y, y_ref, dtype)
            check.close(f"{where} fused_batch_norm batch_var", bv, var * n / (n - 1), dtype)
            g = cubn.batch_norm_backward(dy, x, gamma, m.astype(gamma.dtype), v.astype(gamma.dtype), EPS,
                                         offset=beta, data_format=fmt, activation="gelu")
            check.close(f"{where} batch_norm_backward dx", g.dx, dx_ref, dtype)
            check.close(f"{where} batch_norm_backward dscale", g.dscale, dg_ref, dtype)
            check.close(f"{where} batch_norm_backward doffset", g.doffset, db_ref, dtype)
            bn = cubn.BatchNorm(scale=True, decay=0.0, epsilon=EPS, data_format=fmt, activation_fn="gelu",
                                param_initializers={"gamma": gamma, "beta": beta}, updates_collections=None,
                                unbiased_moving_variance=False)
            check.close(f"{where} BatchNorm y", bn(x, is_training=True), y_ref, dtype)
            check.close(f"{where} BatchNorm dx", bn.backward(dy), dx_ref, dtype)
            check.close(f"{where} BatchNorm dgamma", bn.gradients["gamma"], dg_ref, dtype)
            check.close(f"{where} BatchNorm moving_mean", bn.variables["moving_mean"], mean, dtype)
            check.close(f"{where} BatchNorm moving_variance", bn.variables["moving_variance"], var, dtype)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bare", action="store_true", help="assert that no optional package is installed")
    p.add_argument("--backends", default="numpy,emulated")
    args = p.parse_args(argv)
    print(f"cubn {cubn.__version__} from {cubn.__file__}; numpy {np.__version__}")
    present = [m for m in OPTIONAL if importlib.util.find_spec(m) is not None]
    if args.bare and present:
        print(f"FAIL: --bare, but optional packages are installed: {', '.join(present)}")
        return 1
    from cubn.backends import numpy_native

    status = numpy_native.status()
    print(f"the NumPy backend's compiled loops: {status}")
    if shutil.which("c++") or shutil.which("g++"):
        if not status.startswith("in use"):
            print("FAIL: a C++ compiler is installed, but the compiled loops are not in use")
            return 1
        if (pathlib.Path(sysconfig.get_paths()["include"]) / "Python.h").exists() and "direct calls" not in status:
            print("FAIL: Python's headers are installed, but the compiled loops' direct calls are not built")
            return 1
    check = Checker()
    rng = np.random.default_rng()
    for backend in args.backends.split(","):
        for dtype in DTYPES:
            try:
                run(backend, dtype, check, rng)
            except Exception:  # noqa: BLE001 - report every failing combination
                check.failures.append(f"{backend} {dtype}: raised\n{traceback.format_exc()}")
    for f in check.failures:
        print("FAIL:", f)
    print(f"{check.checks} checks on {args.backends} x {', '.join(DTYPES)}: "
          f"{'all agree with the float64 reference' if not check.failures else f'{len(check.failures)} failed'}")
    return 1 if check.failures else 0


if __name__ == "__main__":
    sys.exit(main())
