"""How the NumPy backend cuts an ``(outer, C, inner)`` array into cache-sized chunks.

Every primitive of the NumPy backend is one pass over its tensors, chunk by
chunk: a chunk (a few hundred KiB) is read from memory once, worked on in the
L2 cache with in-place ufuncs, and its reductions summed to a few numbers.
Three layouts, chosen from the shape alone:

* **whole** (small arrays): one chunk, the array itself; parameters shaped
  ``(C, 1)``; reductions over axes (0, 2).
* **rows** (a channel's contiguous runs are short: channels last, small
  feature maps): the array is the matrix ``(outer, C*inner)``; when a row is
  narrow, ``g`` consecutive rows form one wide row (``g*C*inner`` elements),
  and when it is very wide it is cut into column blocks of whole channels. A
  per-channel parameter becomes one row of that width (the channel pattern
  repeated), broadcast down the chunk; reductions sum a chunk's rows (axis 0,
  long vectorized loops, no transpose) into its task's slot, and the columns
  are folded into channels once, at the end.
* **runs** (a channel's runs are long: NCHW with large feature maps): a chunk
  is a few rows of one channel, ``x3[o0:o1, c, :]``, or a piece of one long
  row; parameters are scalars; reductions give one number per chunk.

Chunks are grouped into tasks, the unit a thread takes. A task accumulates
its chunks' sums in its own slot; the slots are merged in float64, in task
order. Both the cut and the merge order depend on the shape alone, never on
the number of threads, so results are bitwise identical for any thread count.
"""
from __future__ import annotations

import functools
import threading

import numpy as np

from .. import _threads

# One chunk of the accumulation dtype: with the chunk of x it fits in a 1 MiB
# L2. Each chunk costs a few dozen NumPy calls whatever its size, so chunks as
# large as the cache allows (512 KiB ran faster than 256 KiB on most shapes
# of the CPU benchmark; 1 MiB took 5-15% less CPU time again on the 7x7
# shapes of a 2-core AMD EPYC with 2 MiB of L2 a core, but the threads' chunk
# buffers, kept from call to call, then reach a quarter of an 8 MiB input).
CHUNK_BYTES = 512 << 10
SMALL_ELEMENTS = 8192     # up to this many elements: one chunk, no pool
WIDE = 8192               # target width (elements) of a rows-layout row (wider rows: fewer, longer loops)
WIDE_MAX = 16384          # rows up to this wide are kept whole
MIN_WIDE_ROWS = 32        # a rows layout has at least this many (wide) rows where the input has them
RUN_MIN = 1024            # a channel's contiguous run at least this long: the runs layout
PIECE = 1024              # long runs are summed as (k, PIECE) blocks down axis 0
MAX_CHUNKS_PER_TASK = 8
MIN_TASKS = 32            # split into at least this many tasks where there are chunks enough
ROWS_PER_SLOT = 64        # a rows-layout task sums at least this many rows into its slot (slots <= 1/64 of the data)


# ---------------------------------------------------------------------------
# Per-thread scratch
# ---------------------------------------------------------------------------
_local = threading.local()


def scratch(slot: int, n: int, dtype) -> np.ndarray:
    """A flat, uninitialized buffer of at least ``n`` elements, this thread's own, reused across calls."""
    bufs = _local.__dict__.setdefault("bufs", {})
    key = (slot, dtype)
    b = bufs.get(key)
    if b is None or b.size < n:
        b = bufs[key] = np.empty(n, dtype)
    return b[:n]


def zeros(n: int, dtype) -> np.ndarray:
    """A flat buffer of ``n`` zeros, this thread's own (never written)."""
    return _zeros(n, np.dtype(dtype))


def _zeros(n, dtype):
    z = _local.__dict__.setdefault("zeros", {})
    b = z.get(dtype)
    if b is None or b.size < n:
        b = z[dtype] = np.zeros(n, dtype)
    return b[:n]


