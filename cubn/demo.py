"""``cubn demo``: an MLP with batch normalization on scikit-learn's digits.

Dense(64→128) → BatchNorm + ReLU (fused) → Dense(128→10) → softmax, trained
with Adam. The batch-norm forward *and* backward go through
``cubn.BatchNorm``; only the two dense layers and the loss are written out
here. Runs on the GPU (CuPy) when there is one, on NumPy otherwise. The
data ship inside scikit-learn (no download).
"""
from __future__ import annotations

import sys
import time

import numpy as np

import cubn


class _Adam:
    def __init__(self, xp, params, lr=2e-3, b1=0.9, b2=0.999, eps=1e-8):
        self.xp, self.lr, self.b1, self.b2, self.eps = xp, lr, b1, b2, eps
        self.m = {k: xp.zeros_like(v) for k, v in params.items()}
        self.v = {k: xp.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, params, grads):
        self.t += 1
        c1, c2 = 1 - self.b1**self.t, 1 - self.b2**self.t
        for k, g in grads.items():
            self.m[k] = self.b1 * self.m[k] + (1 - self.b1) * g
            self.v[k] = self.b2 * self.v[k] + (1 - self.b2) * g * g
            params[k] -= self.lr * (self.m[k] / c1) / (self.xp.sqrt(self.v[k] / c2) + self.eps)


def _steps(n, label, progress):
    """range(n), with a tqdm progress bar on stderr when ``progress`` (none when stderr is not a terminal)."""
    if not progress:
        return range(n)
    try:
        from tqdm import tqdm
    except ImportError as e:
        raise SystemExit("cubn demo needs tqdm for its progress bar: pip install 'cubn[demo]' "
                         "(or run it with --no-progress)") from e
    return tqdm(range(n), desc=label, leave=False, disable=None)


def load_digits_split(seed):
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise SystemExit("cubn demo needs scikit-learn for its bundled digits data: pip install 'cubn[demo]'") from e
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    n_test = len(x) // 5
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def run(epochs=20, batch_size=64, hidden=128, seed=0, device="auto", out=None, progress=True):
    """Train and evaluate; returns a dict with per-epoch history and the test accuracy."""
    out = out or sys.stdout
    use_gpu = cubn.gpu_available() if device == "auto" else device == "cuda"
    if use_gpu and not cubn.gpu_available():
        raise SystemExit("cubn demo --device cuda: no CUDA device is available")
    if use_gpu:
        import cupy as xp
    else:
        xp = np
    print(f"cubn demo: MLP 64-{hidden}-10 with cubn.BatchNorm (+ReLU fused) on sklearn digits, "
          f"{'GPU (CuPy)' if use_gpu else 'CPU (NumPy)'}", file=out)
    xtr, ytr, xte, yte = load_digits_split(seed)
    xtr, ytr, xte, yte = (xp.asarray(a) for a in (xtr, ytr, xte, yte))
    rng = np.random.default_rng(seed)
    params = {
        "w1": xp.asarray(rng.standard_normal((64, hidden)).astype(np.float32) * np.sqrt(2 / 64)),
        "b1": xp.zeros(hidden, np.float32),
        "w2": xp.asarray(rng.standard_normal((hidden, 10)).astype(np.float32) * np.sqrt(1 / hidden)),
        "b2": xp.zeros(10, np.float32),
    }
    bn = cubn.BatchNorm(decay=0.9, scale=True, activation_fn="relu", updates_collections=None)
    bn_params = None
    opt = None

    def forward(x, training):
        h = x @ params["w1"] + params["b1"]
        a = bn(h, is_training=training)
        return a, a @ params["w2"] + params["b2"]

    history = []
    n = xtr.shape[0]
    steps = (n + batch_size - 1) // batch_size
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        perm = xp.asarray(rng.permutation(n))
        total_loss, correct = 0.0, 0
        for s in _steps(steps, f"epoch {epoch:2d}/{epochs}", progress):
            idx = perm[s * batch_size:(s + 1) * batch_size]
            xb, yb = xtr[idx], ytr[idx]
            a, logits = forward(xb, True)
            if bn_params is None:  # the layer's variables exist after its first call
                bn_params = bn.trainable_variables
                opt = _Adam(xp, {**params, **{"bn_" + k: v for k, v in bn_params.items()}})
            z = logits - logits.max(axis=1, keepdims=True)
            p = xp.exp(z)
            p /= p.sum(axis=1, keepdims=True)
            m = xb.shape[0]
            total_loss += float(-xp.log(p[xp.arange(m), yb] + 1e-12).sum())
            correct += int((p.argmax(axis=1) == yb).sum())
            dlogits = p
            dlogits[xp.arange(m), yb] -= 1
            dlogits /= m
            grads = {"w2": a.T @ dlogits, "b2": dlogits.sum(axis=0)}
            dh = bn.backward(dlogits @ params["w2"].T)  # BN + fused ReLU backward, in cubn
            grads["w1"] = xb.T @ dh
            grads["b1"] = dh.sum(axis=0)
            grads.update({"bn_" + k: g for k, g in bn.gradients.items()})
            opt.step({**params, **{"bn_" + k: v for k, v in bn_params.items()}}, grads)
        _, test_logits = forward(xte, False)
        test_acc = float((test_logits.argmax(axis=1) == yte).mean())
        rec = {"epoch": epoch, "loss": total_loss / n, "train_accuracy": correct / n, "test_accuracy": test_acc}
        history.append(rec)
        print(f"epoch {epoch:2d}: loss {rec['loss']:.4f}  train acc {rec['train_accuracy']:.4f}  "
              f"test acc {test_acc:.4f}", file=out)
    elapsed = time.perf_counter() - t0
    final = history[-1]["test_accuracy"]
    print(f"final test accuracy: {final:.4f}  ({elapsed:.1f} s, {epochs} epochs)", file=out)
    return {"history": history, "test_accuracy": final, "seconds": elapsed, "device": "cuda" if use_gpu else "cpu"}
