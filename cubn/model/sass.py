"""SASS statistics of a kernel variant, from the cubin NVRTC builds for it.

For each variant and target (sm_80, sm_90): registers, static shared memory,
stack, from ``cuobjdump -res-usage``; the machine code from ``nvdisasm``
(both from the ``nvidia-cuda-cuobjdump`` / ``nvidia-cuda-nvdisasm`` wheels).
NVRTC compiles with the options the CuPy launcher uses, so this is the code
the GPU runs.

**The hot loop and instructions per 16 bytes.** The disassembly is split
into basic blocks (leaders: the entry, branch targets, the instruction after
a branch, exit or return); a branch to an earlier address is a loop's back
edge and the loop is the address range it spans. The hot loop is the one
holding the most global loads of the widest width the kernel uses (the
tensor stream). One iteration is counted along one path from the loop head
to the back edge: the path with the fewest instructions among those that
perform at least ``k`` of those widest loads, ``k`` being the number of
tensors the launch streams (1 for normalize without a residual, 2 with one,
2 for the backward passes: dy and x). Called subroutines (64-bit division,
the IEEE division slow path) add the instructions of their own shortest
path. Predicated instructions count whether or not their predicate holds
(the GPU issues them). Instructions per 16 bytes are the path's instruction
count over the 16-byte vector positions one iteration covers (the widest
loads on the path divided by ``k``, scaled to 16 bytes).

Limits: a branch the data decides (a channel boundary inside a vector, a
tail) is taken the cheap way; a loop the compiler unrolled into straight
code (the one-launch kernels, whose register cache is unrolled) has no back
edge: for those the count is over the whole kernel, along the path from the
entry to an exit that makes the most widest accesses, and no per-16-byte
figure is reported. The count is of instructions issued, not of cycles.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field

from . import _adapter

_LDG_WIDTH = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}
# Kernels whose loop streams more than one tensor per vector position.
STREAMED_TENSORS = {"cubn_bwd_apply": 2, "cubn_bwd_reduce_cl": 2, "cubn_bwd_reduce_cf": 2, "cubn_bn_bwd_one_launch": 2}


def tool(name: str) -> str:
    """Path of ``nvdisasm`` / ``cuobjdump``: the PyPI wheel's, else one on PATH."""
    try:
        import nvidia

        for base in nvidia.__path__:
            for cand in sorted(pathlib.Path(base).glob(f"cu*/bin/{name}")) + sorted(pathlib.Path(base).glob(f"*/bin/{name}")):
                if cand.is_file() and os.access(cand, os.X_OK):
                    return str(cand)
    except ImportError:
        pass
    found = shutil.which(name)
    if found:
        return found
    raise RuntimeError(f"{name} not found: pip install nvidia-cuda-{'nvdisasm' if name == 'nvdisasm' else 'cuobjdump'}")


def available() -> str | None:
    """None when NVRTC and both tools are there, else why not."""
    try:
        from cuda.bindings import nvrtc  # noqa: F401
    except ImportError:
        return "cuda-bindings (NVRTC) is not installed"
    try:
        tool("nvdisasm")
        tool("cuobjdump")
    except RuntimeError as e:
        return str(e)
    if not _adapter.cuda_include_dirs():
        return "cuda_fp16.h not found (install nvidia-cuda-runtime)"
    return None


# ---------------------------------------------------------------- compiling
def compile_cubin(source: str, name_expressions, arch: str):
    """``(cubin bytes, {name expression: lowered name})``."""
    from cuda.bindings import nvrtc

    code = (_adapter.KERNELS_DIR / source).read_bytes()
    err, prog = nvrtc.nvrtcCreateProgram(code, source.encode(), 0, [], [])
    try:
        for ne in name_expressions:
            nvrtc.nvrtcAddNameExpression(prog, ne.encode())
        opts = [o.encode() for o in _adapter.nvrtc_options(arch)]
        (res,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if res != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            _, n = nvrtc.nvrtcGetProgramLogSize(prog)
            log = b" " * n
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"NVRTC failed on {source} for {arch}:\n{log.decode(errors='replace')}")
        _, n = nvrtc.nvrtcGetCUBINSize(prog)
        cubin = b" " * n
        nvrtc.nvrtcGetCUBIN(prog, cubin)
        lowered = {}
        for ne in name_expressions:
            _, name = nvrtc.nvrtcGetLoweredName(prog, ne.encode())
            lowered[ne] = name.decode()
        return cubin, lowered
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