def _task_size(n_chunks: int) -> int:
    return max(1, min(MAX_CHUNKS_PER_TASK, n_chunks // MIN_TASKS))


# ---------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------
class Whole:
    """The array as one chunk (small arrays): ``(outer, C, inner)`` views, ``(C, 1)`` parameters.

    Runs in the calling thread, with fresh temporaries: for arrays this small
    the cost is the number of NumPy calls, not memory.
    """

    kind = "whole"
    n_tasks = 1

    def __init__(self, outer, channels, inner):
        self.outer, self.channels, self.inner = outer, channels, inner
        self.shape = (outer, channels, inner)

    def run(self, kernel, arrays, params, n_red, acc, outer_weights=None, bufsize=None):
        p = tuple(None if v is None else v[:, None] for v in params)
        w = None if outer_weights is None else outer_weights[:, None, None]
        shape = self.shape
        out = kernel(arrays, p, w, _red_whole, lambda slot, dtype=acc: np.empty(shape, dtype), _scalar_zero)
        if n_red:
            return tuple(np.asarray(v, np.float64) for v in out)
        return None


def _scalar_zero():
    return 0


def _red_whole(t):
    return np.add.reduce(t, axis=(0, 2))


def _red_rows(t):
    return np.add.reduce(t, axis=0)


def _red_run(t):
    """Sum of a (rows, L) chunk of one channel: rows down axis 0, then the run in PIECE blocks."""
    if t.shape[0] > 1:
        t = np.add.reduce(t, axis=0)
    else:
        t = t[0]
    n = t.shape[0]
    # (k, w) blocks summed down axis 0 (k terms in order, vectorized), then the
    # w column sums pairwise; w grows with the run so that k stays <= 16.
    w = -(-n // (16 * PIECE)) * PIECE
    k = n // w
    if k >= 4:
        s = np.add.reduce(np.add.reduce(t[: k * w].reshape(k, w), axis=0))
        if n > k * w:
            s = s + np.add.reduce(t[k * w :])
        return s
    return np.add.reduce(t)


def _pairwise(vs):
    """Sum a list of arrays in a balanced tree (fewer roundings than a running sum)."""
    while len(vs) > 1:
        vs = [vs[i] + vs[i + 1] if i + 1 < len(vs) else vs[i] for i in range(0, len(vs), 2)]
    return vs[0]


def _sum_pairwise(a):
    """Sums over axis 1 of a small 3-D array (k, m, w), in float64; pairwise for float64 terms
    (NumPy sums a contiguous axis pairwise, any other axis one term after another). Terms of
    lower precision are summed in order: float64 has digits to spare for them."""
    if a.shape[1] == 1:
        return a[:, 0].astype(np.float64)
    if a.shape[1] <= 32 or a.dtype.itemsize < 8:
        return np.add.reduce(a, axis=1, dtype=np.float64)
    return np.add.reduce(np.ascontiguousarray(a.transpose(0, 2, 1), dtype=np.float64), axis=2)


def _fold_groups(cols, groups, width):
    """(k, groups * width) -> (k, width): the groups summed by halving, a balanced tree."""
    while groups > 1:
        half = groups // 2
        folded = cols[:, : half * width] + cols[:, half * width : 2 * half * width]
        if groups % 2:
            folded[:, :width] += cols[:, 2 * half * width :]
        cols, groups = folded, half
    return cols


class _Panel:
    """One matrix view of a rows layout and the channels its columns hold."""

    __slots__ = ("kind", "rows", "width", "groups", "c0", "c1", "start", "chunk_rows")

    def __init__(self, kind, rows, width, groups, c0, c1, start, chunk_rows):
        self.kind, self.rows, self.width, self.groups = kind, rows, width, groups
        self.c0, self.c1, self.start, self.chunk_rows = c0, c1, start, chunk_rows


class Rows:
    """The matrix ``(outer, C*inner)``: wide rows of ``g`` rows, or column blocks of whole channels."""

    kind = "rows"

    def __init__(self, outer, channels, inner, chunk):
        self.outer, self.channels, self.inner = outer, channels, inner
        p = channels * inner
        self.period = p
        panels = []
        if p <= WIDE_MAX:
            # at least MIN_WIDE_ROWS wide rows: a call's row-sized buffers (parameter
            # rows, column sums) stay a small fraction of a small input
            g = max(1, min(WIDE // p, outer // MIN_WIDE_ROWS))
            w = g * p
            nw, tail = divmod(outer, g)
            if nw:
                panels.append(_Panel("wide", nw, w, g, 0, channels, 0, max(1, chunk // w)))
            if tail:
                panels.append(_Panel("tail", 1, tail * p, tail, 0, channels, nw * w, 1))
        else:
            cb = max(1, WIDE // inner)
            for c0 in range(0, channels, cb):
                c1 = min(channels, c0 + cb)
                w = (c1 - c0) * inner
                panels.append(_Panel("block", outer, w, 1, c0, c1, c0 * inner, max(1, chunk // w)))
        self.panels = panels
        n_chunks = sum(-(-pn.rows // pn.chunk_rows) for pn in panels)
        k = max(_task_size(n_chunks), -(-ROWS_PER_SLOT // panels[0].chunk_rows))
        tasks, ranges = [], []
        for i, pn in enumerate(panels):
            t0 = len(tasks)
            step = k * pn.chunk_rows
            for r0 in range(0, pn.rows, step):
                tasks.append((i, r0, min(pn.rows, r0 + step)))
            ranges.append((t0, len(tasks)))
        self.tasks = tasks
        self.task_ranges = ranges
        self.n_tasks = len(tasks)
        # without reductions there are no slots to keep few: a task per chunk balances the threads
        self.chunk_tasks = [(i, r0, min(pn.rows, r0 + pn.chunk_rows)) for i, pn in enumerate(panels)
                            for r0 in range(0, pn.rows, pn.chunk_rows)]
        # A task's slot: its column sums (wide and tail panels), or its
        # channels' sums (column blocks, folded at the end of the task: a
        # block may have few rows, and its column sums would be many).
        self.slot_width = max(pn.width if pn.kind != "block" else pn.c1 - pn.c0 for pn in panels)
        # Elementwise kernels (no reductions) on column blocks walk the matrix in
        # memory order instead: a block's rows are short runs far apart, which
        # stream from memory at about half the speed of one long run. A chunk is
        # h whole rows, or a piece of one row; parameters are rows of the whole
        # width (kept only while they are a small part of the input).
        self.seq_tasks = None
        if panels[0].kind == "block":
            if p <= chunk:
                h = chunk // p
                pieces = [(r0, min(outer, r0 + h), 0, p) for r0 in range(0, outer, h)]
            else:
                cuts = [(c0, min(p, c0 + chunk)) for c0 in range(0, p, chunk)]
                pieces = [(r, r + 1, c0, c1) for r in range(outer) for c0, c1 in cuts]
            k = _task_size(len(pieces))
            self.seq_tasks = [pieces[a : a + k] for a in range(0, len(pieces), k)]

    def views(self, a3):
        """The panels of ``a3`` (C-contiguous, shape (outer, C, inner)) as 2-D views."""
        flat = a3.reshape(-1)
        out = []
        for pn in self.panels:
            if pn.kind == "block":
                out.append(a3.reshape(self.outer, self.period)[:, pn.start : pn.start + pn.width])
            else:
                out.append(flat[pn.start : pn.start + pn.rows * pn.width].reshape(pn.rows, pn.width))
        return out

    def _param_row(self, v, pn):
        """A per-channel (C,) vector as the parameter row of panel ``pn`` (the channel pattern repeated)."""
        v = v[pn.c0 : pn.c1]
        if self.inner == 1 and pn.groups == 1:
            return v
        row = np.empty(pn.groups * (pn.c1 - pn.c0) * self.inner, v.dtype)
        row.reshape(pn.groups, pn.c1 - pn.c0, self.inner)[...] = v[:, None]
        return row

    def _weights(self, wo, pn, r0, r1):
        """Outer-index weights ``wo`` (outer,) for rows [r0, r1) of panel ``pn``, shaped to broadcast."""
        if pn.kind == "block":
            return wo[r0:r1, None]
        g = pn.groups
        if pn.kind == "tail":
            return np.repeat(wo[self.outer - g :], self.period)[None, :]
        return np.repeat(wo[r0 * g : r1 * g], self.period).reshape(r1 - r0, pn.width)

    def run(self, kernel, arrays, params, n_red, acc, outer_weights=None, bufsize=None):
        if not n_red and self.seq_tasks is not None:
            n_rows = sum(v is not None for v in params)
            if n_rows * self.period * np.dtype(acc).itemsize * 8 <= arrays[0].nbytes:  # rows <= 1/8 of the input
                return self._run_in_order(kernel, arrays, params, acc, outer_weights, bufsize)
        views = [None if a is None else self.views(a) for a in arrays]
        panels, tasks = self.panels, (self.tasks if n_red else self.chunk_tasks)
        # Wide and tail panels share one parameter row (the tail's is a prefix
        # of the wide one's); column blocks build theirs per task, so that no
        # row as wide as the whole matrix is ever held.
        shared = {}
        for i, pn in enumerate(panels):
            if pn.kind != "block":
                if "row" not in shared:
                    shared["row"] = tuple(None if v is None else self._param_row(v, pn) for v in params)
                shared[i] = tuple(None if r is None else r[: pn.width] for r in shared["row"])
        slots = np.empty((n_red, self.n_tasks, self.slot_width), acc)
        inner = self.inner

        def task(t):
            i, r0, r1 = tasks[t]
            pn = panels[i]
            vs = [None if v is None else v[i] for v in views]
            ps = shared.get(i)
            if ps is None:
                ps = tuple(None if v is None else self._param_row(v, pn) for v in params)
            h, w = pn.chunk_rows, pn.width
            parts = []
            for a in range(r0, r1, h):
                b = min(r1, a + h)
                cw = None if outer_weights is None else self._weights(outer_weights, pn, a, b)
                shape, n = (b - a, w), (b - a) * w
                out = kernel(tuple(None if v is None else v[a:b] for v in vs), ps, cw, _red_rows,
                             lambda slot, dtype=acc: scratch(slot, n, dtype).reshape(shape),
                             lambda: zeros(n, acc).reshape(shape))
                if n_red:
                    parts.append(out)
            if not n_red:
                return
            sums = [_pairwise([o[j] for o in parts]) for j in range(n_red)]
            for j in range(n_red):
                if pn.kind == "block":
                    slots[j, t, : pn.c1 - pn.c0] = np.add.reduce(sums[j].reshape(pn.c1 - pn.c0, inner), axis=1)
                else:
                    slots[j, t, :w] = sums[j]

        _threads.run(len(tasks), task, bufsize or _threads.UFUNC_BUFSIZE)
        if not n_red:
            return None
        return tuple(self._merge(slots))

    def _run_in_order(self, kernel, arrays, params, acc, outer_weights, bufsize):
        """An elementwise kernel over the (outer, C*inner) matrix in memory order (see seq_tasks)."""
        p = self.period
        mats = [None if a is None else a.reshape(self.outer, p) for a in arrays]
        whole = _Panel("wide", self.outer, p, 1, 0, self.channels, 0, 1)
        rows = tuple(None if v is None else self._param_row(v, whole) for v in params)
        tasks = self.seq_tasks
        # one view of the parameter rows per column range, the same object for every chunk
        cut = {c: tuple(None if r is None else r[c[0] : c[1]] for r in rows) for c in {t[2:] for ts in tasks for t in ts}}

        def task(t):
            for r0, r1, c0, c1 in tasks[t]:
                shape, n = (r1 - r0, c1 - c0), (r1 - r0) * (c1 - c0)
                cw = None if outer_weights is None else outer_weights[r0:r1, None]
                kernel(tuple(None if m is None else m[r0:r1, c0:c1] for m in mats), cut[c0, c1], cw, _red_rows,
                       lambda slot, dtype=acc: scratch(slot, n, dtype).reshape(shape),
                       lambda: zeros(n, acc).reshape(shape))

        _threads.run(len(tasks), task, bufsize or _threads.UFUNC_BUFSIZE)
        return None

    def _merge(self, slots):
        """Task slots (n_red, tasks, width) -> per-channel float64 sums (n_red, C), in task order."""
        n_red = slots.shape[0]
        out = np.zeros((n_red, self.channels), np.float64)
        for pn, (t0, t1) in zip(self.panels, self.task_ranges):
            cb = pn.c1 - pn.c0
            if pn.kind == "block":
                out[:, pn.c0 : pn.c1] += _sum_pairwise(slots[:, t0:t1, :cb])
                continue
            if slots.dtype.itemsize < 8:  # tasks and groups in one float64 sum: digits to spare
                part = slots[:, t0:t1, : pn.width].reshape(n_red, (t1 - t0) * pn.groups, cb * self.inner)
                cols = np.add.reduce(part, axis=1, dtype=np.float64)      # (n_red, cb * inner)
            else:
                cols = _sum_pairwise(slots[:, t0:t1, : pn.width])         # (n_red, groups * cb * inner)
                cols = _fold_groups(cols, pn.groups, cb * self.inner)
            out[:, pn.c0 : pn.c1] += cols if self.inner == 1 else np.add.reduce(cols.reshape(n_red, cb, self.inner), axis=2)
        return out


class Runs:
    """Chunks of one channel each: ``x3[o0:o1, c, i0:i1]``, scalar parameters."""

    kind = "runs"

    def __init__(self, outer, channels, inner, chunk):
        self.outer, self.channels, self.inner = outer, channels, inner
        if inner <= chunk:
            ob = max(1, min(64, chunk // inner))  # rows summed in order: at most 64
            chunks = [(o0, min(outer, o0 + ob), c, 0, inner) for o0 in range(0, outer, ob) for c in range(channels)]
            self.grid = (len(chunks) // channels, channels, 1)
        else:
            piece = max(PIECE, chunk // PIECE * PIECE)
            cuts = [(i0, min(inner, i0 + piece)) for i0 in range(0, inner, piece)]
            chunks = [(o, o + 1, c, i0, i1) for o in range(outer) for c in range(channels) for i0, i1 in cuts]
            self.grid = (outer, channels, len(cuts))
        self.chunks = chunks
        k = _task_size(len(chunks))
        self.tasks = [(a, min(len(chunks), a + k)) for a in range(0, len(chunks), k)]
        self.n_tasks = len(self.tasks)

    def run(self, kernel, arrays, params, n_red, acc, outer_weights=None, bufsize=None):
        chunks, tasks = self.chunks, self.tasks
        scal = [None if v is None else v for v in params]
        results = np.empty((n_red, len(chunks)), np.float64)

        def task(t):
            a, b = tasks[t]
            for k in range(a, b):
                o0, o1, c, i0, i1 = chunks[k]
                vs = tuple(None if v is None else v[o0:o1, c, i0:i1] for v in arrays)
                ps = tuple(None if v is None else v[c] for v in scal)
                cw = None if outer_weights is None else outer_weights[o0:o1, None]
                shape, n = (o1 - o0, i1 - i0), (o1 - o0) * (i1 - i0)
                out = kernel(vs, ps, cw, _red_run, lambda slot, dtype=acc: scratch(slot, n, dtype).reshape(shape),
                             lambda: zeros(n, acc).reshape(shape))
                for j in range(n_red):
                    results[j, k] = out[j]

        _threads.run(self.n_tasks, task, bufsize or _threads.UFUNC_BUFSIZE)
        if not n_red:
            return None
        # chunk k = (a * C + c) * B + b: per channel, its chunks' sums pairwise
        a, c, b = self.grid
        return tuple(_sum_pairwise(results.reshape(n_red, a, c, b).transpose(0, 1, 3, 2).reshape(n_red, a * b, c)))


@functools.lru_cache(maxsize=256)
def layout(outer: int, channels: int, inner: int, itemsize: int):
    """The chunking of an (outer, C, inner) array whose temporaries have ``itemsize`` bytes."""
    n = outer * channels * inner
    if n <= SMALL_ELEMENTS:
        return Whole(outer, channels, inner)
    chunk = max(PIECE, CHUNK_BYTES // itemsize)
    if inner >= RUN_MIN:
        return Runs(outer, channels, inner, chunk)
    return Rows(outer, channels, inner, chunk)


def chunk_elements(itemsize: int) -> int:
    return max(PIECE, CHUNK_BYTES // itemsize)


