"""Every kernel cubn can launch: one spec per kernel, and the launch constants.

The specs (``cubn.kernels.spec.Kernel``) list each kernel's source file,
template parameters with their domains and named arguments. The kernel
backend obtains variants only through ``SPEC.variant(...)``, which refuses
anything not in a domain; the NVRTC test compiles exactly
[`all_variants`][all_variants], and the emulated launcher builds them per source file,
so no launchable variant escapes either.

The launch constants below are the only statement of each: the host's
launch configuration reads them here, and the kernels receive them as
``-D`` defines ([`DEFINES`][DEFINES]), the same for NVRTC (CuPy, the NVRTC test)
and g++ (the emulator). A source compiled without them stops with an
``#error`` (common.cuh).
"""
from __future__ import annotations

import functools

from .. import _dtypes
from ..activations import ALL as _ACTIVATIONS, NONE_ID
from .spec import KERNEL_DIR, Kernel, all_of, element, elements  # noqa: F401 - re-exported

SOURCES = ("moments.cu", "finalize.cu", "normalize.cu", "backward.cu", "one_launch.cu", "preprocess.cu")

# Options the CuPy launcher passes to NVRTC besides the defines and include
# directories (the NVRTC test adds only the target architecture).
NVRTC_OPTIONS = ("--std=c++17",)
# What CuPy's RawModule adds on its own before calling NVRTC (besides -arch):
# the NVRTC test compiles with these too, so it sees what the GPU gets.
CUPY_ADDED_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")

# ---------------------------------------------------------------------------
# Launch constants
# ---------------------------------------------------------------------------
REDUCE_THREADS = 256       # statistics and backward-sum blocks (moments.cu, backward.cu)
ELEMENTWISE_THREADS = 256  # normalize, backward apply, the preprocessing affine map
FINALIZE_THREADS = 256     # per-channel merges: finalize.cu, and cubn_rm_merge
ONE_LAUNCH_THREADS = 512   # the most threads of a one-launch block (one_launch.cu)
TRANSPOSE_THREADS = 256    # the preprocessing layout change (preprocess.cu)
UNROLL = 4                 # loads in flight per thread in the reduction loops

# Fused activations (the ACT template argument): their ids are cubn.activations'.
ACTIVATION_IDS = {"none": NONE_ID, **{a.name: a.kernel_id for a in _ACTIVATIONS}}
ACTIVATIONS = tuple(ACTIVATION_IDS)
ACT_IDS = tuple(ACTIVATION_IDS.values())


def one_launch_items(dtype, channels_last: bool, vec: int) -> tuple:
    """The register caches (vectors per thread, ascending) the one-launch training forward is built with.

    Channels first: 8. Channels last: 8, and 16 for float32 16-byte vectors
    (16 lets a block of 2 x 256 threads hold 4096 rows of 8 columns, e.g. the
    (64, 7, 7, 2048) NHWC tensor); 4 for the other types, whose per-column
    state (8 columns per thread for 16-bit types, double-width registers for
    float64) would otherwise spill (the NVRTC test checks with ptxas -v for
    sm_80 and sm_90). ``one_launch.decide`` takes the smallest that fits.
    """
    if not channels_last:
        return (8,)
    if _dtypes.itemsize(dtype) != 4:
        return (4,)
    return (8, 16) if vec > 1 else (8,)


def one_launch_backward_items(dtype, vec: int) -> int:
    """Vectors each thread of the one-launch backward keeps (x and the float dy').

    16 / VEC vectors (8 for scalar access), so that x and the float dy' of
    16 elements fit without spills; 4 for float64.
    """
    if _dtypes.itemsize(dtype) == 8:
        return 4
    return 8 if vec == 1 else 16 // vec


DEFINES = (
    ("CUBN_REDUCE_THREADS", REDUCE_THREADS),
    ("CUBN_ELEMENTWISE_THREADS", ELEMENTWISE_THREADS),
    ("CUBN_FINALIZE_THREADS", FINALIZE_THREADS),
    ("CUBN_ONE_LAUNCH_THREADS", ONE_LAUNCH_THREADS),
    ("CUBN_TRANSPOSE_THREADS", TRANSPOSE_THREADS),
    ("CUBN_UNROLL", UNROLL),
    *((f"CUBN_ACT_{name.upper()}", i) for name, i in ACTIVATION_IDS.items()),
)


def define_options() -> tuple:
    """[`DEFINES`][DEFINES] as compiler options, ``-DNAME=VALUE``."""
    return tuple(f"-D{k}={v}" for k, v in DEFINES)


