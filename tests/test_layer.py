"""cubn.BatchNorm: training sequences, inference, updates, conventions, state."""
from __future__ import annotations

import math

import numpy as np
import pytest

import cubn
from conftest import assert_close, np_dtype
import reference as ref


class RefLayer:
    """Float64 model of tf.contrib/tf-keras batch norm, step by step."""

    def __init__(self, c, decay=0.999, eps=1e-3, zero_debias=False, renorm=False, clip=None, renorm_decay=0.99,
                 bessel=False, gamma=None, beta=None):
        self.decay, self.eps, self.zd, self.renorm = decay, eps, zero_debias, renorm
        self.clip = clip or {}
        self.renorm_decay, self.bessel = renorm_decay, bessel
        self.mm, self.mv = np.zeros(c), np.ones(c)
        self.gamma = np.ones(c) if gamma is None else gamma
        self.beta = np.zeros(c) if beta is None else beta
        self.biased, self.t = np.zeros(c), 0
        self.mstd = np.sqrt(self.mv)
        self.rmean, self.rstd = self.mm.copy(), self.mstd.copy()

    def train(self, x, axis, w=None, adj=None, update=True):
        nd = x.ndim
        axes = ref.reduce_axes(nd, axis)
        wb = None if w is None else w.reshape((-1,) + (1,) * (nd - 1))
        m, v = ref.moments(x, axes, weights=wb)
        xhat = (x - ref.bcast(m, nd, axis)) / np.sqrt(ref.bcast(v, nd, axis) + self.eps)
        if self.renorm:
            sd = np.sqrt(v + self.eps)
            rs = np.maximum(self.rstd, math.sqrt(self.eps))
            r = np.clip(sd / rs, self.clip.get("rmin", 0), self.clip.get("rmax", np.inf))
            d = np.clip((m - self.rmean) / rs, -self.clip.get("dmax", np.inf), self.clip.get("dmax", np.inf))
            xhat = xhat * ref.bcast(r, nd, axis) + ref.bcast(d, nd, axis)
        if adj is not None:
            xhat = xhat * ref.bcast(adj[0], nd, axis) + ref.bcast(adj[1], nd, axis)
        y = xhat * ref.bcast(self.gamma, nd, axis) + ref.bcast(self.beta, nd, axis)
        if update:
            self.update(m, v, x.size // x.shape[axis])
        return y

    def update(self, m, v, n):
        a = 1 - self.decay
        if self.renorm:
            sd = np.sqrt(v + self.eps)
            ra = 1 - self.renorm_decay
            self.rmean = self.rmean - (self.rmean - m) * ra
            self.rstd = self.rstd - (self.rstd - sd) * ra
            self.mstd = self.mstd - (self.mstd - sd) * a
            self.mv = np.maximum(self.mstd**2 - self.eps, 0)
        else:
            vv = v * n / max(n - 1, 1) if self.bessel else v
            self.mv = self.mv - (self.mv - vv) * a
        if self.zd:
            self.t += 1
            self.biased = self.biased - (self.biased - m) * a
            self.mm = self.biased / (1 - self.decay**self.t)
        else:
            self.mm = self.mm - (self.mm - m) * a

    def infer(self, x, axis):
        nd = x.ndim
        return (x - ref.bcast(self.mm, nd, axis)) / np.sqrt(ref.bcast(self.mv, nd, axis) + self.eps) \
            * ref.bcast(self.gamma, nd, axis) + ref.bcast(self.beta, nd, axis)


def _batch(rng, shape, dtype="float32", loc=3.0):
    return (loc + 2 * rng.standard_normal(shape)).astype(np_dtype(dtype))


CONFIGS = {
    "plain": dict(),
    "zero_debias": dict(zero_debias_moving_mean=True),
    "renorm": dict(renorm=True),
    "renorm_clipped": dict(renorm=True, renorm_clipping={"rmax": 1.05, "rmin": 0.95, "dmax": 0.05}),
    "renorm_zero_debias": dict(renorm=True, zero_debias_moving_mean=True),
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("data_format,shape", [("NHWC", (6, 3, 4, 5)), ("NCHW", (5, 4, 3, 3)), ("NHWC", (12, 7))])
@pytest.mark.parametrize("in_place", [True, False])
def test_training_sequence_then_inference(train_backend, rng, config, data_format, shape, in_place):
    backend = train_backend
    kw = CONFIGS[config]
    axis = ref.channel_axis(len(shape), data_format)
    c = shape[axis]
    coll = cubn.UpdateCollection()
    bn = cubn.BatchNorm(decay=0.8, scale=True, epsilon=1e-3, data_format=data_format,
                        updates_collections=None if in_place else coll, **kw)
    rl = RefLayer(c, decay=0.8, eps=1e-3, zero_debias=kw.get("zero_debias_moving_mean", False),
                  renorm=kw.get("renorm", False), clip=kw.get("renorm_clipping"),
                  bessel=not kw.get("renorm", False) and len(shape) in (2, 4))
    for step in range(4):
        x = _batch(rng, shape, loc=3.0 + step)
        y = bn(backend.asarray(x), is_training=True)
        if not in_place:
            assert len(coll) == 1
            assert cubn.run_updates(coll) == 1
        r = rl.train(x, axis)
        assert_close(backend.to_numpy(y), r, "float32", what=f"train step {step}")
        v = bn.variables
        assert_close(backend.to_numpy(v["moving_mean"]), rl.mm, "float32", what="moving_mean")
        assert_close(backend.to_numpy(v["moving_variance"]), rl.mv, "float32", what="moving_variance")
        if kw.get("renorm"):
            assert_close(backend.to_numpy(v["renorm_mean"]), rl.rmean, "float32", what="renorm_mean")
            assert_close(backend.to_numpy(v["renorm_stddev"]), rl.rstd, "float32", what="renorm_stddev")
            assert_close(backend.to_numpy(v["moving_stddev"]), rl.mstd, "float32", what="moving_stddev")
    x = _batch(rng, shape, loc=5.0)
    y = bn(backend.asarray(x), is_training=False)
    assert_close(backend.to_numpy(y), rl.infer(x, axis), "float32", what="inference")
    if kw.get("zero_debias_moving_mean"):
        assert float(np.asarray(backend.to_numpy(bn.variables["moving_mean/local_step"]))) == 4.0


def test_update_ops_trap(backend, rng):
    """The slim trap: deferred updates that never run leave the moving statistics
    at their initial values, and inference is then wrong."""
    coll = cubn.UpdateCollection()
    good = cubn.BatchNorm(decay=0.5, updates_collections=coll)
    trap = cubn.BatchNorm(decay=0.5, updates_collections=cubn.UpdateCollection())
    for _ in range(8):
        x = backend.asarray(_batch(rng, (16, 4, 4, 3), loc=10.0))
        good(x)
        trap(x)
        cubn.run_updates(coll)  # only the good layer's updates run
    assert np.allclose(backend.to_numpy(trap.variables["moving_mean"]), 0.0)
    assert np.allclose(backend.to_numpy(trap.variables["moving_variance"]), 1.0)
    xt = _batch(rng, (16, 4, 4, 3), loc=10.0)
    y_good = backend.to_numpy(good(backend.asarray(xt), is_training=False))
    y_trap = backend.to_numpy(trap(backend.asarray(xt), is_training=False))
    assert abs(y_good.mean()) < 1.0 and abs(y_good.std() - 1) < 0.5
    assert y_trap.mean() > 8.0  # raw data barely normalized: x / sqrt(1 + eps)


def test_in_place_updates_leave_no_pending_ops(backend, rng):
    cubn.UPDATE_OPS.clear()
    bn = cubn.BatchNorm(updates_collections=None)
    bn(backend.asarray(_batch(rng, (8, 3))))
    assert len(cubn.UPDATE_OPS) == 0
    bn2 = cubn.BatchNorm()
    bn2(backend.asarray(_batch(rng, (8, 3))))
    assert len(cubn.UPDATE_OPS) == 1
    bn2(backend.asarray(_batch(rng, (8, 3))), is_training=False)
    assert len(cubn.UPDATE_OPS) == 1  # inference adds nothing
    cubn.run_updates()
    assert len(cubn.UPDATE_OPS) == 0


@pytest.mark.parametrize("fused,unbiased,rank,weighted,expect", [
    (None, None, 4, False, True), (True, None, 2, False, True), (None, None, 5, False, True),
    (None, None, 3, False, False), (False, None, 4, False, False), (None, None, 4, True, False),
    (False, True, 4, False, True), (None, False, 4, False, False),
])
def test_moving_variance_convention(backend, rng, fused, unbiased, rank, weighted, expect):
    shape = {2: (10, 3), 3: (4, 5, 3), 4: (3, 2, 2, 3), 5: (2, 2, 2, 2, 3)}[rank]
    x = _batch(rng, shape)
    bn = cubn.BatchNorm(decay=0.0, fused=fused, unbiased_moving_variance=unbiased, updates_collections=None)
    w = rng.random(shape[0]) + 0.5 if weighted else None
    bn(backend.asarray(x), batch_weights=backend.asarray(w))
    wb = None if w is None else w.reshape((-1,) + (1,) * (rank - 1))
    _, v = ref.moments(x, tuple(range(rank - 1)), weights=wb)
    n = x.size // 3
    want = v * n / (n - 1) if expect else v
    assert_close(backend.to_numpy(bn.variables["moving_variance"]), want, "float32")


def test_batch_weights_training(backend, rng):
    x = _batch(rng, (8, 3, 3, 4))
    w = rng.random(8)
    bn = cubn.BatchNorm(decay=0.0, updates_collections=None)
    y = bn(backend.asarray(x), batch_weights=backend.asarray(w))
    rl = RefLayer(4, decay=0.0)
    r = rl.train(x, 3, w=w)
    assert_close(backend.to_numpy(y), r, "float32")
    assert_close(backend.to_numpy(bn.variables["moving_mean"]), rl.mm, "float32")
    assert_close(backend.to_numpy(bn.variables["moving_variance"]), rl.mv, "float32")


def test_adjustment_training_only(train_backend, rng):
    backend = train_backend
    xp_side = backend.asarray
    a_s, a_b = rng.uniform(0.9, 1.1, 5), rng.uniform(-0.1, 0.1, 5)
    bn = cubn.BatchNorm(scale=True, updates_collections=None,
                        adjustment=lambda shape: (xp_side(a_s), xp_side(a_b)))
    x = _batch(rng, (6, 4, 5))
    y = bn(backend.asarray(x))
    rl = RefLayer(5)
    assert_close(backend.to_numpy(y), rl.train(x, 2, adj=(a_s, a_b)), "float32")
    yi = bn(backend.asarray(x), is_training=False)
    mm, mv = backend.to_numpy(bn.variables["moving_mean"]), backend.to_numpy(bn.variables["moving_variance"])
    assert_close(backend.to_numpy(yi), (x - mm) / np.sqrt(mv + 1e-3), "float32")


def test_trainable_false(backend, rng):
    """No gradients for beta/gamma, but statistics still follow is_training (tf.contrib's semantics)."""
    bn = cubn.BatchNorm(scale=True, trainable=False, updates_collections=None, decay=0.5)
    x = _batch(rng, (8, 3))
    y = bn(backend.asarray(x))
    assert bn.trainable_variables == {}
    assert abs(backend.to_numpy(y).mean()) < 1e-4  # batch statistics were used
    assert not np.allclose(backend.to_numpy(bn.variables["moving_mean"]), 0)  # and the update ran
    bn.backward(backend.asarray(rng.standard_normal(x.shape).astype(np.float32)))
    assert bn.gradients == {}


@pytest.mark.parametrize("mode", ["renorm_clipped", "adjust", "weighted", "inference", "side_relu"])
@pytest.mark.parametrize("data_format,shape", [("NHWC", (4, 2, 3)), ("NCHW", (3, 3, 2, 2))])
def test_layer_gradients_finite_differences(train_backend, rng, mode, data_format, shape):
    backend = train_backend
    from test_backward import numeric_grads

    nd = len(shape)
    axis = ref.channel_axis(nd, data_format)
    c = shape[axis]
    x = 1.0 + rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    a_s, a_b = rng.uniform(0.8, 1.2, c), rng.uniform(-0.2, 0.2, c)
    kw = dict(scale=True, data_format=data_format, updates_collections=None, decay=0.9)
    if mode == "renorm_clipped":
        kw.update(renorm=True, renorm_clipping={"rmax": 1.1, "rmin": 0.9, "dmax": 0.1})
        kw["param_initializers"] = {"moving_stddev": rng.uniform(0.5, 2.0, c), "moving_mean": rng.standard_normal(c)}
    if mode == "adjust":
        kw["adjustment"] = lambda s: (backend.asarray(a_s), backend.asarray(a_b))
    if mode == "side_relu":
        kw["activation_fn"] = "relu"
    gamma, beta = rng.standard_normal(c), rng.standard_normal(c)
    kw["param_initializers"] = {**kw.get("param_initializers", {}), "gamma": gamma, "beta": beta}
    if mode == "inference":
        kw["param_initializers"].update(moving_mean=rng.standard_normal(c), moving_variance=rng.uniform(0.5, 2, c))
    kw["param_initializers"] = {k: backend.asarray(np.asarray(v, np.float64)) for k, v in kw["param_initializers"].items()}
    bn = cubn.BatchNorm(**kw)
    w = rng.random(shape[0]) + 0.3 if mode == "weighted" else None
    side = rng.standard_normal(shape) if mode == "side_relu" else None
    training = mode != "inference"
    # renorm's r, d depend on the pre-update renorm statistics: read them before the call
    rn = None
    if mode == "renorm_clipped":
        bn.build(c, np.float64, None if backend.name != "cupy" else 0)
        rn = (backend.to_numpy(bn.variables["renorm_mean"]).copy(), backend.to_numpy(bn.variables["renorm_stddev"]).copy())
    mm0 = backend.to_numpy(bn.variables["moving_mean"]).copy() if bn.built else None
    out = bn(backend.asarray(x), is_training=training, batch_weights=backend.asarray(w), side_input=backend.asarray(side))
    grads = bn.backward(backend.asarray(dy))
    dx = grads[0] if side is not None else grads

    def fwd(x_, g_, b_):
        axes = ref.reduce_axes(nd, axis)
        B = lambda v: ref.bcast(v, nd, axis)  # noqa: E731
        if training:
            wb = None if w is None else w.reshape((-1,) + (1,) * (nd - 1))
            m, v = ref.moments(x_, axes, weights=wb)
        else:
            m = np.asarray(kw["param_initializers"]["moving_mean"].get() if backend.name == "cupy" else kw["param_initializers"]["moving_mean"])
            v = np.asarray(kw["param_initializers"]["moving_variance"].get() if backend.name == "cupy" else kw["param_initializers"]["moving_variance"])
        xh = (x_ - B(m)) / np.sqrt(B(v) + 1e-3)
        if rn is not None:
            m_, v_ = ref.moments(x, axes)  # r, d are constants: from the unperturbed x
            rs = np.maximum(rn[1], math.sqrt(1e-3))
            r = np.clip(np.sqrt(v_ + 1e-3) / rs, 0.9, 1.1)
            d = np.clip((m_ - rn[0]) / rs, -0.1, 0.1)
            xh = xh * B(r) + B(d)
        if mode == "adjust":
            xh = xh * B(a_s) + B(a_b)
        z = xh * B(g_) + B(b_)
        if side is not None:
            z = ref.act("relu", z + side)
        return float(np.sum(dy * z))

    nx, ng, nb = numeric_grads(fwd, [x, gamma, beta])
    assert_close(backend.to_numpy(dx), nx, "float32", what="dx")
    assert_close(backend.to_numpy(bn.gradients["gamma"]), ng, "float32", what="dgamma")
    assert_close(backend.to_numpy(bn.gradients["beta"]), nb, "float32", what="dbeta")
    del out, mm0


def test_custom_activation(backend, rng):
    x = _batch(rng, (6, 4))

    class Softplus:
        def forward(self, z):
            return np.log1p(np.exp(z)) if isinstance(z, np.ndarray) else type(z)(z)  # numpy path only

        def backward(self, z, dy):
            return dy / (1 + np.exp(-z))

    if backend.name == "cupy":
        pytest.skip("the toy activation is written in NumPy")
    bn = cubn.BatchNorm(activation_fn=Softplus(), updates_collections=None)
    y = bn(backend.asarray(x))
    m, v = ref.moments(x, (0,))
    z = (x - m) / np.sqrt(v + 1e-3)
    assert_close(y, np.log1p(np.exp(z)), "float32")
    dx = bn.backward(np.ones_like(x))
    assert dx.shape == x.shape
    plain = cubn.BatchNorm(activation_fn=lambda z: z * 2, updates_collections=None)
    assert_close(plain(backend.asarray(x)), 2 * z, "float32")
    with pytest.raises(TypeError, match="plain callable with no backward"):
        plain.backward(np.ones_like(x))


def test_regularizers(backend, rng):
    g0 = rng.standard_normal(3)
    bn = cubn.BatchNorm(scale=True, updates_collections=None,
                        param_initializers={"gamma": backend.asarray(g0)},
                        param_regularizers={"gamma": cubn.regularizers.l2_regularizer(0.5),
                                            "beta": cubn.regularizers.l1_regularizer(0.1)})
    x = _batch(rng, (5, 3))
    bn(backend.asarray(x))
    losses = [float(backend.to_numpy(l)) for l in bn.losses]
    assert np.isclose(sorted(losses)[-1], max(0.25 * np.sum(g0.astype(np.float32) ** 2), 0.0), rtol=1e-5)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    bn.backward(backend.asarray(dy))
    plain = cubn.BatchNorm(scale=True, updates_collections=None, param_initializers={"gamma": backend.asarray(g0)})
    plain(backend.asarray(x))
    plain.backward(backend.asarray(dy))
    diff = backend.to_numpy(bn.gradients["gamma"]) - backend.to_numpy(plain.gradients["gamma"])
    assert_close(diff, 0.5 * g0, "float32")
    with pytest.raises(TypeError, match="no gradient"):
        odd = cubn.BatchNorm(scale=True, param_regularizers={"gamma": lambda w: (w * w).sum()}, updates_collections=None)
        odd(backend.asarray(x))
        odd.backward(backend.asarray(dy))


def test_state_dict_save_load_round_trip(backend, rng, tmp_path):
    layers = {"a": cubn.BatchNorm(scale=True, zero_debias_moving_mean=True, updates_collections=None, activation_fn="relu6"),
              "b": cubn.BatchNorm(renorm=True, data_format="NCHW", updates_collections=None,
                                  activation_fn=cubn.activations.leaky_relu(0.3))}
    xa, xb = _batch(rng, (6, 5)), _batch(rng, (4, 3, 2, 2))
    for _ in range(3):
        layers["a"](backend.asarray(xa))
        layers["b"](backend.asarray(xb))
    path = tmp_path / "bn.npz"
    cubn.save(path, layers)
    back = cubn.load(path, device="cuda" if backend.name == "cupy" else "cpu")
    for k, layer in layers.items():
        sd, sd2 = layer.state_dict(), back[k].state_dict()
        assert sorted(sd) == sorted(sd2)
        for name in sd:
            np.testing.assert_array_equal(backend.to_numpy(sd[name]), backend.to_numpy(sd2[name]))
    for k, x in (("a", xa), ("b", xb)):
        np.testing.assert_array_equal(backend.to_numpy(layers[k](backend.asarray(x), is_training=False)),
                                      backend.to_numpy(back[k](backend.asarray(x), is_training=False)))
    # a file that is not ours, and pickled content, are refused
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not written by cubn.save"):
        cubn.load(tmp_path / "other.npz")
    np.savez(tmp_path / "pickled.npz", __cubn_format__=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ValueError):
        cubn.load(tmp_path / "pickled.npz")


def test_load_state_dict_errors(rng):
    bn = cubn.BatchNorm()
    bn(_batch(rng, (4, 3)))
    with pytest.raises(KeyError, match="missing.*moving_variance"):
        bn.load_state_dict({"beta": np.zeros(3), "moving_mean": np.zeros(3)})
    with pytest.raises(ValueError, match="'moving_mean'.*shape \\(3,\\)"):
        bn.load_state_dict({"beta": np.zeros(3), "moving_mean": np.zeros(4), "moving_variance": np.ones(3)})


def test_layer_argument_errors(rng):
    with pytest.raises(ValueError, match="'data_format'"):
        cubn.BatchNorm(data_format="NCDHW")
    with pytest.raises(ValueError, match="'decay'.*\\[0, 1\\]"):
        cubn.BatchNorm(decay=1.5)
    with pytest.raises(ValueError, match="'renorm_clipping'.*'rmax'"):
        cubn.BatchNorm(renorm=True, renorm_clipping={"r_max": 3})
    with pytest.raises(ValueError, match="'param_initializers'"):
        cubn.BatchNorm(param_initializers={"weights": 1.0})
    with pytest.raises(ValueError, match="'param_regularizers'"):
        cubn.BatchNorm(param_regularizers={"moving_mean": lambda w: 0})
    with pytest.raises(ValueError, match="'activation_fn'"):
        cubn.BatchNorm(activation_fn="softsign")
    bn = cubn.BatchNorm()
    bn(_batch(rng, (4, 3)))
    with pytest.raises(ValueError, match="'x'.*3 channels.*5 channels"):
        bn(_batch(rng, (4, 5)))
    with pytest.raises(RuntimeError, match="forward"):
        cubn.BatchNorm().backward(np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match="'batch_weights'.*\\(4,\\)"):
        bn(_batch(rng, (4, 3)), batch_weights=np.ones(5))
    with pytest.raises(TypeError, match="float64"):
        bn(_batch(rng, (4, 3)).astype(np.float64))
    with pytest.raises(ValueError, match="'device'"):
        bn.to("tpu")


def test_half_precision_layer(train_backend, rng):
    """16-bit activations with float32 state (statistics accumulate in float32)."""
    backend = train_backend
    for dt in ("float16", "bfloat16"):
        bn = cubn.BatchNorm(scale=True, updates_collections=None, decay=0.0)
        x = _batch(rng, (8, 3, 3, 4), dt)
        y = bn(backend.asarray(x))
        assert y.dtype == x.dtype and bn.variables["moving_mean"].dtype == np.float32
        m, v = ref.moments(x, (0, 1, 2))
        assert_close(backend.to_numpy(bn.variables["moving_mean"]), m, dt)
        dx = bn.backward(backend.asarray(rng.standard_normal(x.shape).astype(x.dtype)))
        assert dx.dtype == x.dtype
