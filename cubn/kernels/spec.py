"""Kernel specs: what the host knows about one CUDA kernel, stated once.

A [`Kernel`][Kernel] names a ``__global__`` function template of a ``.cu``
file, its template parameters with their domains (the variants cubn may
launch), and its arguments by name, each with its kind: a pointer to the
data type ``T`` (or ``Tin``/``Tout``), to the accumulation type ``A`` or to
``double``, const or not, nullable or not; or a scalar with its C type
(``int``, ``i64``, ``A``, ``double``). The argument list is written the way
the C signature is (``"const T* x, const T* side?, i64 n, A eps"``; ``?``
marks a nullable pointer, ``=v`` a default), and tests/test_kernel_specs.py
parses every ``.cu`` signature and compares it with its spec.

From the spec come the variant list ([`Kernel.variants`][Kernel.variants]: what the NVRTC
test compiles and the emulator builds), the checked lookup of one variant
([`Kernel.variant`][Kernel.variant]) and the argument tuple of a launch, built by name
([`Variant.args`][Variant.args]). The argument builder is generated once per
(kernel, accumulation type), so that a launch pays for nothing but its own
conversions: scalars become the NumPy scalar of their C type (which is how
CuPy and the emulator pass them by value), and None is refused for a
pointer that is not nullable.
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import _dtypes

KERNEL_DIR = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------
# Type-valued template arguments
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Element:
    """A type template argument: elements of ``dtype`` read by a kernel that accumulates in ``acc``."""

    dtype: str
    acc: str | None  # None: integers, which only the preprocessing transforms read as elements
    ctype: str = field(init=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "ctype", _dtypes.kernel_ctype(self.dtype, self.acc))

    def __str__(self) -> str:
        return self.ctype


def element(dtype, acc=None) -> Element:
    """The element of ``dtype`` (a name or a NumPy dtype); ``acc`` defaults to the ops' accumulation dtype."""
    key = (dtype, acc)
    e = _by_dtype.get(key)
    if e is None:
        name = _dtypes.name_of(dtype)
        e = _by_dtype[key] = _element(name, _dtypes.TABLE[name].acc if acc is None else _dtypes.name_of(acc))
    return e


_elements: dict = {}
_by_dtype: dict = {}  # (dtype as given, acc as given) -> Element: dtype.name is slow to ask each launch


def _element(name: str, acc: str) -> Element:
    key = (name, acc)
    e = _elements.get(key)
    if e is None:
        e = _elements[key] = Element(name, acc)
    return e


def elements(names, acc=None) -> tuple:
    """Elements of several dtype names; ``acc(name)`` picks each one's accumulation (default: the ops')."""
    return tuple(_element(n, acc(n) if acc is not None else _dtypes.TABLE[n].acc) for n in names)


# How each kind of kernel names its accumulation type ``A`` (in C, and from the template arguments).
ACC_RULES = {
    "AccOf<T>": ("typename AccOf<T>::type", lambda p: p["T"].acc),
    "PpAcc<Tin, Tout>": ("typename PpAcc<Tin, Tout>::type",
                         lambda p: _dtypes.compute_dtype(p["Tin"].dtype, p["Tout"].dtype).name),
    "A": (None, lambda p: p["A"].dtype),  # A is itself the template parameter
}


# ---------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------
SCALAR_TYPES = {"int": np.int32, "i64": np.int64, "double": np.float64, "float": np.float32}


@dataclass(frozen=True)
class Arg:
    """One kernel argument."""

    name: str
    ctype: str               # "T", "Tin", "Tout", "A", "double", "int", "i64", ...
    pointer: bool = False
    const: bool = False
    nullable: bool = False   # pointers only: None (nullptr) allowed
    default: object = None   # scalars only: the value when the caller omits it

    @property
    def c_declaration(self) -> str:
        return f"{'const ' if self.const else ''}{self.ctype}{'*' if self.pointer else ''} {self.name}"