# ---------------------------------------------------------------------------
# Domains
# ---------------------------------------------------------------------------
FLOATS = elements(_dtypes.FLOAT_NAMES)                 # the ops' data types
ACCS = elements(_dtypes.ACC_NAMES)                     # A of finalize.cu
# preprocess.cu's statistics: integers (float accumulators), float32 with double partials
PP_STATS = elements(_dtypes.INT_INPUT_NAMES + ("float32",), acc=lambda n: _dtypes.TABLE[n].stats_acc)
# the transforms' inputs and outputs (their arithmetic type is PpAcc, not the elements')
PP_IN = elements(_dtypes.PREPROCESSING_INPUT_NAMES)
PP_OUT = elements(_dtypes.PREPROCESSING_OUTPUT_NAMES)


def _all_widths(T, **_):
    return _dtypes.vector_widths(T.dtype)


def _scalar_or_widest(T, **_):
    # Elementwise kernels: scalar access, or 16-byte vectors (compile time).
    return tuple(sorted({1, _dtypes.vector_widths(T.dtype)[-1]}))


# ---------------------------------------------------------------------------
# Statistics (moments.cu)
# ---------------------------------------------------------------------------
_MOMENTS_DOMAINS = dict(T=FLOATS, WMODE=(0, 1, 2), VEC=_all_widths)
MOMENTS_CL = Kernel(
    "cubn_moments_cl", "moments.cu", "typename T, int WMODE, int VEC",
    "const T* x, i64 rows, int cols, int C, const A* w?, i64 wdiv=1, A* p_count, A* p_mean, A* p_m2, A* p_pivot",
    _MOMENTS_DOMAINS)
MOMENTS_CF = Kernel(
    "cubn_moments_cf", "moments.cu", "typename T, int WMODE, int VEC",
    "const T* x, i64 outer, int C, i64 inner, int nsplit, i64 chunk, const A* w?, i64 wdiv=1, "
    "A* p_count, A* p_mean, A* p_m2, A* p_pivot",
    _MOMENTS_DOMAINS)

# ---------------------------------------------------------------------------
# Finalize steps (finalize.cu): blocks of FINALIZE_THREADS, finalize_block() channels each
# ---------------------------------------------------------------------------
# After the statistics: the fold (gamma, beta, adjustment, renorm), the outputs,
# the moving update (finalize.cuh's CUBN_FINALIZE_PARAMS). Every pointer is
# nullable: the kernel skips what it is not given.
UPDATE_ARGS = (
    "A upd_a=0, int bessel=0, const A* mm_in?, A* mm_out?, const A* mv_in?, A* mv_out?, A* zd_biased?, "
    "A zd_factor=1, A renorm_a=0, A* rn_mean_io?, A* rn_std_io?, A* moving_std_io?")
FINALIZE_ARGS = (
    "A eps=0, const A* gamma?, const A* beta?, const A* adj_scale?, const A* adj_bias?, const A* renorm_mean?, "
    "const A* renorm_std?, A rmin=0, A rmax=inf, A dmax=inf, A* o_count?, A* o_mean?, A* o_var?, A* o_invstd?, "
    "A* o_scale?, A* o_shift?, A* o_g?, A* o_h?, A* o_r?, A* o_d?, " + UPDATE_ARGS)
_PER_ACC = dict(A=ACCS)

# The statistics with the finalize fused in (moments.cu, the last block of each
# channel group merges): the moments kernels' arguments, the group counters
# (one zero each, left zero), then cubn_bn_finalize's.
_FUSED_DOMAINS = dict(T=FLOATS, WMODE=(0, 1, 2), VEC=_all_widths)
MOMENTS_CL_FUSED = Kernel(
    "cubn_moments_cl_fused", "moments.cu", "typename T, int WMODE, int VEC",
    "const T* x, i64 rows, int cols, int C, const A* w?, i64 wdiv=1, A* p_count, A* p_mean, A* p_m2, A* p_pivot, "
    "unsigned* counters, int weighted=0, " + FINALIZE_ARGS,
    _FUSED_DOMAINS)
MOMENTS_CF_FUSED = Kernel(
    "cubn_moments_cf_fused", "moments.cu", "typename T, int WMODE, int VEC",
    "const T* x, i64 outer, int C, i64 inner, int nsplit, i64 chunk, const A* w?, i64 wdiv=1, "
    "A* p_count, A* p_mean, A* p_m2, A* p_pivot, unsigned* counters, int weighted=0, " + FINALIZE_ARGS,
    _FUSED_DOMAINS)

BN_FINALIZE = Kernel(
    "cubn_bn_finalize", "finalize.cu", "typename A",
    "int C, int nparts=0, int fold=1, const A* p_count?, const A* p_mean?, const A* p_m2?, const A* pivot?, "
    "int weighted=0, const A* given_mean?, const A* given_var?, " + FINALIZE_ARGS,
    _PER_ACC, acc="A")
BN_UPDATE = Kernel(
    "cubn_bn_update", "finalize.cu", "typename A",
    "int C, const A* mean, const A* var, const A* count, A eps, " + UPDATE_ARGS,
    _PER_ACC, acc="A")
