"""Launch programs: a repeated kernel-path call replayed from a recording.

The host work of one call on a kernel backend -- the one-launch decision,
grids, vector widths, variants, buffer shapes, the argument tuples with their
scalars converted -- depends only on what a call's *signature* holds: shapes,
dtypes, the 16-byte alignment of the tensors, the scalar arguments, the
device and the scoped options. So the second call of a signature (a shape
called once never pays for a recording) runs the ordinary code on a
recording copy of the backend, and what it did becomes a
[`Program`][Program]: which buffers to allocate, and for each launch the kernel,
grid, block, shared bytes and the argument tuple with slots for the inputs
and the new buffers. A repeated call is a dict lookup, the allocations and
the launches.

A recording becomes a program only when the replay provably does the same:

* every array a launch or the result touches is an input of the call, or a
  view (the whole, a row, a run of rows, a reshape) of a buffer the backend
  made with ``xp.empty`` / ``xp.zeros`` during the call, or a buffer the
  backend keeps across calls and marked persistent (``backends._memory``:
  the fused statistics' counters, left as found by every launch), which the
  program passes as it is;
* every other use of the array module (a conversion, arithmetic, a copy) and
  every read of an ``empty`` buffer before a launch wrote it makes the
  signature uncacheable (it always runs the ordinary code);
* the backend asked the address of nothing but the inputs whose alignment
  the key holds and the new buffers (allocators return at least 16-byte
  aligned memory: NumPy's ``malloc``, CuPy's pool; checked when recording);
* one input's memory never stands for two argument slots unless the key
  says they are the same object.

The kernel backend never reads a device value back on the host (its module
says so), so values cannot change the launches. What else changes them is
in the key or in where the program lives: ``cubn.use_one_launch`` is part
of every key; ``cubn.use_backend`` and the device pick another backend
object, and each backend keeps its own programs (a bounded LRU dict shared
by all threads, gone with the backend); ``cubn.set_num_threads`` only
concerns the NumPy backend, which has no programs. A recording runs on the
calling thread's own copy of the backend.
"""
from __future__ import annotations

import copy
import threading
import weakref
from collections import OrderedDict

import numpy as np

from .backends import _memory

MAX_ENTRIES = 512  # programs per backend
# Recordings per group (an op at one shape): a scalar that changes with every
# call (a factor of 1/t given to fused_batch_norm) would otherwise record each
# call and evict the programs that are reused. Past the limit the group runs
# the ordinary code.
MAX_RECORDINGS_PER_GROUP = 64

UNCACHEABLE = object()  # a signature whose calls always run the ordinary code
SEEN = object()  # a signature called once: the next call records (one-off shapes never pay for it)

_lock = threading.Lock()
_enabled = True
_generation = 0  # bumped by clear(): a program a caller kept from before is not used again
_all = weakref.WeakSet()  # every backend's programs, for clear()
stats = {"recorded": 0, "uncacheable": 0, "last_reason": None}  # for diagnostics


class _Programs:
    """One backend's programs (kept on the backend, so they go with it)."""

    __slots__ = ("entries", "recordings", "__weakref__")

    def __init__(self):
        self.entries = OrderedDict()
        self.recordings = {}


def _programs(backend) -> _Programs:
    p = backend.__dict__.get("_launch_programs")
    if p is None:
        with _lock:
            p = backend.__dict__.get("_launch_programs")
            if p is None:
                p = backend.__dict__["_launch_programs"] = _Programs()
                _all.add(p)
    return p


def lookup(backend, key):
    """The program of ``key`` on ``backend``; None: record this call; [`UNCACHEABLE`][UNCACHEABLE]:
    run the ordinary code (a signature that cannot be replayed, or seen for the first time)."""
    p = backend.__dict__.get("_launch_programs")
    if p is None:
        p = _programs(backend)
    entries = p.entries
    try:
        entry = entries[key]
    except KeyError:
        store(backend, key, SEEN)
        return UNCACHEABLE
    except TypeError:  # an unhashable key part: never cached
        return UNCACHEABLE
    if entry is SEEN:
        return None
    try:
        entries.move_to_end(key)  # one C call: atomic under the GIL, like the lookup
    except KeyError:  # evicted meanwhile
        pass
    return entry


def store(backend, key, entry) -> None:
    entries = _programs(backend).entries
    with _lock:
        entries[key] = entry
        entries.move_to_end(key)
        while len(entries) > MAX_ENTRIES:
            entries.popitem(last=False)


def may_record(backend, group) -> bool:
    """Whether a call of ``group`` (hashable) may still be recorded on ``backend``; counts it."""
    rec = _programs(backend).recordings
    with _lock:
        n = rec.get(group, 0)
        if n >= MAX_RECORDINGS_PER_GROUP:
            return False
        if len(rec) >= 16 * MAX_ENTRIES:
            rec.clear()
        rec[group] = n + 1
        return True