# ---------------------------------------------------------------- parsing
@dataclass
class Instr:
    addr: int
    pred: str
    op: str
    operands: str
    target: str | None = None  # branch or call target label

    @property
    def base(self) -> str:
        return self.op.split(".")[0]

    @property
    def global_width(self) -> int:
        """Bytes per thread of a global load/store (0: not one)."""
        if self.base not in ("LDG", "STG"):
            return 0
        for part in self.op.split(".")[1:]:
            if part in _LDG_WIDTH:
                return _LDG_WIDTH[part]
        return 4


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+|\$[\w$.]+|[A-Za-z_]\w*):\s*$")
_TARGET = re.compile(r"`\(([^)]+)\)")


def parse_functions(sass: str) -> dict:
    """{function symbol: (instructions, {label: address})} from nvdisasm's text."""
    funcs = {}
    cur = None
    for line in sass.splitlines():
        m = re.match(r"\s*\.text\.(\S+):\s*$", line)
        if m:
            cur = m.group(1)
            funcs[cur] = ([], {})
            pending = []
            continue
        if cur is None:
            continue
        instrs, labels = funcs[cur]
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _LINE.search(line)
        if m:
            addr = int(m.group(1), 16)
            for lab in pending:
                labels[lab] = addr
            pending = []
            t = _TARGET.search(m.group(4))
            instrs.append(Instr(addr, (m.group(2) or "").strip(), m.group(3), m.group(4).strip(), t.group(1) if t else None))
    return funcs


@dataclass
class Block:
    start: int
    instrs: list
    succ: list = field(default_factory=list)   # block starts
    callee_cost: int = 0

    @property
    def end(self) -> int:
        return self.instrs[-1].addr

    @property
    def widest(self) -> int:
        return max((i.global_width for i in self.instrs if i.base == "LDG"), default=0)


def _blocks(instrs, labels, lo, hi):
    """Basic blocks of the instructions with lo <= addr < hi."""
    body = [i for i in instrs if lo <= i.addr < hi]
    if not body:
        return {}
    targets = {labels[i.target] for i in body if i.target in labels and i.base in ("BRA", "BRX", "JMP")}
    leaders = {body[0].addr} | {t for t in targets if lo <= t < hi}
    for a, b in zip(body, body[1:]):
        if a.base in ("BRA", "BRX", "JMP", "EXIT", "RET"):
            leaders.add(b.addr)
    out, cur = {}, None
    for i in body:
        if i.addr in leaders:
            cur = Block(i.addr, [])
            out[i.addr] = cur
        cur.instrs.append(i)
    starts = sorted(out)
    for k, s in enumerate(starts):
        blk = out[s]
        last = blk.instrs[-1]
        nxt = starts[k + 1] if k + 1 < len(starts) else None
        falls = True
        if last.base in ("BRA", "JMP", "BRX"):
            t = labels.get(last.target)
            if t is not None and lo <= t < hi:
                blk.succ.append(t)
            falls = bool(last.pred)
        elif last.base in ("EXIT", "RET"):
            falls = bool(last.pred)
        if falls and nxt is not None:
            blk.succ.append(nxt)
    return out


def _subroutine_costs(instrs, labels, main_end):
    """Instructions along the shortest path of each called subroutine to its return."""
    costs = {}
    for name, addr in labels.items():
        if not name.startswith("$") or addr < main_end:
            continue
        later = sorted(a for n, a in labels.items() if n.startswith("$") and a > addr)
        end = later[0] if later else instrs[-1].addr + 16
        blocks = _blocks(instrs, labels, addr, end)
        best = _shortest(blocks, addr, lambda b: b.instrs[-1].base == "RET", 0)
        costs[name] = best[0] if best else sum(len(b.instrs) for b in blocks.values())
    return costs


