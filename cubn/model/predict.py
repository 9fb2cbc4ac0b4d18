"""The time model: a traced launch plus its SASS statistics → microseconds.

For each launch (docs/performance.md, "The model", writes the same down):

* **occupancy**: resident blocks per SM from the variant's registers and
  shared memory (static + the launch's dynamic) under the device's limits;
  ``waves`` = blocks / (SMs × resident blocks).
* **DRAM**: the launch's distinct 32-byte sectors per stream; a stream read
  again after an earlier launch of the same op touched it is an L2 hit when
  what the op touched since fits in half the L2 (writes always count). Time =
  bytes / achievable bandwidth, where the achievable bandwidth is the copy
  bandwidth, capped by Little's law (bytes in flight per SM — resident
  threads × the widest loads one loop iteration issues — over the DRAM
  latency, on the SMs the grid occupies), and stretched by the last wave's
  idle SMs (``ceil(waves) / waves``).
* **issue**: warp instructions (loop iterations × the iteration's SASS
  instructions + warps × the instructions outside the loop) over
  SMs × 4 schedulers × clock.
* **serial chain**: the busiest warp's loop iterations × (memory latency +
  the iteration's instructions × the average dependent-issue interval),
  times the rounds of blocks an SM runs one after another: the time a loop of
  dependent round trips takes however idle the GPU is (finalize walking
  thousands of partials with one warp per channel is this case).
* **last-block tail** (the fused statistics kernels, ``cubn_moments_*_fused``):
  after every other block, the group's last block merges the group's partials
  alone. The tracer holds the group counters away from completion, so no
  traced block runs it (a sample would complete a count only by chance); it
  is counted from the launch's arguments: the handshake (a fence, the
  counter's atomic round trip, a second fence) and the output writes, three
  L2 round trips, plus per chunk of ``cw`` channels the walkers' dependent
  steps (an L2 load and a Chan merge of ``MERGE_INSTRUCTIONS`` dependent
  instructions each) and the tree over the walkers (a shared-memory load, a
  merge and a barrier per level). It runs after the grid, so it adds.
* **launch overhead** per kernel.

A launch takes ``overhead + max(DRAM, issue, chain) + tail``; an op is the sum
of its launches. ``roofline_us`` is the op's minimal tensor traffic (the
benchmark's count of tensor-sized passes) over the copy bandwidth. All of it
is a model with leads for its constants ([`cubn.model.devices`][cubn.model.devices]) until a
GPU run calibrates them.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .access import LaunchTraffic
from .devices import Device
from .sass import SassStats

TENSOR_NAMES = ("x", "dy", "side")
# Dependent instructions of one Chan merge with pivots (chan_merge_pivot: the
# empty and non-finite checks, a division, four FMAs), and the cycles of a
# shared-memory load and of a block barrier, for the last-block tail.
MERGE_INSTRUCTIONS = 40
SHARED_LATENCY_CYCLES = 30
BARRIER_CYCLES = 20
FUSED_KERNELS = ("cubn_moments_cl_fused", "cubn_moments_cf_fused")


@dataclass
class LaunchTime:
    kernel: str
    blocks: int
    threads_per_block: int
    registers: int
    shared_bytes: int
    blocks_per_sm: int
    waves: float
    dram_bytes: float
    l2_hit_bytes: float
    achievable_bandwidth: float
    warp_instructions: float
    loop_iterations_per_warp: float
    dram_us: float
    issue_us: float
    chain_us: float
    overhead_us: float
    tail_us: float = 0.0

    @property
    def total_us(self) -> float:
        return self.overhead_us + max(self.dram_us, self.issue_us, self.chain_us) + self.tail_us

    @property
    def bound(self) -> str:
        terms = {"dram": self.dram_us, "issue": self.issue_us, "chain": self.chain_us}
        return max(terms, key=terms.get)

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(total_us=self.total_us, bound=self.bound)
        return d


def streamed_tensors(traffic: LaunchTraffic) -> int:
    """Tensor-sized inputs the launch reads (x, dy, side)."""
    names = {n for s in traffic.streams if s.direction == "read" for n in s.array.split("|")}
    return max(1, sum(1 for n in TENSOR_NAMES if n in names))


class L2:
    """Which arrays an op's earlier launches left in L2 (allocation id → bytes
    the op had touched when this one was last touched)."""

    def __init__(self, device: Device):
        self.capacity = device.l2_bytes / 2
        self.touched = 0.0
        self.last: dict = {}

    def read_hits(self, key) -> bool:
        t = self.last.get(key)
        return t is not None and self.touched - t[0] + t[1] <= self.capacity

    def touch(self, key, nbytes):
        self.touched += nbytes
        self.last[key] = (self.touched, nbytes)


def launch_time(traffic: LaunchTraffic, sass: SassStats, device: Device, l2: L2) -> LaunchTime:
    launch = traffic.launch
    threads = launch.threads_per_block
    shared = sass.shared_static + launch.shared_bytes
    per_sm = max(1, device.occupancy(threads, sass.registers, shared))
    blocks = launch.blocks
    waves = blocks / (device.sms * per_sm)
    active_sms = min(device.sms, blocks)
    warps_per_block = -(-threads // 32)
    warps = blocks * warps_per_block

    # DRAM bytes, with L2 hits for arrays the op touched shortly before.
    args = {a.name: a for a in launch.args if a.kind == "array"}
    dram = hits = 0.0
    keys = []
    for s in traffic.streams:
        a = args.get(s.array.split("|")[0])
        key = (a.alloc, a.offset, a.nbytes) if a is not None else s.array
        if s.direction == "read" and l2.read_hits(key):
            hits += s.dram_bytes
        else:
            dram += s.dram_bytes
        keys.append((key, s.dram_bytes))
    for key, nbytes in keys:
        l2.touch(key, nbytes)

    # Loop iterations: warp requests of the streams the loop's widest loads read.
    loop_streams = [s for s in traffic.streams if s.direction == "read" and s.access_size == sass.widest_load
                    and sass.widest_load > 0]
    loads = max(sass.iteration_widest_loads, 1)
    iterations = sum(s.requests for s in loop_streams) / loads if sass.loop else 0.0
    busiest = sum(s.max_warp_requests for s in loop_streams) / loads if sass.loop else 0.0
    instr = iterations * sass.iteration_instructions + warps * (
        sass.outside_loop_instructions if sass.loop else sass.iteration_instructions)

    clock = device.clock_ghz * 1e9
    resident_threads = min(per_sm * threads, device.max_threads_per_sm)
    in_flight = resident_threads * max(sass.iteration_widest_loads, 1) * max(sass.widest_load, 4)
    sms_busy = min(active_sms, device.sms)
    little = sms_busy * in_flight / (device.dram_latency_ns * 1e-9)
    bandwidth = min(device.copy_bandwidth, little)
    tail = math.ceil(waves) / waves if waves >= 1 else 1.0
    dram_us = dram / bandwidth * tail * 1e6 if dram else 0.0
    issue_us = instr / (sms_busy * device.schedulers_per_sm * clock) * tail * 1e6

    latency = device.dram_latency_ns * 1e-9 * clock if dram > hits else device.l2_latency_cycles
    per_iteration = latency + sass.iteration_instructions * device.dependent_issue_cycles
    if not sass.loop:
        busiest = 1.0
    rounds = math.ceil(waves) if waves >= 1 else 1
    chain_us = rounds * busiest * per_iteration / clock * 1e6

    tail_us = last_block_cycles(launch, device) / clock * 1e6
    return LaunchTime(launch.name_expression, blocks, threads, sass.registers, shared, per_sm, waves, dram, hits,
                      bandwidth, instr, busiest, dram_us, issue_us, chain_us, device.launch_overhead_us, tail_us)


def fused_merge_shape(launch):
    """``(chunks, steps, walkers)`` of a fused statistics launch's last block (moments.cu,
    finalize.cuh's merge_finalize_group): the widest group's chunks of ``cw`` channels (one
    after another), each walker's partials per chunk, the walkers; None for other kernels."""
    if launch.kernel not in FUSED_KERNELS:
        return None
    named = launch.named
    C = int(named["C"])
    threads = launch.threads_per_block
    gx, gy, _ = launch.grid
    if launch.kernel == "cubn_moments_cl_fused":
        folded = int(named["cols"]) != C
        width = launch.block[0] * int(launch.template.get("VEC", 1))
        nch = C if folded else min(width, int(named["cols"]))
        total = gy * (gx if folded else 1)
    else:
        nch, total = 1, int(named["nsplit"])
    cw = 1  # finalize's channels per block (32 bytes of accumulators), whose order the merge keeps
    while cw < C and cw < 32 // launch.arg("p_count").itemsize:
        cw *= 2
    walkers = threads // cw
    return -(-nch // cw), -(-total // walkers), walkers


def last_block_cycles(launch, device: Device) -> float:
    """Cycles the last block of a fused statistics launch spends after the rest of the grid:
    the handshake and the writes (three L2 round trips), then per chunk each walker's batches of
    four loads (one L2 round trip a batch) with their dependent merges, and the tree's levels."""
    shape = fused_merge_shape(launch)
    if shape is None:
        return 0.0
    chunks, steps, walkers = shape
    merge = MERGE_INSTRUCTIONS * device.dependent_issue_cycles
    levels = max(0, walkers.bit_length() - 1)
    per_chunk = (-(-steps // 4) * device.l2_latency_cycles + steps * merge
                 + levels * (SHARED_LATENCY_CYCLES + merge + BARRIER_CYCLES))
    return 3 * device.l2_latency_cycles + chunks * per_chunk


def roofline_us(op: str, tensor_bytes: int, device: Device, passes: dict) -> float:
    return passes[op] * tensor_bytes / device.copy_bandwidth * 1e6
