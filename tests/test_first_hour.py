"""What a new user meets first: the version flag, copying and pickling a
layer, warnings for the UPDATE_OPS trap, errors for other libraries' habits,
the EWMA helper, the quick test run and benchmarking with pytest-benchmark."""
from __future__ import annotations

import copy
import json
import pickle
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import cubn
from cubn import compat
from cubn.updates import PendingUpdatesWarning

ROOT = Path(__file__).resolve().parent.parent


def test_version_flag():
    out = subprocess.run([sys.executable, "-m", "cubn", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"cubn {cubn.__version__}"


# ---------------------------------------------------------------------------
# pickle / copy.deepcopy
# ---------------------------------------------------------------------------
CONFIGS = {
    "plain": dict(),
    "full": dict(scale=True, activation_fn=cubn.activations.leaky_relu(0.1), renorm=True,
                 renorm_clipping={"rmax": 3.0}, param_regularizers={"gamma": cubn.regularizers.l2_regularizer(0.1)}),
    "zero_debias_nchw": dict(zero_debias_moving_mean=True, data_format="NCHW", decay=0.9),
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_batch_norm_copies_and_keeps_training_alike(backend, rng, config, how):
    if backend.name == "emulated" and config != "full":
        pytest.skip("emulated: one configuration")
    kw = dict(CONFIGS[config], updates_collections=None)
    bn = cubn.BatchNorm(**kw)
    fresh = pickle.loads(pickle.dumps(bn)) if how == "pickle" else copy.deepcopy(bn)  # unbuilt
    assert not fresh.built
    shape = (6, 3, 2, 2)
    x = backend.asarray(rng.normal(3, 2, shape).astype(np.float32))
    dy = backend.asarray(rng.normal(0, 1, shape).astype(np.float32))
    bn(x)
    bn.backward(dy)  # a forward context and gradients exist now
    twin = pickle.loads(pickle.dumps(bn)) if how == "pickle" else copy.deepcopy(bn)
    assert twin.gradients == {} and twin.device == bn.device
    with pytest.raises(RuntimeError, match="forward"):
        twin.backward(dy)  # a copy has no forward pass to differentiate
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(backend.to_numpy(twin.state_dict()[k]), backend.to_numpy(v), err_msg=k)
        assert twin.variables[k] is not v
    for step in range(2):  # the same steps give the same numbers, bit for bit
        x = backend.asarray(rng.normal(3, 2, shape).astype(np.float32))
        outs = []
        for layer in (bn, twin):
            y = layer(x)
            dx = layer.backward(dy)
            outs.append((y, dx, layer.gradients["beta"], layer.variables["moving_variance"]))
        for a, b in zip(*outs):
            np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b))
    for layer in (bn, twin, fresh):
        y = layer(x, is_training=False)
    np.testing.assert_array_equal(backend.to_numpy(bn(x, is_training=False)),
                                  backend.to_numpy(twin(x, is_training=False)))


def test_copies_send_their_updates_where_the_original_does(rng):
    x = rng.normal(0, 1, (5, 3)).astype(np.float32)
    mine = cubn.UpdateCollection("mine")
    bn = cubn.BatchNorm(updates_collections=mine)
    bn(x)
    assert len(mine) == 1
    twin = copy.deepcopy(bn)
    assert twin.updates_collections is mine
    twin(x)
    assert len(mine) == 2
    with pytest.raises(TypeError, match="run_updates"):
        pickle.dumps(mine)  # pending updates cannot travel
    cubn.run_updates(mine)
    # the process-wide UPDATE_OPS travels by reference through pickle and deepcopy
    g = cubn.BatchNorm()
    for other in (pickle.loads(pickle.dumps(g)), copy.deepcopy(g)):
        assert other.updates_collections is cubn.UPDATE_OPS


# ---------------------------------------------------------------------------
# the UPDATE_OPS trap, caught at run time
# ---------------------------------------------------------------------------
def test_a_growing_update_collection_warns_once_per_fill(rng):
    assert 200 <= cubn.UpdateCollection.warn_after <= 1000
    coll = cubn.UpdateCollection("loop")
    coll.warn_after = 4
    bn = cubn.BatchNorm(updates_collections=coll)
    x = rng.normal(0, 1, (4, 2)).astype(np.float32)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(4):
            bn(x)
        assert not w
        bn(x)
        assert [type(m.message) for m in w] == [PendingUpdatesWarning]
        assert "more than 4" in str(w[0].message) and "run_updates" in str(w[0].message)
        assert w[0].filename == __file__  # points at the training loop
        bn(x)
        assert len(w) == 1
        assert cubn.run_updates(coll) == 6
        for _ in range(5):
            bn(x)
        assert len(w) == 2
    cubn.run_updates(coll)


def test_inference_with_own_pending_updates_warns(rng):
    x = rng.normal(0, 1, (4, 2)).astype(np.float32)
    bn, other = cubn.BatchNorm(name="a"), cubn.BatchNorm(name="b")
    bn(x)
    bn(x)
    with pytest.warns(PendingUpdatesWarning, match=r"name='a'.*2 of its moving-statistics update.*UPDATE_OPS"):
        bn(x, is_training=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other(x, is_training=False)  # another layer's pending updates are not its business
        cubn.run_updates()
        bn(x, is_training=False)
        inplace = cubn.BatchNorm(updates_collections=None)
        inplace(x)
        inplace(x, is_training=False)


# ---------------------------------------------------------------------------
# habits from Keras and PyTorch
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((64,), {}, ValueError, r"argument 'decay': got 64, which looks like a channel count.*cubn\.torch\.BatchNorm2d\(64\)"),
    ((), {"decay": 128}, ValueError, "channel count"),
    ((), {"momentum": 0.1}, TypeError, r"'momentum': use decay=.*decay=1-m.*decay=0\.9"),
    ((), {"training": True}, TypeError, r"'training'.*bn\(x, is_training=True\)"),
    ((), {"is_training": False}, TypeError, r"argument of the call"),
    ((), {"eps": 1e-5}, TypeError, r"epsilon="),
    ((), {"num_features": 64}, TypeError, r"no channel count"),
    ((), {"axis": 1}, TypeError, r"data_format='NCHW'"),
    ((), {"affine": True}, TypeError, r"center=True.*scale=True"),
    ((), {"gamma_initializer": None}, TypeError, r"param_initializers=\{'gamma'"),
])
def test_other_libraries_habits_get_cubns_spelling(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        cubn.BatchNorm(*args, **kwargs)
    if args == () and exc is TypeError:  # SyncBatchNorm takes the layer's arguments as **kwargs
        with pytest.raises(exc, match=match):
            cubn.SyncBatchNorm(**kwargs)


def test_valid_arguments_are_not_mistaken_for_habits():
    assert cubn.BatchNorm(1).decay == 1.0
    assert cubn.BatchNorm(0.9, True, True).scale
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        cubn.BatchNorm(colour=1)


# ---------------------------------------------------------------------------
# compat.ExponentialMovingAverage: by name, as tf.train.ExponentialMovingAverage
# ---------------------------------------------------------------------------
def _tf_ema(values, decay, zero_debias=False, num_updates=None):
    """tf.train.ExponentialMovingAverage's formulas (its documentation and
    moving_averages.assign_moving_average), in float64."""
    d = decay if num_updates is None else min(decay, (1 + num_updates) / (10 + num_updates))
    if not zero_debias:
        shadow = np.array(values[0], np.float64)
        for v in values[1:]:
            shadow = shadow - (shadow - v) * (1 - d)
        return shadow
    biased = np.zeros_like(values[0], np.float64)
    for t, v in enumerate(values, 1):
        biased = biased - (biased - v) * (1 - d)
        shadow = biased / (1 - d**t)
    return shadow


@pytest.mark.parametrize("zero_debias", [False, True])
@pytest.mark.parametrize("rebind", [False, True])
def test_ema_tracks_by_name_whether_arrays_are_updated_or_rebound(rng, zero_debias, rebind):
    ema = compat.ExponentialMovingAverage(0.9, zero_debias=zero_debias, num_updates=3)
    mean, var = rng.normal(0, 1, 4), rng.uniform(1, 2, 4)
    seen_m, seen_v = [], []
    for _ in range(5):
        m, v = 1e4 + rng.normal(0, 1, 4), rng.uniform(1, 2, 4)
        if rebind:
            mean, var = m, v            # `self.mean = new_mean`
        else:
            mean[...], var[...] = m, v  # `self.mean.assign(new_mean)`
        seen_m.append(m.copy())
        seen_v.append(v.copy())
        ema.apply({"mean": mean, "variance": var})
    np.testing.assert_allclose(ema.average("mean"), _tf_ema(seen_m, 0.9, zero_debias, 3), rtol=1e-13)
    np.testing.assert_allclose(ema.average("variance"), _tf_ema(seen_v, 0.9, zero_debias, 3), rtol=1e-13)
    assert ema.average(mean) is ema.average("mean")  # the array last applied finds its name
    assert sorted(ema._shadow) == ["mean", "variance"]  # one shadow per name, however many arrays
    assert ema.average_name("mean") == "mean/ExponentialMovingAverage"


def test_ema_takes_compat_collections_and_refuses_unnamed_arrays(rng):
    compat.reset_default_graph()
    try:
        compat.batch_norm(rng.normal(0, 1, (4, 3)).astype(np.float32), scope="bn", updates_collections=None)
        pairs = compat.get_collection(compat.GraphKeys.MOVING_AVERAGE_VARIABLES)
        ema = compat.ExponentialMovingAverage(0.5)
        ema.apply(pairs)
        np.testing.assert_array_equal(ema.average("bn/moving_mean"), dict(pairs)["bn/moving_mean"])
    finally:
        compat.reset_default_graph()
    a = rng.normal(0, 1, 3)
    with pytest.raises(TypeError, match=r"name the arrays.*ema\.apply\(\{'mean': mean"):
        ema.apply([a])
    with pytest.raises(ValueError, match=r"'x'.*shape \(3,\)"):
        ema.apply({"x": a})
        ema.apply({"x": np.zeros(2)})
    with pytest.raises(KeyError, match="never applied"):
        ema.average(np.zeros(3))
    with pytest.raises(KeyError, match="no average named 'y'"):
        ema.average("y")


# ---------------------------------------------------------------------------
# the quick run and pytest-benchmark
# ---------------------------------------------------------------------------
def _marks(obj) -> set:
    marks = getattr(obj, "pytestmark", [])
    return {m.name for m in (marks if isinstance(marks, list) else [marks])}


def test_quick_run_deselects_the_slow_families():
    """``dev.py test --quick`` passes ``-m QUICK_DESELECT``: evaluated on each
    test's markers (a pytest marker expression is a Python boolean expression)."""
    import importlib.util
    import inspect

    sys.path.insert(0, str(ROOT))
    try:
        import dev
    finally:
        sys.path.remove(str(ROOT))
    slow = {"tests/test_sync_batch_norm.py": {"test_equals_batch_norm_on_the_whole_batch",
                                              "test_inconsistent_calls_raise_on_every_rank",
                                              "test_docs_example_runs_under_mpiexec",
                                              "test_gpu_cupy_arrays_through_mpi", "test_gpu_nccl"},
            "tests/test_dask.py": {"test_local_cluster"},
            "tests/test_nvrtc.py": {"test_every_variant_compiles_cleanly"},
            "tests/test_sanitized_kernels.py": {"test_kernels_are_clean_under_sanitizer"},
            "tests/emulator/test_sanitizers.py": None}  # None: every test of the file
    for path, names in slow.items():
        spec = importlib.util.spec_from_file_location(f"_quick_{Path(path).stem}", ROOT / path)
        mod = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(mod)
        except pytest.skip.Exception:
            continue  # a file skipped here (e.g. no cuda-bindings) is not run at all
        tests = {n: f for n, f in inspect.getmembers(mod, inspect.isfunction) if n.startswith("test_")}
        for n, f in tests.items():
            marks = _marks(mod) | _marks(f)
            selected = eval(dev.QUICK_DESELECT, {}, {m: m in marks for m in ("mpi", "dask_cluster", "nvrtc",
                                                                              "sanitizer")})
            assert selected == (names is not None and n not in names), (path, n, marks)


def test_the_docs_benchmark_recipe_is_timed_under_this_config(tmp_path):
    """docs/benchmarking.md's recipe, run with this repository's pytest configuration."""
    pytest.importorskip("pytest_benchmark")
    recipe = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "benchmarking.md").read_text(), flags=re.S)[0]
    bench = tmp_path / "test_my_batch_norm.py"
    bench.write_text(recipe)
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(ROOT / "pyproject.toml"),
                        "--rootdir", str(ROOT), str(bench), f"--benchmark-json={out}", "--benchmark-max-time=0.02",
                        "--benchmark-min-rounds=2"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    stats = {b["name"]: b["stats"] for b in json.loads(out.read_text())["benchmarks"]}
    assert sorted(stats) == ["test_cubn", "test_mine"]
    assert all(s["rounds"] >= 1 and s["mean"] > 0 for s in stats.values())
    assert "passed" in r.stdout and "3 passed" in r.stdout


def test_install_instructions_do_not_point_at_pypi():
    """cubn is not on PyPI, so a first install by name fails; the README and
    getting started install from a clone or a built wheel. (Adding an extra to
    an installed cubn, ``pip install "cubn[mpi]"``, works and is fine elsewhere.)"""
    for page in (ROOT / "README.md", ROOT / "docs" / "getting-started.md"):
        text = page.read_text()
        assert not re.search(r"pip install ['\"]?cubn(\[|\s|`|$)", text, flags=re.M), page.name
        assert re.search(r'pip install "\.\[cuda13\]"', text), page.name
        assert re.search(r"pip wheel \. --no-deps -w dist", text), page.name