def program_of(backend, key):
    """The [`Program`][Program] stored for ``key`` on ``backend``, or None; touches nothing.

    For callers that keep a program next to a plan of their own (the layers):
    they hold it with the [`generation`][generation] it came from and use it
    only while that is current and the cache [`enabled`][enabled].
    """
    p = backend.__dict__.get("_launch_programs")
    if p is None:
        return None
    try:
        entry = p.entries.get(key)
    except TypeError:
        return None
    return entry if isinstance(entry, Program) else None


def generation() -> int:
    return _generation


def clear() -> None:
    """Forget every program (the next call of each signature records again)."""
    global _generation
    with _lock:
        _generation += 1
        for p in list(_all):
            p.entries.clear()
            p.recordings.clear()


def size() -> int:
    """Programs (and uncacheable signatures) held, over all backends."""
    return sum(len(p.entries) for p in list(_all))


def enabled() -> bool:
    return _enabled


def set_enabled(on: bool) -> None:
    """Turn the cache off (every call runs the ordinary code) or on again; tests compare both.
    The programs stay: turning it off changes which code runs, never what a program means."""
    global _enabled
    _enabled = bool(on)


# ---------------------------------------------------------------------------
# Replay
# ---------------------------------------------------------------------------
class Program:
    """What one signature's call does on the device: allocate, launch, return.

    ``run(inputs)`` is generated straight-line code (one statement per
    allocation, view and launch, the constants bound by name), which is
    what a replay costs beside the launches themselves.
    """

    __slots__ = ("roots", "views", "launches", "outputs", "run", "source")

    def __init__(self, xp, roots, views, launches, outputs):
        self.roots = roots        # ((zeroed, shape, dtype), ...)
        self.views = views        # ((root, kind, arg), ...): "root", "row", "rows", "reshape", "rowshape"
        self.launches = launches  # ((launcher, kernel, grid, block, shared, template, fills), ...)
        self.outputs = outputs    # per output: input index >= 0, ~view index < 0, or None
        env = {"_empty": xp.empty, "_zeros": xp.zeros}
        lines = ["def run(inputs):"]
        if any(s is not None and s >= 0 for s in outputs) or any(
                src >= 0 for *_, fills in launches for _, src in fills):
            n = 1 + max([s for s in outputs if s is not None and s >= 0]
                        + [src for *_, fills in launches for _, src in fills if src >= 0] + [0])
            lines.append("    " + ", ".join(f"i{k}" for k in range(n)) + (",", "")[n > 1] + f" = inputs[:{n}]"
                         if n > 1 else "    i0 = inputs[0]")
        for k, (z, shape, dtype) in enumerate(roots):
            env[f"_s{k}"], env[f"_d{k}"] = shape, dtype
            lines.append(f"    r{k} = {'_zeros' if z else '_empty'}(_s{k}, _d{k})")
        for k, (r, kind, arg) in enumerate(views):
            if kind == "root":
                lines.append(f"    v{k} = r{r}")
            elif kind == "row":
                lines.append(f"    v{k} = r{r}[{int(arg)}]")
            elif kind == "rows":
                lines.append(f"    v{k} = r{r}[{int(arg[0])}:{int(arg[1])}]")
            elif kind == "reshape":
                env[f"_v{k}"] = arg
                lines.append(f"    v{k} = r{r}.reshape(_v{k})")
            else:
                env[f"_v{k}"] = arg[1]
                lines.append(f"    v{k} = r{r}[{int(arg[0])}].reshape(_v{k})")

        def name(src):
            return f"i{src}" if src >= 0 else f"v{~src}"

        for j, (launcher, kernel, grid, block, shared, template, fills) in enumerate(launches):
            # the launcher's launch is looked up at each call: whoever wraps it later is obeyed
            env[f"_L{j}"], env[f"_k{j}"], env[f"_g{j}"], env[f"_b{j}"], env[f"_sh{j}"] = (
                launcher, kernel, grid, block, shared)
            items = []
            filled = dict(fills)
            for pos, c in enumerate(template):
                if pos in filled:
                    items.append(name(filled[pos]))
                elif c is None:
                    items.append("None")
                else:
                    env[f"_c{j}_{pos}"] = c
                    items.append(f"_c{j}_{pos}")
            lines.append(f"    _L{j}.launch(_k{j}, _g{j}, _b{j}, _sh{j}, ({', '.join(items)},))")
        lines.append("    return [" + ", ".join("None" if o is None else name(o) for o in outputs) + "]")
        self.source = "\n".join(lines) + "\n"
        code = _compiled.get(self.source)  # the text holds the structure only: shapes of one kind share it
        if code is None:
            code = compile(self.source, "<cubn launch program>", "exec")
            if len(_compiled) < 4 * MAX_ENTRIES:
                _compiled[self.source] = code
        exec(code, env)  # noqa: S102 - our own text
        self.run = env["run"]