def _shortest(blocks, start, is_end, need_loads, widest=0):
    """(instructions, widest loads) of the cheapest path from ``start`` to a
    block satisfying ``is_end`` that makes at least ``need_loads`` loads of
    width ``widest``; None when there is none. Edges to earlier blocks are
    not followed (an inner loop counts once)."""
    if start not in blocks:
        return None
    order = [s for s in sorted(blocks) if s >= start]
    cap = 64
    inf = float("inf")
    dist = {s: [inf] * (cap + 1) for s in order}
    loads = {s: sum(1 for i in blocks[s].instrs if i.base == "LDG" and widest and i.global_width == widest)
             for s in order}
    cost = {s: len(blocks[s].instrs) + blocks[s].callee_cost for s in order}
    dist[start][min(cap, loads[start])] = cost[start]
    best = None
    for s in order:
        for k in range(cap + 1):
            d = dist[s][k]
            if d == inf:
                continue
            if is_end(blocks[s]) and k >= need_loads and (best is None or (d, -k) < (best[0], -best[1])):
                best = (d, k)
            for t in blocks[s].succ:
                if t <= s or t not in dist:
                    continue
                nk = min(cap, k + loads[t])
                if d + cost[t] < dist[t][nk]:
                    dist[t][nk] = d + cost[t]
    return best


def _reaches(blocks, start, goal) -> bool:
    seen, todo = {start}, [start]
    while todo:
        s = todo.pop()
        if s == goal:
            return True
        for t in blocks[s].succ:
            if s < t <= goal and t not in seen:
                seen.add(t)
                todo.append(t)
    return False


def _count_widest(blocks, start, is_end, widest):
    """Most widest loads any forward path from ``start`` to an end can make."""
    order = sorted(s for s in blocks if s >= start)
    count = {s: sum(1 for i in blocks[s].instrs if i.base == "LDG" and i.global_width == widest) for s in order}
    most = {s: -1 for s in order}
    most[start] = count[start]
    out = 0
    for s in order:
        if most[s] < 0:
            continue
        if is_end(blocks[s]):
            out = max(out, most[s])
        for t in blocks[s].succ:
            if t > s and t in most:
                most[t] = max(most[t], most[s] + count[t])
    return out


@dataclass
class SassStats:
    """What the model needs from one variant's machine code."""

    name_expression: str
    arch: str
    registers: int
    shared_static: int                 # bytes the kernel declares (the per-block reservation excluded)
    stack: int
    instructions: int                  # static count of the main body
    widest_load: int                   # bytes per thread of the kernel's widest global load
    loop: bool                         # a hot loop was found (else: the whole kernel is counted)
    iteration_instructions: float      # instructions along the counted path
    iteration_widest_loads: int        # widest loads on that path
    vector_positions: float            # 16-byte positions of one tensor the path covers
    outside_loop_instructions: int     # cheapest entry-to-loop plus loop-to-exit path
    loop_memory_ops: int = 0           # global loads and stores inside the loop (static)
    streamed: int = 1                  # tensors the path was chosen for
    callee_instructions: dict = field(default_factory=dict)

    @property
    def instructions_per_16B(self) -> float | None:
        if self.vector_positions <= 0:
            return None
        return self.iteration_instructions / self.vector_positions

    def to_json(self) -> dict:
        d = asdict(self)
        d["instructions_per_16B"] = self.instructions_per_16B
        return d