_ARG = re.compile(r"(const\s+)?(\w+)\s*(\*)?\s*(\w+)(\?)?(?:\s*=\s*(\S+))?")


def parse_args(text: str) -> tuple:
    """``"const T* x, const A* w?, i64 wdiv=1"`` -> Args."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        m = _ARG.fullmatch(part)
        if m is None:
            raise ValueError(f"cannot read kernel argument {part!r}")
        const, ctype, star, name, nullable, default = m.groups()
        if nullable and not star:
            raise ValueError(f"{part!r}: only pointers are nullable")
        if default is not None and star:
            raise ValueError(f"{part!r}: pointers default to NULL only (write 'name?')")
        out.append(Arg(name, ctype, bool(star), bool(const), bool(nullable),
                       None if default is None else float(default) if ctype in ("A", "double", "float") else int(default)))
    return tuple(out)


@dataclass(frozen=True)
class TParam:
    name: str
    is_type: bool  # typename (an Element) or int


def parse_template(text: str) -> tuple:
    out = []
    for part in (p.strip() for p in text.split(",")):
        kind, name = part.split()
        if kind not in ("typename", "int"):
            raise ValueError(f"template parameter {part!r}: typename or int")
        out.append(TParam(name, kind == "typename"))
    return tuple(out)


# ---------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------
class Variant:
    """One template instantiation of one kernel in one source file.

    Equal and hashed by ``(source, kernel, targs)``: launchers cache compiled
    kernels under it.
    """

    __slots__ = ("source", "kernel", "targs", "params", "spec", "args", "_key")

    def __init__(self, spec: "Kernel", params: dict):
        self.spec = spec
        self.params = params
        self.source = spec.source
        self.kernel = spec.name
        self.targs = tuple(str(params[p.name]) for p in spec.template)
        self._key = (self.source, self.kernel, self.targs)
        # args(**named) -> the launch arguments in the kernel's order (see the module docstring)
        self.args = spec.packer(spec.acc_name(params))

    @property
    def name_expression(self) -> str:
        return f"{self.kernel}<{', '.join(self.targs)}>"

    @property
    def path(self) -> Path:
        return KERNEL_DIR / self.source

    @property
    def acc(self) -> np.dtype:
        """The accumulation dtype ``A`` of this instantiation."""
        return np.dtype(self.spec.acc_name(self.params))

    def __eq__(self, other):
        return isinstance(other, Variant) and self._key == other._key

    def __hash__(self):
        return hash(self._key)

    def __repr__(self):
        return f"<Variant {self.name_expression} ({self.source})>"


class Kernel:
    """The spec of one kernel template (see the module docstring).

    ``domains`` maps each template parameter to its values: a tuple, or a
    function of the parameters before it (by name) returning one. ``derived``
    parameters are computed from the others (a function of all of them) and
    never chosen by the caller. ``acc`` is the C spelling of the
    accumulation type the arguments call ``A`` (a key of ``ACC_RULES``).
    """

    def __init__(self, name, source, template, args, domains, *, acc="AccOf<T>", derived=None):
        self.name, self.source = name, source
        self.template = parse_template(template)
        self._tnames = tuple(p.name for p in self.template)
        self.arguments = parse_args(args)
        self.acc_rule = acc
        self.domains = dict(domains)
        self.derived = dict(derived or {})
        names = [p.name for p in self.template]
        if set(self.domains) | set(self.derived) != set(names) or set(self.domains) & set(self.derived):
            raise ValueError(f"{name}: every template parameter needs exactly one domain or derivation")
        if len({a.name for a in self.arguments}) != len(self.arguments):
            raise ValueError(f"{name}: repeated argument names")
        self._acc_of = ACC_RULES[acc][1]
        self._variants = None
        self._by_targs = None
        self._packers: dict = {}

    # -- the variant list ------------------------------------------------------
    def variants(self) -> tuple:
        """Every instantiation of the domains, in template-parameter order."""
        if self._variants is None:
            out = []
            chosen = [p.name for p in self.template if p.name in self.domains]
            for params in self._product(chosen, {}):
                for p, f in self.derived.items():
                    params[p] = f(**params)
                out.append(Variant(self, params))
            self._variants = tuple(out)
            self._by_targs = {v.targs: v for v in out}
        return self._variants

    def _product(self, names, given):
        if not names:
            yield dict(given)
            return
        first, rest = names[0], names[1:]
        dom = self.domains[first]
        values = dom(**given) if callable(dom) else dom
        for v in values:
            yield from self._product(rest, {**given, first: v})

    def variant(self, **params) -> Variant:
        """The registered variant with these template arguments (derived ones are computed).

        KeyError when the combination is not registered: nothing the NVRTC
        test has not compiled can be launched.
        """
        if self._by_targs is None:
            self.variants()
        if self.derived:
            params = dict(params)
            for p, f in self.derived.items():
                if p not in params:
                    params[p] = f(**{k: v for k, v in params.items() if k in self.domains})
        try:
            targs = tuple([str(params[n]) for n in self._tnames])
        except KeyError as e:
            raise TypeError(f"{self.name}: template argument {e.args[0]} missing") from None
        v = self._by_targs.get(targs)
        if v is None:
            raise KeyError(f"kernel variant {self.name}<{', '.join(targs)}> ({self.source}) is not registered")
        return v

    def acc_name(self, params) -> str:
        return self._acc_of(params)

    def instantiated_in(self, source, **domains) -> "Kernel":
        """The same kernel (same signature) instantiated by another source file over other domains."""
        k = Kernel.__new__(Kernel)
        k.__dict__.update(self.__dict__)
        k.source = source
        k.domains = {**self.domains, **domains}
        k._variants = k._by_targs = None
        k._packers = {}
        return k

    # -- launch arguments --------------------------------------------------------
    def packer(self, acc: str):
        """The argument builder for accumulation dtype ``acc``: keyword arguments -> tuple."""
        f = self._packers.get(acc)
        if f is None:
            f = self._packers[acc] = _make_packer(self.name, self.arguments, np.dtype(acc).type)
        return f

    def __repr__(self):
        return f"<Kernel {self.name} ({self.source}): {len(self.variants())} variants>"


def _make_packer(kernel: str, arguments, acc_type):
    """Generate ``kernel(*, name=..., ...) -> tuple``: Python binds the names (and
    reports missing or unknown ones), the body converts scalars and refuses
    NULL where the kernel does not accept it."""
    env = {"_null": _null_error, "_inf": math.inf}
    params, checks, items = [], [], []
    for i, a in enumerate(arguments):
        n = a.name
        if a.pointer:
            params.append(f"{n}=None" if a.nullable else n)
            if not a.nullable:
                checks.append(f"    if {n} is None: _null({kernel!r}, {a.c_declaration!r})")
            items.append(n)
            continue
        conv = acc_type if a.ctype == "A" else SCALAR_TYPES[a.ctype]
        env[f"_c{i}"] = conv
        if a.default is None:
            params.append(n)
        else:
            env[f"_d{i}"] = a.default
            params.append(f"{n}=_d{i}")
        items.append(f"_c{i}({n})")
    src = (f"def {kernel}(*, {', '.join(params)}):\n" + "".join(c + "\n" for c in checks)
           + f"    return ({', '.join(items)},)\n")
    exec(compile(src, f"<kernel arguments of {kernel}>", "exec"), env)  # noqa: S102 - our own text
    return env[kernel]


def _null_error(kernel, declaration):
    raise TypeError(f"{kernel}: argument '{declaration}' may not be None (NULL)")


def all_of(kernels) -> tuple:
    return tuple(itertools.chain.from_iterable(k.variants() for k in kernels))