BWD_FINALIZE = Kernel(
    "cubn_bwd_finalize", "finalize.cu", "typename A",
    "int C, int nparts, int fold, const A* s1p, const A* s2p, const A* count, const A* invstd, const A* scale, "
    "const A* g, const A* h, int training, A* dgamma, A* dbeta, A* k1, A* k2",
    _PER_ACC, acc="A")
MERGE_PARTIALS = Kernel(
    "cubn_merge_partials", "finalize.cu", "typename A",
    "int C, int nparts, int fold, const A* p_count, const A* p_mean, const A* p_m2, const A* pivot?, "
    "A* o_count, A* o_mean, A* o_m2, A* o_pivot",
    _PER_ACC, acc="A")
MERGE_SUMS = Kernel(
    "cubn_merge_sums", "finalize.cu", "typename A",
    "int C, int nparts, int fold, const A* s1p, const A* s2p, A* o1, A* o2",
    _PER_ACC, acc="A")

# ---------------------------------------------------------------------------
# Elementwise (normalize.cu) and backward (backward.cu)
# ---------------------------------------------------------------------------
# Position modes (elementwise.cuh): POS_ELEMENT 0, POS_CHANNEL 1, POS_PATTERN 2.
POS_ELEMENT, POS_CHANNEL, POS_PATTERN = 0, 1, 2


def _fixed_positions(VEC, **_):
    # scalar access: each vector is one element, always in one channel
    return (POS_CHANNEL,) if VEC == 1 else (POS_CHANNEL, POS_PATTERN)


NORMALIZE = Kernel(
    "cubn_normalize", "normalize.cu", "typename T, int ACT, int VEC, int RAW, int POS, int SIDE, int IDX32",
    "const T* x, const T* side?, T* y, i64 n, int C, i64 inner, const A* mean, const A* p1, const A* p2?, "
    "const A* p3?, A eps=0, A alpha=0",
    dict(T=FLOATS, ACT=ACT_IDS, VEC=_scalar_or_widest, RAW=(0, 1), POS=_fixed_positions, SIDE=(0, 1),
         IDX32=(0, 1)))

_BWD_REDUCE_DOMAINS = dict(T=FLOATS, ACT=ACT_IDS, VEC=_all_widths)
BWD_REDUCE_CL = Kernel(
    "cubn_bwd_reduce_cl", "backward.cu", "typename T, int ACT, int VEC",
    "const T* dy, const T* x, const T* side?, i64 rows, int cols, int C, const A* mean, const A* scale, "
    "const A* shift, A alpha=0, A* p_s1, A* p_s2",
    _BWD_REDUCE_DOMAINS)
BWD_REDUCE_CF = Kernel(
    "cubn_bwd_reduce_cf", "backward.cu", "typename T, int ACT, int VEC",
    "const T* dy, const T* x, const T* side?, i64 outer, int C, i64 inner, int nsplit, i64 chunk, "
    "const A* mean, const A* scale, const A* shift, A alpha=0, A* p_s1, A* p_s2",
    _BWD_REDUCE_DOMAINS)
def _apply_positions(VEC, **_):
    # POS_ELEMENT: the weighted backward
    return (POS_ELEMENT,) + _fixed_positions(VEC)


def _index_widths(POS, **_):
    # the general walk has 64-bit indices only
    return (0,) if POS == POS_ELEMENT else (0, 1)


BWD_APPLY = Kernel(
    "cubn_bwd_apply", "backward.cu", "typename T, int ACT, int VEC, int POS, int IDX32",
    "const T* dy, const T* x, const T* side?, T* dx, T* dside?, i64 n, int C, i64 inner, const A* mean, "
    "const A* scale, const A* shift, const A* k1, const A* k2, const A* w?, int wmode=0, i64 wdiv=1, A alpha=0",
    dict(T=FLOATS, ACT=ACT_IDS, VEC=_scalar_or_widest, POS=_apply_positions, IDX32=_index_widths))

# ---------------------------------------------------------------------------
# The one-launch path (one_launch.cu): every channel in one block's registers
# ---------------------------------------------------------------------------
_ONE_LAUNCH_DOMAINS = dict(T=FLOATS, ACT=ACT_IDS, VEC=_scalar_or_widest, CL=(0, 1))
TRAIN_ONE_LAUNCH = Kernel(
    "cubn_bn_train_one_launch", "one_launch.cu", "typename T, int ACT, int VEC, int CL, int ITEMS",
    "const T* x, const T* side?, T* y, i64 outer, int C, i64 inner, A alpha=0, " + FINALIZE_ARGS,
    dict(_ONE_LAUNCH_DOMAINS, ITEMS=lambda T, VEC, CL, **_: one_launch_items(T.dtype, CL, VEC)))