def analyze_function(instrs, labels, name_expression, arch, resources, streamed=1, tensors=1) -> SassStats:
    """``tensors``: how many tensor-sized inputs the kernel can stream (x;
    dy and x; plus an optional residual); ``streamed``: how many this launch
    streams. The path is chosen to make ``streamed`` of them per position."""
    sub_starts = [a for n, a in labels.items() if n.startswith("$")]
    main_end = min(sub_starts) if sub_starts else instrs[-1].addr + 16
    callee = _subroutine_costs(instrs, labels, main_end)
    blocks = _blocks(instrs, labels, instrs[0].addr, main_end)
    for b in blocks.values():
        b.callee_cost = sum(callee.get(i.target, 0) for i in b.instrs if i.base == "CALL")
    body = [i for i in instrs if i.addr < main_end]
    widest = max((i.global_width for i in body if i.base == "LDG"), default=0)
    shared = resources["SHARED"]
    # cuobjdump's figure includes the 1 KiB per-block system reservation on
    # sm_90 (a module using shared memory reports it for every kernel).
    if not any(i.base in ("LDS", "STS", "ATOMS", "LDSM") for i in body):
        shared = 0
    elif arch >= "sm_90" and shared >= 1024:
        shared -= 1024
    entry = instrs[0].addr
    exits = lambda blk: blk.instrs[-1].base == "EXIT" and not blk.instrs[-1].pred  # noqa: E731
    # Loops: back edges u -> v (v <= u); the hot one holds the most widest loads.
    # A branch back from out-of-line code (a slow path placed after the
    # kernel's end that returns to where it left) is no loop: the source must
    # be reachable from the target along forward edges.
    best = None
    for s, b in blocks.items():
        for t in b.succ:
            if t <= s and _reaches(blocks, t, s):
                n = sum(1 for i in body if t <= i.addr <= b.end and i.base == "LDG" and i.global_width == widest)
                key = (n, b.end - t)
                if n and (best is None or key > best[0]):
                    best = (key, t, s)
    if best is not None:
        _, head, tail = best
        region = {s: b for s, b in blocks.items() if head <= s <= tail}
        start, is_end = head, (lambda blk: blk.start == tail)
    else:
        region, start, is_end = blocks, entry, exits
    most = _count_widest(region, start, is_end, widest) if widest else 0
    # Widest loads per vector position: the most a path makes over the tensors
    # that can be streamed; an input the variant compiles out (a residual
    # without an activation in the backward) makes no load, so take the
    # largest tensor count that divides the loads evenly.
    live = next((t for t in range(max(tensors, 1), 0, -1) if most % t == 0), 1)
    per_position = max(1, most // live) if tensors else most
    streamed = min(streamed, live) if tensors else streamed
    want = per_position * (streamed if tensors else 1)
    path = _shortest(region, start, is_end, min(want, most), widest)
    positions = per_position * widest / 16 if widest else 0.0
    if path is None:  # no path found (control flow this parser does not follow): static count, no per-16 B figure
        path, positions = (float(len(body)), 0), 0.0
    if best is not None:
        before = {s: b for s, b in blocks.items() if s <= head}
        pro = _shortest(before, entry, lambda blk: blk.start == head, 0)
        after = {s: b for s, b in blocks.items() if s > tail}
        epi = _shortest(after, min(after), exits, 0) if after else None
        outside_n = (pro[0] - len(blocks[head].instrs) if pro else 0) + (epi[0] if epi else 0)
        mem = sum(1 for s in region for i in region[s].instrs if i.base in ("LDG", "STG"))
    else:
        outside_n, mem = 0, sum(1 for i in body if i.base in ("LDG", "STG"))
    return SassStats(name_expression, arch, resources["REG"], shared, resources["STACK"], len(body), widest,
                     best is not None, float(path[0]), int(path[1]), float(positions), int(outside_n), mem,
                     streamed, callee)


def resource_usage(cubin: bytes) -> dict:
    """{function: {"REG", "SHARED", "STACK", "LOCAL"}} from cuobjdump -res-usage."""
    with tempfile.TemporaryDirectory(prefix="cubn-sass-") as tmp:
        path = pathlib.Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([tool("cuobjdump"), "-res-usage", str(path)], capture_output=True, text=True,
                              check=True).stdout
    out, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            cur = m.group(1)
            continue
        if cur and "REG:" in line:
            vals = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            out[cur] = {k: int(vals.get(k, 0)) for k in ("REG", "SHARED", "STACK", "LOCAL")}
            cur = None
    return out


def disassemble(cubin: bytes) -> str:
    with tempfile.TemporaryDirectory(prefix="cubn-sass-") as tmp:
        path = pathlib.Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        return subprocess.run([tool("nvdisasm"), "-c", str(path)], capture_output=True, text=True, check=True).stdout


# ---------------------------------------------------------------- cached per variant
def _cache_path(source: str, names, arch) -> pathlib.Path:
    from ..backends.emulated_launcher import cache_dir

    h = hashlib.sha256()
    for p in sorted(_adapter.KERNELS_DIR.glob("*.cu*")):
        h.update(p.name.encode() + p.read_bytes())
    h.update(pathlib.Path(__file__).read_bytes())
    h.update("\0".join([source, arch, *names, *_adapter.nvrtc_options(arch)]).encode())
    try:
        from cuda.bindings import nvrtc

        h.update(str(nvrtc.nvrtcVersion()).encode())
    except ImportError:
        pass
    return cache_dir().parent / "model" / f"sass-{pathlib.Path(source).stem}-{arch}-{h.hexdigest()[:24]}.json"


def stats_for(requests, arch: str = "sm_90") -> dict:
    """{(name expression, streamed): SassStats} for ``(variant, streamed)``
    pairs (``streamed``: tensors the launch streams, None for the kernel's
    default). Compiled per source in one NVRTC program; cached on disk."""
    by_source = {}
    for v, k in requests:
        k = k or STREAMED_TENSORS.get(v.kernel, 1)
        by_source.setdefault(v.source, {}).setdefault(v.name_expression, (v, set()))[1].add(k)
    out = {}
    for source, items in by_source.items():
        names = sorted(items)
        wanted = sorted((ne, k) for ne, (_, ks) in items.items() for k in ks)
        cache = _cache_path(source, [f"{ne}#{k}" for ne, k in wanted], arch)
        if cache.exists():
            for row in json.loads(cache.read_text()):
                row.pop("instructions_per_16B", None)
                st = SassStats(**row)
                out[(st.name_expression, st.streamed)] = st
            continue
        cubin, lowered = compile_cubin(source, names, arch)
        res = resource_usage(cubin)
        funcs = parse_functions(disassemble(cubin))
        mine = []
        for ne, k in wanted:
            sym = lowered[ne]
            instrs, labels = funcs[sym]
            st = analyze_function(instrs, labels, ne, arch, res[sym], k, tensor_inputs(items[ne][0]))
            out[(ne, k)] = st
            mine.append(st.to_json())
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(mine, indent=1))
        os.replace(tmp, cache)
    return out