_compiled: dict = {}  # program text -> code object


# ---------------------------------------------------------------------------
# Recording
# ---------------------------------------------------------------------------
class _Impure(Exception):
    pass


class _RecordingXp:
    """The array module as a recorded call sees it: allocations are noted,
    a no-op ``ascontiguousarray`` passes, anything else marks the call impure."""

    def __init__(self, xp, rec):
        self._xp, self._rec = xp, rec
        self.ndarray = xp.ndarray

    def empty(self, shape, dtype=float, order="C"):
        a = self._xp.empty(shape, dtype, order)
        self._rec.alloc(a, order == "C", False)
        return a

    def zeros(self, shape, dtype=float, order="C"):
        a = self._xp.zeros(shape, dtype, order)
        self._rec.alloc(a, order == "C", True)
        return a

    def ascontiguousarray(self, a, dtype=None):
        out = self._xp.ascontiguousarray(a, dtype=dtype)
        if out is not a:
            self._rec.impure = "a copy (ascontiguousarray)"
        return out

    def __getattr__(self, name):
        if not self._rec.closed:
            self._rec.impure = self._rec.impure or name
        return getattr(self._xp, name)


class _RecordingLauncher:
    def __init__(self, launcher, rec):
        self._launcher, self._rec = launcher, rec
        self.name, self.xp = launcher.name, launcher.xp

    def get(self, variant):
        kernel = self._launcher.get(variant)
        self._rec.variants[id(kernel)] = (kernel, variant)
        return kernel

    def launch(self, kernel, grid, block, shared_bytes, args):
        if not self._rec.closed:
            self._rec.launches.append((kernel, grid, block, shared_bytes, args))
        self._launcher.launch(kernel, grid, block, shared_bytes, args)

    def __getattr__(self, name):
        return getattr(self._launcher, name)


