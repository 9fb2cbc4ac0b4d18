"""Device presets for the model: the facts a launch plan and a time estimate need.

Limits (SMs, threads, registers, shared memory, blocks per SM) are NVIDIA's
published figures for each compute capability. Speeds are *leads* until a GPU
run calibrates them (docs/performance.md, "Calibration"): the copy bandwidth
is what a large device-to-device copy achieves (about 3.0 TB/s on an H100
SXM; 4.3 TB/s measured on this workplace's H200, whose datasheet says 4.8),
the clock is the boost clock, and the latencies and the per-kernel launch
overhead are typical published measurements, not readings of these GPUs.
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Device:
    name: str
    arch: str                      # NVRTC target whose SASS the model counts
    sms: int
    clock_ghz: float
    copy_bandwidth: float          # bytes/s, read + write, large device-to-device copy
    l2_bytes: int
    launch_overhead_us: float      # per kernel on a stream, back to back
    dram_latency_ns: float         # a load that misses L2, under load
    l2_latency_cycles: int         # a load that hits L2
    dependent_issue_cycles: float  # average cycles between dependent instructions of one warp
    schedulers_per_sm: int = 4     # warp instructions issued per SM per cycle
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    registers_per_sm: int = 65536
    register_granularity: int = 256  # registers are allocated per warp in units of this
    max_registers_per_thread: int = 255
    shared_per_sm: int = 228 * 1024
    max_shared_per_block: int = 48 * 1024  # without the opt-in attribute (what CuPy reports)
    shared_reserved_per_block: int = 1024
    max_threads_per_block: int = 1024

    def device_info(self):
        from ._adapter import device_info

        import dataclasses

        info = device_info(self.name, self.sms, self.max_threads_per_block, self.max_shared_per_block)
        return dataclasses.replace(info, compute_capability=int(self.arch.split("_")[1]))

    def occupancy(self, threads_per_block: int, registers: int, shared_bytes: int) -> int:
        """Resident blocks per SM for a kernel with these resources (0: cannot launch)."""
        warps = -(-threads_per_block // 32)
        regs_per_warp = -(-max(registers, 1) * 32 // self.register_granularity) * self.register_granularity
        by_threads = self.max_threads_per_sm // (warps * 32)
        by_regs = self.registers_per_sm // (regs_per_warp * warps) if registers else self.max_blocks_per_sm
        smem = shared_bytes + self.shared_reserved_per_block
        by_smem = self.shared_per_sm // smem
        return max(0, min(self.max_blocks_per_sm, by_threads, by_regs, by_smem))


H100 = Device(
    name="NVIDIA H100 80GB HBM3 (model)", arch="sm_90", sms=132, clock_ghz=1.98, copy_bandwidth=3.0e12,
    l2_bytes=50 * 2**20, launch_overhead_us=2.0, dram_latency_ns=650.0, l2_latency_cycles=270,
    dependent_issue_cycles=4.5,
)
H200 = replace(H100, name="NVIDIA H200 (model)", copy_bandwidth=4.3e12, l2_bytes=60 * 2**20)
A100 = Device(
    name="NVIDIA A100-SXM4-80GB (model)", arch="sm_80", sms=108, clock_ghz=1.41, copy_bandwidth=1.7e12,
    l2_bytes=40 * 2**20, launch_overhead_us=2.0, dram_latency_ns=700.0, l2_latency_cycles=230,
    dependent_issue_cycles=4.5, shared_per_sm=164 * 1024,
)
PRESETS = {"h100": H100, "h200": H200, "a100": A100}


def get_device(name: str) -> Device:
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise ValueError(f"device must be one of {', '.join(sorted(PRESETS))}, not {name!r}") from None