BWD_ONE_LAUNCH = Kernel(
    "cubn_bn_bwd_one_launch", "one_launch.cu", "typename T, int ACT, int VEC, int CL, int ITEMS",
    "const T* dy, const T* x, const T* side?, T* dx, T* dside?, i64 outer, int C, i64 inner, const A* mean, "
    "const A* scale, const A* shift, const A* count, const A* invstd, const A* gcoef, const A* hcoef, "
    "int training, A alpha=0, A* dgamma, A* dbeta",
    _ONE_LAUNCH_DOMAINS, derived=dict(ITEMS=lambda T, VEC, **_: one_launch_backward_items(T.dtype, VEC)))

# ---------------------------------------------------------------------------
# Preprocessing (preprocess.cu)
# ---------------------------------------------------------------------------
# moments.cu's kernels for integer inputs and for float32 with double partials.
PP_MOMENTS_CL = MOMENTS_CL.instantiated_in("preprocess.cu", T=PP_STATS)
PP_MOMENTS_CF = MOMENTS_CF.instantiated_in("preprocess.cu", T=PP_STATS)
RM_MERGE = Kernel(
    "cubn_rm_merge", "preprocess.cu", "typename A",
    "int C, int nparts, int fold, const A* p_count, const A* p_mean, const A* p_m2, const A* pivot?, "
    "double* s_count, double* s_mean, double* s_m2",
    _PER_ACC, acc="A")


def _inverse(Tin, Tout, **_):
    # Standardizer.inverse_transform maps a float array back to the same float dtype.
    return (0, 1) if Tin.dtype == Tout.dtype and _dtypes.TABLE[Tin.dtype].preprocessing_output else (0,)


def affine_vec(in_name: str, out_name: str) -> int:
    """The vector width of cubn_pp_affine: both the input and the output vector at most 16 bytes."""
    return _dtypes.VECTOR_BYTES // max(_dtypes.itemsize(in_name), _dtypes.itemsize(out_name))


def transpose_vec(in_name: str) -> int:
    """The vector width of cubn_pp_transpose's loads: 16 bytes of input."""
    return _dtypes.VECTOR_BYTES // _dtypes.itemsize(in_name)


PP_AFFINE = Kernel(
    "cubn_pp_affine", "preprocess.cu", "typename Tin, typename Tout, int INVERSE, int VEC",
    "const Tin* x, Tout* y, i64 n, int C, i64 inner, const A* a, const A* d",
    dict(Tin=PP_IN, Tout=PP_OUT, INVERSE=_inverse,
         VEC=lambda Tin, Tout, **_: tuple(sorted({1, affine_vec(Tin.dtype, Tout.dtype)}))),
    acc="PpAcc<Tin, Tout>")
PP_TRANSPOSE = Kernel(
    "cubn_pp_transpose", "preprocess.cu", "typename Tin, typename Tout, int CH_Q, int INVERSE, int VEC",
    "const Tin* x, Tout* y, i64 B, i64 P, int Q, int TP, int TQ, const A* a, const A* d",
    dict(Tin=PP_IN, Tout=PP_OUT, CH_Q=(0, 1), INVERSE=_inverse,
         VEC=lambda Tin, **_: tuple(sorted({1, transpose_vec(Tin.dtype)}))),
    acc="PpAcc<Tin, Tout>")

KERNELS = (
    MOMENTS_CL, MOMENTS_CF, MOMENTS_CL_FUSED, MOMENTS_CF_FUSED,
    BN_FINALIZE, BN_UPDATE, BWD_FINALIZE, MERGE_PARTIALS, MERGE_SUMS,
    NORMALIZE, BWD_REDUCE_CL, BWD_REDUCE_CF, BWD_APPLY,
    TRAIN_ONE_LAUNCH, BWD_ONE_LAUNCH,
    PP_MOMENTS_CL, PP_MOMENTS_CF, RM_MERGE, PP_AFFINE, PP_TRANSPOSE,
)


# ---------------------------------------------------------------------------
# Lookups
# ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def all_variants() -> tuple:
    return all_of(KERNELS)


@functools.lru_cache(maxsize=None)
def variants_for_source(source: str) -> tuple:
    return tuple(v for v in all_variants() if v.source == source)


def moments_kernels(dtype, acc) -> tuple:
    """(channels-last, channels-first) statistics kernels for ``dtype`` data accumulated in ``acc``.

    The ops' pairs (16-bit floats in float32, float32 and float64 in
    themselves) are moments.cu's; integers and float32 with float64 partials
    are preprocess.cu's instantiations of the same kernels.
    """
    if _dtypes.TABLE[_dtypes.name_of(dtype)].acc == _dtypes.name_of(acc):
        return MOMENTS_CL, MOMENTS_CF
    return PP_MOMENTS_CL, PP_MOMENTS_CF