class Recording:
    """One recorded call: ``rec.backend`` is the backend to run it on."""

    def __init__(self, backend):
        self.real = backend
        self.allocs: dict = {}      # id(root) -> (index, root, zeroed)
        self.alloc_order: list = []
        self.launches: list = []
        self.variants: dict = {}
        self.impure = False
        self.closed = False
        self.probed: list = []
        b = copy.copy(backend)
        b.xp = _RecordingXp(backend.xp, self)
        b.launcher = _RecordingLauncher(backend.launcher, self)
        self.backend = b

    def alloc(self, a, c_order, zeroed):
        if self.closed:
            return
        if not c_order:
            self.impure = "an allocation not in C order"
        self.allocs[id(a)] = (len(self.alloc_order), a, zeroed)
        self.alloc_order.append(a)

    def __enter__(self):
        _memory.start_probe(self.probed)
        return self

    def __exit__(self, *exc):
        _memory.stop_probe()
        self.closed = True

    # -- analysis -------------------------------------------------------------
    def program(self, inputs, outputs, keyed_alignment=(), aliases=()):
        """The [`Program`][Program] of this recording, or [`UNCACHEABLE`][UNCACHEABLE].

        ``inputs``: the call's input arrays (None allowed) in the order a
        replay passes them; ``outputs``: the arrays (or None) the call
        returned; ``keyed_alignment``: indices of the inputs whose alignment
        the key holds; ``aliases``: groups of input indices that the key
        says are one object whenever they share memory (an in-place update).
        """
        try:
            prog = self._analyse(inputs, outputs, set(keyed_alignment), {frozenset(g) for g in aliases})
        except _Impure as e:
            stats["uncacheable"] += 1
            stats["last_reason"] = str(e)
            return UNCACHEABLE
        stats["recorded"] += 1
        return prog

    def _analyse(self, inputs, outputs, keyed, aliases):
        if self.impure:
            raise _Impure(f"the array module was used for {self.impure}")
        for a in self.alloc_order:
            if a.size and _memory.pointer(a) % _memory.VECTOR_BYTES:
                raise _Impure("an allocation not aligned to 16 bytes")
        memo = {}  # every array here stays alive (the recording holds them) while the memo lives
        geo = [None if a is None else _geometry(a, memo) for a in inputs]
        roots, views, view_index = [], [], {}
        root_index = {}
        written = set()  # (root, view) regions a launch has written; (root, None): the whole root

        def source(a, for_read, check=True):
            g = _geometry(a, memo)
            matches = [i for i, gi in enumerate(geo) if gi == g and inputs[i] is not None]
            if matches:
                if len(matches) > 1 and (frozenset(matches) not in aliases
                                         or len({id(inputs[i]) for i in matches}) != 1):
                    raise _Impure("one memory in two input slots")
                return matches[0]
            r = a
            while id(r) not in self.allocs:
                r = r.base
                if r is None:
                    raise _Impure("memory the call neither got nor allocated")
            idx, root, zeroed = self.allocs[id(r)]
            if idx not in root_index:
                root_index[idx] = len(roots)
                roots.append((zeroed, tuple(root.shape), root.dtype))
            ri = root_index[idx]
            v = (ri,) + _recipe(a, root, g[0] - _geometry(root, memo)[0])
            if v not in view_index:
                view_index[v] = len(views)
                views.append(v)
            vi = view_index[v]
            if check:
                if for_read and not zeroed and (ri, None) not in written and (ri, vi) not in written and a.size:
                    raise _Impure("a new buffer read before a launch wrote it")
                if not for_read:
                    written.add((ri, None) if v[1] == "root" or (v[1] == "reshape") else (ri, vi))
            return ~vi

        probed_ok = {id(a) for a in self.alloc_order}
        for a in self.probed:
            if _memory.is_persistent(a):
                continue
            g = _geometry(a, memo)
            hit = [i for i, gi in enumerate(geo) if gi == g and inputs[i] is not None]
            if hit:
                if not all(i in keyed for i in hit):
                    raise _Impure("the address of an input the key does not align was asked")
                continue
            r = a
            while r is not None and id(r) not in probed_ok:
                r = r.base
            if r is None:
                raise _Impure("the address of an array neither given nor allocated was asked")

        launches = []
        for kernel, grid, block, shared, args in self.launches:
            entry = self.variants.get(id(kernel))
            if entry is None or entry[0] is not kernel or len(entry[1].spec.arguments) != len(args):
                raise _Impure("a launch of a kernel not got through the launcher")
            spec_args = entry[1].spec.arguments
            template, fills = list(args), []
            # reads first: a kernel reading and writing one buffer reads what was there
            order = sorted(range(len(args)), key=lambda k: not spec_args[k].const)
            for pos in order:
                a = args[pos]
                if not _is_array(a):
                    continue
                if _memory.is_persistent(a):
                    continue  # a backend's persistent buffer: the replay passes this very one
                fills.append((pos, source(a, for_read=spec_args[pos].const)))
                template[pos] = None
            fills.sort()
            launches.append((self.real.launcher, kernel, tuple(grid), tuple(block), shared,
                             tuple(template), tuple(fills)))
        outs = []
        for a in outputs:
            if a is None:
                outs.append(None)
            elif not _is_array(a):
                raise _Impure("a result that is not an array")
            else:
                s = source(a, for_read=True)
                outs.append(s)
        return Program(self.real.xp, tuple(roots), tuple(views), tuple(launches), tuple(outs))


def _is_array(a) -> bool:
    if isinstance(a, np.ndarray):
        return True
    return not isinstance(a, np.generic) and hasattr(a, "__cuda_array_interface__")


def _geometry(a, _memo=None):
    """(address, shape, strides, dtype) of ``a``; ``_memo``: id -> geometry of arrays alive meanwhile."""
    if _memo is not None:
        g = _memo.get(id(a))
        if g is None:
            g = _memo[id(a)] = (_memory.pointer(a), tuple(a.shape), tuple(a.strides), a.dtype)
        return g
    return (_memory.pointer(a), tuple(a.shape), tuple(a.strides), a.dtype)


def _recipe(a, root, off):
    """How a replay makes the view ``a`` of ``root`` (``off`` bytes into it): (kind, arg)."""
    shape, strides = tuple(a.shape), tuple(a.strides)
    rshape, rstrides = tuple(root.shape), tuple(root.strides)
    if off == 0 and shape == rshape and strides == rstrides:
        return ("root", None)
    if len(rshape) >= 2 and rstrides[0] and off % rstrides[0] == 0:
        i = off // rstrides[0]
        if shape == rshape[1:] and strides == rstrides[1:] and 0 <= i < rshape[0]:
            return ("row", i)
        if len(shape) == len(rshape) and shape[1:] == rshape[1:] and strides == rstrides and \
                0 <= i and i + shape[0] <= rshape[0]:
            return ("rows", (i, i + shape[0]))
    if off == 0 and a.size == root.size and a.flags.c_contiguous and root.flags.c_contiguous:
        return ("reshape", shape)
    if len(rshape) >= 2 and rstrides[0] and off % rstrides[0] == 0 and root.flags.c_contiguous and \
            a.flags.c_contiguous and a.size == root[0].size and 0 <= off // rstrides[0] < rshape[0]:
        return ("rowshape", (off // rstrides[0], shape))
    raise _Impure("a view other than a row, rows or a reshape")
