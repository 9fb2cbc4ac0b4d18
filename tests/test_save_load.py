"""Saving and loading never lose data.

In earlier versions ``cubn.save`` wrote in place (a failure midway destroyed the
previous checkpoint), ``load_state_dict`` assigned key by key (a bad key left
the others overwritten), a custom activation / adjustment / regularizer was
dropped silently (the file loaded as a different layer), and damaged files
raised bare ``BadZipFile`` / ``EOFError`` / ``KeyError``. Each test below
states the behaviour now promised.
"""
from __future__ import annotations

import errno
import os
import re
import stat

import numpy as np
import pytest

import cubn


def _trained(rng, **kw):
    bn = cubn.BatchNorm(scale=True, updates_collections=None, decay=0.5, **kw)
    for _ in range(2):
        bn((4 + rng.standard_normal((6, 3))).astype(np.float32))
    return bn


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------
# cubn.save is atomic
# ---------------------------------------------------------------------------
def _failing_savez(exc):
    def fake(fh, **arrays):
        fh.write(b"PK\x03\x04 half a checkpoint")
        raise exc
    return fake


@pytest.mark.parametrize("failure", ["disk full while writing", "exception while writing", "disk full at fsync"])
def test_a_failed_save_leaves_the_old_file_and_no_temporary(host_backend, rng, tmp_path, monkeypatch, failure):
    path = tmp_path / "model.npz"
    old = _trained(rng)
    cubn.save(path, old)
    before = path.read_bytes()
    new = _trained(rng)
    if failure == "disk full while writing":
        monkeypatch.setattr(np, "savez", _failing_savez(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
        expect = pytest.raises(OSError, match=r"model\.npz.*previous file.*unchanged")
    elif failure == "exception while writing":
        monkeypatch.setattr(np, "savez", _failing_savez(RuntimeError("interrupted")))
        expect = pytest.raises(RuntimeError, match="interrupted")
    else:
        def full(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(os, "fsync", full)
        expect = pytest.raises(OSError, match="model.npz")
    with expect as info:
        cubn.save(path, new)
    if isinstance(info.value, OSError):
        assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert _files(tmp_path) == ["model.npz"]
    back = cubn.load(path)
    np.testing.assert_array_equal(back.variables["moving_mean"], old.variables["moving_mean"])


def test_save_replaces_atomically_with_ordinary_permissions(host_backend, rng, tmp_path):
    path = tmp_path / "m.npz"
    cubn.save(path, _trained(rng))
    probe = tmp_path / "probe"
    probe.write_bytes(b"")  # what open(path, "wb") gives under this umask
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(probe.stat().st_mode)
    second = _trained(rng)
    cubn.save(path, {"a": second})
    np.testing.assert_array_equal(cubn.load(path)["a"].variables["moving_mean"], second.variables["moving_mean"])
    assert _files(tmp_path) == ["m.npz", "probe"]
    # Through a symlink the target is replaced, and the link stays a link.
    link = tmp_path / "latest.npz"
    link.symlink_to(path)
    cubn.save(link, second)
    assert link.is_symlink() and _files(tmp_path) == ["latest.npz", "m.npz", "probe"]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        cubn.save(tmp_path / "nowhere" / "m.npz", second)
    with pytest.raises(TypeError, match="keys are strings"):
        cubn.save(tmp_path / "x.npz", {1: second})


# ---------------------------------------------------------------------------
# load_state_dict: validate everything, then assign all or nothing
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["shape", "complex", "str", "bool", "object", "nan-variance", "negative-variance",
                                 "inf-mean", "too-large", "step"])
def test_load_state_dict_is_all_or_nothing(host_backend, rng, bad):
    bn = _trained(rng, zero_debias_moving_mean=True)
    before = {k: np.array(v, copy=True) for k, v in bn.state_dict().items()}
    state = {k: rng.uniform(1, 2, np.shape(v)).astype(np.asarray(v).dtype) for k, v in before.items()}
    state["moving_mean/local_step"] = np.asarray(7.0)
    victim, expect = "moving_variance", (ValueError, "entry 'moving_variance'")
    if bad == "shape":
        state[victim] = np.ones(4, np.float32)
        expect = (ValueError, r"'moving_variance'.*shape \(3,\)")
    elif bad == "complex":
        state[victim] = np.ones(3, np.complex64)
        expect = (TypeError, "'moving_variance'.*real numbers")
    elif bad == "str":
        state[victim] = np.array(["1", "2", "3"])
        expect = (TypeError, "'moving_variance'.*real numbers")
    elif bad == "bool":
        state[victim] = np.ones(3, bool)
        expect = (TypeError, "'moving_variance'.*real numbers")
    elif bad == "object":
        state[victim] = np.array([1.0, 2.0, None], dtype=object)
        expect = (TypeError, "'moving_variance'.*real numbers")
    elif bad == "nan-variance":
        state[victim][1] = np.nan
        expect = (ValueError, "'moving_variance'.*non-finite.*allow_invalid")
    elif bad == "negative-variance":
        state[victim][2] = -0.5
        expect = (ValueError, "'moving_variance'.*negative.*allow_invalid")
    elif bad == "inf-mean":
        victim = "moving_mean"
        state[victim][0] = np.inf
        expect = (ValueError, "'moving_mean'.*non-finite")
    elif bad == "too-large":
        victim = "moving_mean"
        state[victim] = np.array([1e300, 0, 0])
        expect = (ValueError, "'moving_mean'.*range")
    elif bad == "step":
        victim = "moving_mean/local_step"
        state[victim] = np.asarray(-3)
        expect = (ValueError, "'moving_mean/local_step'.*whole number")
    # The bad entry comes last, after every good one would have been assigned.
    state = {**{k: v for k, v in state.items() if k != victim}, victim: state[victim]}
    with pytest.raises(expect[0], match=expect[1]):
        bn.load_state_dict(state)
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=f"{k} changed although the load was refused")
    if bad in ("nan-variance", "negative-variance", "inf-mean"):
        bn.load_state_dict(state, allow_invalid=True)  # explicitly allowed: loaded as given
        np.testing.assert_array_equal(bn.variables[victim], state[victim].astype(np.float32))


def test_a_refused_state_leaves_an_unbuilt_layer_unbuilt(host_backend, rng):
    bn = cubn.BatchNorm()
    with pytest.raises(TypeError, match="'moving_variance'"):
        bn.load_state_dict({"beta": np.zeros(3), "moving_mean": np.zeros(3), "moving_variance": np.ones(3, complex)})
    assert not bn.built
    with pytest.raises(KeyError, match="missing.*moving_variance"):
        bn.load_state_dict({"beta": np.zeros(3), "moving_mean": np.zeros(3)})
    assert not bn.built
    bn.load_state_dict({"beta": np.zeros(3), "moving_mean": np.arange(3), "moving_variance": [1, 2, 3]})
    assert bn.built and bn.variables["moving_mean"].dtype == np.float32
    np.testing.assert_array_equal(bn.variables["moving_variance"], [1, 2, 3])


# ---------------------------------------------------------------------------
# What cannot be stored is refused; what can is stored
# ---------------------------------------------------------------------------
class _Scaled:
    def forward(self, z):
        return 2 * z

    def backward(self, z, dy):
        return 2 * dy


@pytest.mark.parametrize("arg,kwargs", [
    ("activation_fn", dict(activation_fn=lambda z: z * 2)),
    ("activation_fn", dict(activation_fn=_Scaled())),
    ("adjustment", dict(adjustment=lambda shape: (np.ones(shape[-1]), np.zeros(shape[-1])))),
    ("param_regularizers['gamma']", dict(scale=True, param_regularizers={"gamma": lambda w: (w * w).sum()})),
    ("param_initializers['gamma']", dict(scale=True, param_initializers={"gamma": lambda shape: np.ones(shape)})),
])
def test_what_cannot_be_stored_is_refused_naming_the_argument(host_backend, rng, tmp_path, arg, kwargs):
    bn = cubn.BatchNorm(updates_collections=None, **kwargs)
    if "param_initializers" not in arg:
        bn(rng.standard_normal((4, 3)).astype(np.float32))
    path = tmp_path / "m.npz"
    with pytest.raises(TypeError, match=r"layers\['layer'\].*argument " + re.escape(f"'{arg}'") + " .*cannot be stored"):
        cubn.save(path, bn)
    with pytest.raises(TypeError, match="cannot be stored"):
        bn.get_config()
    assert not path.exists() and _files(tmp_path) == []


def test_what_can_be_stored_round_trips(host_backend, rng, tmp_path):
    regs = {"gamma": cubn.regularizers.l2_regularizer(0.25), "beta": cubn.regularizers.l1_l2_regularizer(0.1, 0.2)}
    bn = cubn.BatchNorm(scale=True, updates_collections=None, activation_fn=cubn.activations.leaky_relu(0.3),
                        param_regularizers=regs, renorm=True, renorm_clipping={"rmax": 2.0}, name="bn1")
    x = (1 + rng.standard_normal((5, 4))).astype(np.float32)
    bn(x)
    unbuilt = cubn.BatchNorm(scale=True, param_initializers={"gamma": np.array([0.5, 1.5, 2.5]), "beta": 0.25},
                             activation_fn="elu")
    path = tmp_path / "m.npz"
    cubn.save(path, [bn, unbuilt])
    a, b = cubn.load(path)
    assert a.get_config() == bn.get_config() and b.get_config() == unbuilt.get_config()
    assert a._act == cubn.activations.leaky_relu(0.3) and a.param_regularizers == regs
    np.testing.assert_array_equal(a(x, is_training=False), bn(x, is_training=False))
    for la, lb in zip(a.losses, bn.losses):
        assert float(la) == float(lb)
    xb = rng.standard_normal((4, 3)).astype(np.float32)
    np.testing.assert_array_equal(b(xb), unbuilt(xb))  # the stored initializers built the same state
    np.testing.assert_array_equal(b.variables["gamma"], [0.5, 1.5, 2.5])


# ---------------------------------------------------------------------------
# Damaged and foreign files: a ValueError naming the path and what is wrong
# ---------------------------------------------------------------------------
def _good(rng, tmp_path):
    path = tmp_path / "good.npz"
    cubn.save(path, {"a": _trained(rng)})
    return path


def _rewrite(path, tmp_path, **changes):
    """The archive with some entries replaced (None: removed)."""
    with np.load(path, allow_pickle=False) as z:
        entries = {k: z[k] for k in z.files}
    for k, v in changes.items():
        k = k.replace("__", "::", 1) if k.startswith("a__") else k
        if v is None:
            entries.pop(k)
        else:
            entries[k] = v
    out = tmp_path / "changed.npz"
    np.savez(out, **entries)
    return out


@pytest.mark.parametrize("case,match", [
    ("truncated", r"'.*truncated\.npz' is not a file written by cubn\.save"),
    ("corrupted", r"'.*corrupted\.npz' (is damaged|is not a file written)"),
    ("empty", r"'.*empty\.npz' is not a file written by cubn\.save"),
    ("text", r"'.*text\.npz' is not a file written by cubn\.save"),
    ("npy", r"'.*npy\.npz' is a single \.npy array"),
    ("foreign npz", r"'.*foreign\.npz' was not written by cubn\.save"),
    ("bad header", r"entry '__cubn_format__' is not the JSON"),
    ("newer format", r"newer cubn"),
    ("missing config", r"entry 'a::__config__' is missing"),
    ("bad config", r"entry 'a::__config__' is not a valid layer configuration"),
    ("wrong shape", r"entry 'a::moving_variance': expected shape \(3,\)"),
    ("wrong dtype", r"entry 'a::gamma': expected real numbers"),
    ("missing entry", r"layer 'a' has the wrong entries.*missing \['moving_variance'\]"),
    ("extra entry", r"layer 'a' has the wrong entries.*unexpected \['bogus'\]"),
    ("nan", r"entry 'a::moving_variance': non-finite"),
])
def test_damaged_and_foreign_files_name_the_path_and_the_problem(rng, tmp_path, case, match):
    good = _good(rng, tmp_path)
    data = good.read_bytes()
    if case == "truncated":
        path = tmp_path / "truncated.npz"
        path.write_bytes(data[: len(data) // 2])
    elif case == "corrupted":
        path = tmp_path / "corrupted.npz"
        b = bytearray(data)
        i = data.index(b"moving_mean") + 200  # inside a member's data: its CRC no longer matches
        b[i : i + 16] = bytes(16)
        path.write_bytes(bytes(b))
    elif case == "empty":
        path = tmp_path / "empty.npz"
        path.write_bytes(b"")
    elif case == "text":
        path = tmp_path / "text.npz"
        path.write_text("moving_mean = [1, 2, 3]\n")
    elif case == "npy":
        path = tmp_path / "npy.npz"
        with open(path, "wb") as fh:
            np.save(fh, np.zeros(3))
    elif case == "foreign npz":
        path = tmp_path / "foreign.npz"
        np.savez(path, a=np.zeros(3))
    elif case == "bad header":
        path = _rewrite(good, tmp_path, __cubn_format__=np.array("{not json"))
    elif case == "newer format":
        path = _rewrite(good, tmp_path, __cubn_format__=np.array('{"kind": "dict", "names": ["a"], "version": 99}'))
    elif case == "missing config":
        path = _rewrite(good, tmp_path, a____config__=None)
    elif case == "bad config":
        path = _rewrite(good, tmp_path, a____config__=np.array('{"decay": 0.5, "momentum": 3}'))
    elif case == "wrong shape":
        path = _rewrite(good, tmp_path, a__moving_variance=np.ones(4, np.float32))
    elif case == "wrong dtype":
        path = _rewrite(good, tmp_path, a__gamma=np.array(["x", "y", "z"]))
    elif case == "missing entry":
        path = _rewrite(good, tmp_path, a__moving_variance=None)
    elif case == "extra entry":
        path = _rewrite(good, tmp_path, a__bogus=np.ones(3))
    else:
        path = _rewrite(good, tmp_path, a__moving_variance=np.array([1.0, np.nan, 1.0], np.float32))
    with pytest.raises(ValueError, match=match):
        cubn.load(path)
    if case == "nan":
        assert np.isnan(cubn.load(path, allow_invalid=True)["a"].variables["moving_variance"][1])
    with pytest.raises(FileNotFoundError):
        cubn.load(tmp_path / "absent.npz")
