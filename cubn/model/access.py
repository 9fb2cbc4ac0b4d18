"""From a traced launch's accesses to traffic and coalescing numbers.

Per argument array and direction (a *stream*):

* ``bytes``: bytes the kernel's threads read (or wrote), all accesses counted;
* ``unique_bytes``: distinct bytes touched; ``dram_bytes``: distinct 32-byte
  sectors touched times 32 (what DRAM moves when nothing is re-read from it);
* warp requests: the accesses the 32 lanes of a warp make at the same site
  (the same compiled load or store: one instruction on the GPU) for the same
  time — a lane's k-th execution of a site meets the other lanes' k-th
  execution of it, as in lockstep SIMT execution of non-divergent code;
* ``sectors`` per request: distinct 32-byte sectors the request touches;
  ``ideal`` per request: its distinct bytes over 32, rounded up (a warp
  reading 32 consecutive float4 is one LDG.128 request of 16 sectors, ideal
  16; 32 lanes reading one float each 64 bytes apart touch 32 sectors where
  4 would do).

Addresses are taken relative to the start of the array's allocation, as if
each allocation started on a 256-byte boundary (CuPy's allocations do), so
sector counts do not depend on where NumPy happened to put the buffers.

Sampled launches are extrapolated per block role ([`cubn.model.sampling`][cubn.model.sampling]):
each total is the sum over sampled blocks of (value × blocks the sample stands
for); ``spread`` is the largest relative difference between samples of one
role for the stream's bytes and sectors (0.0: the extrapolation is exact).
Distinct bytes are additive over blocks only when the sampled blocks touch
disjoint parts of the array; otherwise (arrays every block reads, such as the
per-channel coefficients) the extrapolation is capped at the array's size.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import sampling
from .tracing import LaunchTrace

SECTOR = 32


@dataclass
class Stream:
    array: str
    direction: str            # "read" or "write"
    array_bytes: int          # size of the argument array
    bytes: float
    unique_bytes: float
    dram_bytes: float
    requests: float
    sectors: float
    ideal_sectors: float
    spread: float = 0.0
    shared: bool = False      # sampled blocks overlap (the array is shared between blocks)
    access_size: int = 0      # bytes per thread of the stream's most common access
    max_warp_requests: float = 0.0   # warp requests of the busiest sampled warp

    @property
    def sectors_per_request(self) -> float:
        return self.sectors / self.requests if self.requests else 0.0

    @property
    def ideal_sectors_per_request(self) -> float:
        return self.ideal_sectors / self.requests if self.requests else 0.0

    @property
    def efficiency(self) -> float:
        """Ideal sectors over sectors touched: 1.0 is perfectly coalesced."""
        return self.ideal_sectors / self.sectors if self.sectors else 1.0

    @property
    def exact(self) -> bool:
        return self.spread == 0.0


@dataclass
class LaunchTraffic:
    trace: LaunchTrace
    streams: list = field(default_factory=list)

    @property
    def launch(self):
        return self.trace.launch

    @property
    def read_bytes(self) -> float:
        return sum(s.bytes for s in self.streams if s.direction == "read")

    @property
    def write_bytes(self) -> float:
        return sum(s.bytes for s in self.streams if s.direction == "write")

    @property
    def sampled_blocks(self) -> int:
        return len(self.trace.blocks)

    @property
    def exact(self) -> bool:
        return all(s.exact for s in self.streams)

    def stream(self, array: str, direction: str) -> Stream | None:
        for s in self.streams:
            if direction == s.direction and array in s.array.split("|"):
                return s
        return None


def site_names(trace: LaunchTrace) -> dict:
    """{access site (pc): "file:line"} for a trace's records, from the traced
    library's debug information (addr2line; the innermost source line, and
    the kernel-file line it was inlined into when they differ)."""
    import os
    import shutil
    import subprocess

    lib = os.path.realpath(trace.library)
    pcs = [int(p) for p in np.unique(trace.records["pc"])] if len(trace.records) else []
    if not pcs or not shutil.which("addr2line"):
        return {}
    base = None
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split()
            if len(parts) >= 6 and os.path.realpath(parts[5]) == lib and int(parts[2], 16) == 0:
                base = int(parts[0].split("-")[0], 16)
                break
    if base is None:
        return {}
    # the hook's return address follows the call: look one byte back
    out = subprocess.run(["addr2line", "-a", "-i", "-e", lib] + [hex(pc - base - 1) for pc in pcs],
                         capture_output=True, text=True).stdout.splitlines()
    names, cur, frames = {}, None, []

    def flush():
        if cur is not None and frames:
            inner = frames[0].split("/")[-1].split(" ")[0]
            outer = next((f.split("/")[-1].split(" ")[0] for f in reversed(frames) if ".cu:" in f), inner)
            names[cur] = inner if inner == outer else f"{inner} ({outer})"

    for line in out:
        if line.startswith("0x"):
            flush()
            cur, frames = int(line, 16) + base + 1, []
        else:
            frames.append(line)
    flush()
    return names


def _union_length(start: np.ndarray, end: np.ndarray) -> int:
    if len(start) == 0:
        return 0
    order = np.argsort(start, kind="stable")
    s, e = start[order], end[order]
    reach = np.maximum.accumulate(e)
    # an interval starts a new run when it begins past everything before it
    new = np.ones(len(s), dtype=bool)
    new[1:] = s[1:] > reach[:-1]
    run = np.cumsum(new) - 1
    run_start = s[new]
    run_end = np.zeros(run[-1] + 1, dtype=np.int64)
    np.maximum.at(run_end, run, e.astype(np.int64))
    return int((run_end - run_start).sum())


def analyze(trace: LaunchTrace) -> LaunchTraffic:
    """Per-stream traffic and coalescing of one traced launch."""
    out = LaunchTraffic(trace)
    r = trace.records
    nsamples = len(trace.blocks)
    if len(trace.ranges) == 0:
        return out
    base = np.array([a.ptr for a in trace.range_args], dtype=np.int64)
    shift = np.array([a.offset + (a.alloc << 44) for a in trace.range_args], dtype=np.int64)
    rng = r["range"].astype(np.int64)
    vaddr = r["addr"].astype(np.int64) - base[rng] + shift[rng] if len(r) else np.zeros(0, np.int64)
    size = r["size"].astype(np.int64)
    blk = r["block"].astype(np.int64)
    thr = r["thread"].astype(np.int64)
    pc = r["pc"].astype(np.int64)
    kinds = r["kind"].astype(np.int64)

    # Occurrence of each access among its thread's executions of the same site.
    _, pci = np.unique(pc, return_inverse=True)
    pci = pci.reshape(-1).astype(np.int64)
    npc = int(pci.max()) + 1 if len(r) else 1
    site_key = (blk * 1024 + thr) * npc + pci
    order = np.lexsort((r["seq"], site_key)) if len(r) else np.zeros(0, np.int64)
    occ = np.zeros(len(r), dtype=np.int64)
    if len(r):
        sk = site_key[order]
        start = np.ones(len(r), dtype=bool)
        start[1:] = sk[1:] != sk[:-1]
        gid = np.cumsum(start) - 1
        first = np.flatnonzero(start)
        occ[order] = np.arange(len(r)) - first[gid]
    nocc = int(occ.max()) + 1 if len(r) else 1

    for direction, dir_kinds in (("read", (0, 2)), ("write", (1, 2))):
        dmask = np.isin(kinds, dir_kinds)
        for ri, name in enumerate(trace.ranges):
            arg = trace.range_args[ri]
            m = dmask & (rng == ri)
            per = {k: np.zeros(nsamples) for k in ("bytes", "requests", "sectors", "ideal", "unique", "usect")}
            busiest = 0.0
            idx = np.flatnonzero(m)
            starts_all, ends_all, sect_all = [], [], []
            if len(idx):
                b, w, p, o = blk[idx], thr[idx] // 32, pci[idx], occ[idx]
                va, sz = vaddr[idx], size[idx]
                _, req = np.unique(((b * 32 + w) * npc + p) * nocc + o, return_inverse=True)
                req = req.reshape(-1).astype(np.int64)
                nreq = int(req.max()) + 1
                req_block = np.zeros(nreq, dtype=np.int64)
                req_block[req] = b
                req_warp = np.zeros(nreq, dtype=np.int64)
                req_warp[req] = b * 64 + w
                busiest = float(np.bincount(req_warp).max())
                # sectors touched per request (an access spans at most two)
                lo = int(va.min())
                s0, s1 = (va - lo) // SECTOR, (va - lo + sz - 1) // SECTOR
                span = int(s1.max()) + 1
                pair = np.unique(np.concatenate([req * span + s0, req * span + s1]))
                sectors = np.bincount(pair // span, minlength=nreq)
                # distinct bytes per request, over 32, rounded up
                upair, ui = np.unique(req * (span * SECTOR) + (va - lo), return_index=True)
                ubytes = np.bincount(upair // (span * SECTOR), weights=sz[ui], minlength=nreq)
                ideal = np.maximum(1, np.ceil(ubytes / SECTOR))
                s0, s1 = s0 + lo // SECTOR, s1 + lo // SECTOR
                per["bytes"] += np.bincount(b, weights=sz, minlength=nsamples)
                per["requests"] += np.bincount(req_block, minlength=nsamples)
                per["sectors"] += np.bincount(req_block, weights=sectors, minlength=nsamples)
                per["ideal"] += np.bincount(req_block, weights=ideal, minlength=nsamples)
                for s in range(nsamples):
                    sm = b == s
                    if not sm.any():
                        continue
                    per["unique"][s] = _union_length(va[sm], va[sm] + sz[sm])
                    us = np.unique(np.concatenate([s0[sm], s1[sm]]))
                    per["usect"][s] = len(us)
                    sect_all.append(us)
                starts_all, ends_all = va, va + sz
            wts = trace.weights
            total = {k: float((v * wts).sum()) for k, v in per.items()}
            if not len(idx) and direction == "write" and total["bytes"] == 0:
                continue
            if not len(idx):
                continue
            union_bytes = _union_length(starts_all, ends_all)
            union_sectors = len(np.unique(np.concatenate(sect_all))) if sect_all else 0
            shared = union_bytes < per["unique"].sum() or union_sectors < per["usect"].sum()
            if shared:
                scale = union_bytes / per["unique"].sum() if per["unique"].sum() else 1.0
                uniq = max(union_bytes, total["unique"] * scale)
                sscale = union_sectors / per["usect"].sum() if per["usect"].sum() else 1.0
                usect = max(union_sectors, total["usect"] * sscale)
            else:
                uniq, usect = total["unique"], total["usect"]
            uniq = min(uniq, arg.nbytes)
            usect = min(usect, -(-(arg.offset % SECTOR + arg.nbytes) // SECTOR))
            spread = max(sampling.spread(per["bytes"], trace.role_of), sampling.spread(per["sectors"], trace.role_of))
            sizes, counts = np.unique(size[idx], return_counts=True)
            out.streams.append(Stream(
                array=name, direction=direction, array_bytes=arg.nbytes, bytes=total["bytes"], unique_bytes=uniq,
                dram_bytes=usect * SECTOR, requests=total["requests"], sectors=total["sectors"],
                ideal_sectors=total["ideal"], spread=spread, shared=bool(shared),
                access_size=int(sizes[np.argmax(counts)]), max_warp_requests=busiest))
    return out