def default_streamed(variant) -> int:
    return STREAMED_TENSORS.get(variant.kernel, 1)


TENSOR_INPUT_NAMES = ("x", "dy", "side")


def tensor_inputs(variant) -> int:
    """Tensor-sized inputs a kernel can stream, by argument name (x, dy, side)."""
    return sum(1 for n in _adapter.parameter_names(variant) if n in TENSOR_INPUT_NAMES)


def table(variants, archs=("sm_80", "sm_90")) -> str:
    """Registers, resident 256-thread blocks per SM and
    instructions per 16 B of each variant, per target (the launch's real
    block size and dynamic shared memory change the occupancy: the model
    uses those)."""
    from .devices import A100, H100

    dev = {"sm_80": A100, "sm_90": H100}
    rows = [f"{'variant':48s} " + " ".join(f"{a + ' regs':>9s} {'blk/SM':>6s} {'instr/16B':>9s}" for a in archs)]
    stats = {a: stats_for([(v, None) for v in variants], a) for a in archs}
    for v in variants:
        cells = []
        for a in archs:
            s = stats[a][(v.name_expression, default_streamed(v))]
            per16 = s.instructions_per_16B
            occ = dev[a].occupancy(256, s.registers, s.shared_static)
            cells.append(f"{s.registers:9d} {occ:6d} {per16 if per16 is not None else float('nan'):9.1f}")
        rows.append(f"{v.name_expression:48s} " + " ".join(cells))
    return "\n".join(rows)


def main(argv=None) -> int:
    """``python -m cubn.model.sass [--shapes quick|full]``: the table for the
    variants the benchmark launches (blocks per SM at 256 threads and no
    dynamic shared memory)."""
    import argparse

    from .plans import benchmark_shapes, used_variants

    p = argparse.ArgumentParser(prog="python -m cubn.model.sass")
    p.add_argument("--shapes", choices=("quick", "full"), default="quick")
    args = p.parse_args(argv)
    why = available()
    if why:
        print(f"SASS statistics unavailable: {why}")
        return 1
    print(table(used_variants(benchmark_shapes(args.shapes))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
