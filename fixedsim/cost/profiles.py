"""Machine profiles: what a machine computes per second, per native format, and how fast it moves
bytes.

A profile is a TOML file (see docs/cost.md)::

    name = "h100"
    description = "..."
    kind = "published"            # or "measured" (written by fixedsim cost calibrate)
    [rates]                       # peak multiply-accumulates per second, per native format
    fp32 = 33.5e12
    fp16 = 494.7e12
    [memory]
    bandwidth = 3.35e12           # bytes per second
    cache_bytes = 52428800        # optional: a core's cache (a GPU's L2, a CPU's L2)
    cache_bandwidth = 1e13        # optional: bytes per second when a row's bytes fit in it
    llc_bytes = 16777216          # optional: a CPU's shared last-level cache (its share)
    llc_bandwidth = 5e10          # optional: bytes per second when they fit in that
    [overhead]
    per_call_s = 5e-6             # per native operation launched
    backward_call_s = 5e-6        # optional: per operation of a backward pass (default
                                  # per_call_s; autograd's calls cost more on a CPU)
    [efficiency]                  # optional: fraction of the peak rate a product reaches,
    points = [[1, 0.05], [64, 0.6], [512, 1.0]]  # by its smallest dimension (M, N or K);
    bf16 = [[1, 0.01], [256, 1.0]]               # per native format (else "points")
    [sources]
    "rates.fp32" = "where the number comes from"

Published profiles ship with fixedsim (:data:`PUBLISHED`: V100, A100, H100, H200 and the FPGA
of Gupta et al. 2015), each number with its source. :func:`calibrate` measures the machine it
runs on and returns a profile (``fixedsim cost calibrate`` writes it; ``--machine this``
reads it).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import time

from ..formats import FixedFormat, FloatFormat

__all__ = ["Profile", "NATIVE", "PUBLISHED", "load_profile", "native_class", "calibrate",
           "this_profile_path", "ProfileError"]

#: Native formats a profile may give a rate for, narrowest first. A format runs at the rate
#: of the first class that holds every one of its values (and that the profile has).
NATIVE = ("int8", "fp8", "int16", "fp16", "bf16", "tf32", "fp32", "fp64")

_DIR = pathlib.Path(__file__).parent / "profiles"
#: Names of the profiles that ship with fixedsim.
PUBLISHED = tuple(sorted(p.stem for p in _DIR.glob("*.toml")))

_SECTIONS = {"name", "description", "kind", "rates", "memory", "overhead", "efficiency",
             "conv_efficiency", "linear_efficiency", "kind_bandwidth", "sources", "array",
             "measured"}

#: The passes of a layer a profile's ``[conv_efficiency]`` and ``[linear_efficiency]`` name.
CONV_PASSES = ("forward", "grad_input", "grad_weight")


class ProfileError(ValueError):
    """A machine profile that is unknown or malformed (a ValueError)."""


def _holds(cls: str, fmt) -> bool:
    """Does native class ``cls`` hold every value of ``fmt`` (None: float64)?"""
    if fmt is None:
        return cls == "fp64"
    if isinstance(fmt, FixedFormat):
        bits = fmt.word_length + (0 if fmt.signed else 1)  # magnitude bits plus sign
        ints = {"int8": 8, "int16": 16}
        if cls in ints:
            return bits <= ints[cls]
        sig = {"fp8": 4, "fp16": 11, "bf16": 8, "tf32": 11, "fp32": 24, "fp64": 53}[cls]
        return bits - 1 <= sig  # integer codes up to 2**(bits-1), scaled by a power of two
    if not isinstance(fmt, FloatFormat):
        raise ProfileError(f"cost: not a format: {fmt!r}")
    if cls in ("int8", "int16"):
        return False
    if cls == "fp8":
        return ((fmt.exp_bits <= 4 and fmt.man_bits <= 3)
                or (fmt.exp_bits <= 5 and fmt.man_bits <= 2))
    e, m = {"fp16": (5, 10), "bf16": (8, 7), "tf32": (8, 10), "fp32": (8, 23),
            "fp64": (11, 52)}[cls]
    return fmt.exp_bits <= e and fmt.man_bits <= m


def native_class(fmt, rates) -> str:
    """The native format whose rate a product on ``fmt`` operands runs at: the narrowest class
    of ``rates`` that holds every value of ``fmt``.

    Examples
    --------
    >>> import fixedsim as fs
    >>> from fixedsim.cost.profiles import native_class
    >>> rates = {"fp32": 1, "fp16": 2, "bf16": 2, "int8": 4}
    >>> native_class(fs.FP16, rates), native_class(fs.FixedFormat(8, 4), rates)
    ('fp16', 'int8')
    >>> native_class(fs.FixedFormat(16, 14), rates), native_class(fs.FP8_E4M3, rates)
    ('fp32', 'fp16')
    """
    for cls in NATIVE:
        if cls in rates and _holds(cls, fmt):
            return cls
    raise ProfileError(f"cost: no native format of the profile holds {fmt!r} (it has "
                       f"{', '.join(rates) or 'no rates'}); add a wider rate such as fp64")


@dataclasses.dataclass(frozen=True)
class Profile:
    """A machine: peak MAC rate per native format, memory, per-call overhead, their sources.

    Attributes
    ----------
    name, description : str
    kind : {"published", "measured"}
    rates : dict of str to float
        Multiply-accumulates per second per native format (:data:`NATIVE`).
    bandwidth : float
        Bytes per second to and from main memory.
    cache_bytes, cache_bandwidth : float or None
        A cache's size and bandwidth (a GPU's L2; a CPU core's L2): a row whose bytes fit in
        it moves them at ``cache_bandwidth`` (when given).
    llc_bytes, llc_bandwidth : float or None
        A CPU's shared last-level cache (the share a core can hold: :func:`calibrate`
        takes half the L3) and its bandwidth: a row whose bytes exceed ``cache_bytes`` but
        fit in it moves them at ``llc_bandwidth`` (when given). The activations of a small
        network stay there between layers: without this level their elementwise passes
        were predicted at main memory's rate, 2-3x too slow.
    per_call_s : float
        Seconds per native operation launched (framework and launch overhead).
    backward_call_s : float or None
        Seconds per operation of a backward pass (None: ``per_call_s``).
    efficiency : dict of str to tuple of (int, float)
        Fraction of the peak rate a matrix product reaches, by its smallest dimension,
        interpolated in log2; per native format, ``"points"`` for the others (empty: the
        peak always).
    conv_efficiency : dict of str to tuple of (int, float)
        Fraction of a native format's peak rate a framework's convolution reaches, by its
        input channels, interpolated in log2, per pass: keys ``"fp32.forward"`` (format and
        pass; :func:`calibrate` measures each PyTorch float format on convolutions of its
        own) or ``"forward"`` (any format); passes ``forward``, ``grad_input``,
        ``grad_weight``. A convolution's product takes it instead of :attr:`efficiency` (a
        CPU library's convolution with one input channel runs 5-15x below the GEMM of the
        same M, N, K: it does not take the GEMM path); absent, the GEMM's. Fractions up to
        4: a library's convolution in a format without native arithmetic may run above the
        GEMM rate measured for that format.
    linear_efficiency : dict of str to float
        A Linear layer's backward pass against its forward product of the same M, N, K, per
        native format: ``"bf16.grad_input"`` (format and pass) or ``"grad_input"`` (any);
        the pass's product runs at :attr:`efficiency` times it (1 absent). On a CPU without
        BF16 or FP16 arithmetic the input gradient's product (the weight not transposed)
        runs several times slower than the forward's.
    kind_bandwidth : dict of str to float
        Bytes per second of the machine's own kernel for one pass of a kind of layer
        (``"MaxPool2d.forward"``: a row's ``kind.product``), measured on a shape of its own:
        those rows move their bytes at this rate instead of the memory's (a framework's CPU
        max pooling runs far below the bandwidth, its forward pass 10-20x below its
        backward).
    sources : dict of str to str
        Where each number comes from (``"rates.fp16"``: "...").
    measured : dict
        What :func:`calibrate` measured (the raw figures), for measured profiles.
    """

    name: str
    rates: dict
    bandwidth: float
    per_call_s: float = 0.0
    backward_call_s: float | None = None
    cache_bytes: float | None = None
    cache_bandwidth: float | None = None
    llc_bytes: float | None = None
    llc_bandwidth: float | None = None
    efficiency: dict = dataclasses.field(default_factory=dict)
    kind_bandwidth: dict = dataclasses.field(default_factory=dict)
    conv_efficiency: dict = dataclasses.field(default_factory=dict)
    linear_efficiency: dict = dataclasses.field(default_factory=dict)
    description: str = ""
    kind: str = "published"
    sources: dict = dataclasses.field(default_factory=dict)
    measured: dict = dataclasses.field(default_factory=dict)
    array: dict = dataclasses.field(default_factory=dict)

    def rate(self, fmt) -> tuple[str, float]:
        """``(class, MAC/s)`` of products on ``fmt`` operands (:func:`native_class`)."""
        cls = native_class(fmt, self.rates)
        return cls, self.rates[cls]

    def gemm_efficiency(self, M: int, N: int, K: int, cls: str = "") -> float:
        """Fraction of the peak a ``(M, K) @ (K, N)`` product on native format ``cls`` reaches
        (1.0 without a table)."""
        pts = self.efficiency.get(cls) or self.efficiency.get("points", ())
        return _log2_interp(pts, min(M, N, K)) if pts else 1.0

    def conv_efficiency_at(self, product: str, channels: int, cls: str = "") -> float | None:
        """Fraction of native format ``cls``'s peak of a convolution's ``product`` pass with
        ``channels`` input channels (:attr:`conv_efficiency`: the format's table, else the
        pass's); None without a table."""
        pts = self.conv_efficiency.get(f"{cls}.{product}") or self.conv_efficiency.get(product)
        return _log2_interp(pts, channels) if pts else None

    def linear_factor(self, product: str, cls: str = "") -> float:
        """A Linear layer's ``product`` pass against its forward product on native format
        ``cls`` (:attr:`linear_efficiency`; 1.0 when not given)."""
        t = self.linear_efficiency
        return t.get(f"{cls}.{product}", t.get(product, 1.0))

    def memory_rate(self, nbytes: float, kind: str = "") -> float:
        """Bytes per second for a row moving ``nbytes`` (``kind``: the row's
        ``"Kind.product"``, looked up in :attr:`kind_bandwidth`)."""
        if kind in self.kind_bandwidth:
            return self.kind_bandwidth[kind]
        if self.cache_bandwidth and self.cache_bytes and nbytes <= self.cache_bytes:
            return self.cache_bandwidth
        if self.llc_bandwidth and self.llc_bytes and nbytes <= self.llc_bytes:
            return self.llc_bandwidth
        return self.bandwidth

    # -- files ----------------------------------------------------------------------------
    def to_toml(self) -> str:
        """The profile as TOML (the format :func:`load_profile` reads)."""
        def q(s):
            return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'

        out = [f"name = {q(self.name)}", f"description = {q(self.description)}",
               f"kind = {q(self.kind)}", "", "[rates]"]
        out += [f"{k} = {float(v)!r}" for k, v in self.rates.items()]
        out += ["", "[memory]", f"bandwidth = {float(self.bandwidth)!r}"]
        if self.cache_bytes is not None:
            out.append(f"cache_bytes = {float(self.cache_bytes)!r}")
        if self.cache_bandwidth is not None:
            out.append(f"cache_bandwidth = {float(self.cache_bandwidth)!r}")
        for k in ("llc_bytes", "llc_bandwidth"):
            if getattr(self, k) is not None:
                out.append(f"{k} = {float(getattr(self, k))!r}")
        out += ["", "[overhead]", f"per_call_s = {float(self.per_call_s)!r}"]
        if self.backward_call_s is not None:
            out.append(f"backward_call_s = {float(self.backward_call_s)!r}")
        if self.efficiency:
            out += ["", "[efficiency]"]
            for k, table in self.efficiency.items():
                pts = ", ".join(f"[{int(d)}, {float(e)!r}]" for d, e in table)
                out.append(f"{k} = [{pts}]")
        if self.conv_efficiency:
            out += ["", "[conv_efficiency]"]
            for k, table in self.conv_efficiency.items():
                pts = ", ".join(f"[{int(d)}, {float(e)!r}]" for d, e in table)
                out.append(f"{q(k)} = [{pts}]")
        if self.linear_efficiency:
            out += ["", "[linear_efficiency]"]
            out += [f"{q(k)} = {float(v)!r}" for k, v in self.linear_efficiency.items()]
        if self.kind_bandwidth:
            out += ["", "[kind_bandwidth]"]
            out += [f"{q(k)} = {float(v)!r}" for k, v in self.kind_bandwidth.items()]
        if self.array:
            out += ["", "[array]"] + [f"{k} = {v!r}" for k, v in self.array.items()]
        if self.measured:
            out += ["", "[measured]"]
            for k, v in self.measured.items():
                out.append(f"{q(k)} = {q(v) if isinstance(v, str) else repr(float(v))}")
        out += ["", "[sources]"] + [f"{q(k)} = {q(v)}" for k, v in self.sources.items()]
        return "\n".join(out) + "\n"

    def save(self, path) -> None:
        pathlib.Path(path).write_text(self.to_toml())


def _log2_interp(pts, d) -> float:
    """``pts`` (``(x, y)``, ``x`` increasing) at ``x = d``: interpolated in ``log2(x)``, the
    ends held beyond them."""
    d = max(1, d)
    if d <= pts[0][0]:
        return pts[0][1]
    for (d0, e0), (d1, e1) in zip(pts, pts[1:], strict=False):
        if d <= d1:
            t = (math.log2(d) - math.log2(d0)) / (math.log2(d1) - math.log2(d0))
            return e0 + t * (e1 - e0)
    return pts[-1][1]


def _toml(text: str, where: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ProfileError(f"{where}: not valid TOML: {err}") from None


def _number(d, key, where, *, low=0, strict=True, required=True):
    if key not in d:
        if required:
            raise ProfileError(f"{where}: missing {key!r} (a number)")
        return None
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or (v <= low if strict else v < low):
        raise ProfileError(f"{where}: {key} must be a finite number "
                           f"{'>' if strict else '>='} {low}, got {v!r}")
    return float(v)


def _points(raw, what: str, x: str, xs: str, top: float = 1.0) -> tuple:
    """``((x, fraction), ...)`` from a TOML list ``[[x, fraction], ...]``: ``x >= 1``
    increasing, fractions in (0, top]."""
    ok = isinstance(raw, list) and raw and all(
        isinstance(p, list) and len(p) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in p)
        and p[0] >= 1 and 0 < p[1] <= top for p in raw)
    if not ok or [p[0] for p in raw] != sorted({p[0] for p in raw}):
        raise ProfileError(f"{what} must be [[{x}, fraction], ...] with {xs} >= 1 increasing "
                           f"and fractions in (0, {top:g}], got {raw!r}")
    return tuple((int(a), float(b)) for a, b in raw)


def profile_from_dict(d: dict, where: str = "profile") -> Profile:
    """A :class:`Profile` from parsed TOML; every error names ``where`` and the key."""
    if not isinstance(d, dict):
        raise ProfileError(f"{where}: expected a table, got {type(d).__name__}")
    unknown = sorted(set(d) - _SECTIONS)
    if unknown:
        raise ProfileError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: "
                           f"{', '.join(sorted(_SECTIONS))}")
    name = d.get("name")
    if not isinstance(name, str) or not name:
        raise ProfileError(f"{where}: 'name' must be a non-empty string, got {name!r}")
    rates = d.get("rates")
    if not isinstance(rates, dict) or not rates:
        raise ProfileError(f"{where}: [rates] must give at least one native format's MAC/s "
                           f"({', '.join(NATIVE)})")
    bad = sorted(set(rates) - set(NATIVE))
    if bad:
        raise ProfileError(f"{where}: [rates] has unknown format(s) {', '.join(map(repr, bad))}; "
                           f"known: {', '.join(NATIVE)}")
    rates = {k: _number(rates, k, f"{where} [rates]") for k in NATIVE if k in rates}
    mem = d.get("memory")
    if not isinstance(mem, dict):
        raise ProfileError(f"{where}: missing the [memory] table (bandwidth in bytes/s)")
    over = d.get("overhead", {})
    if not isinstance(over, dict):
        raise ProfileError(f"{where}: [overhead] must be a table")
    eff = d.get("efficiency", {})
    for table, t, allowed in (("memory", mem, {"bandwidth", "cache_bytes", "cache_bandwidth",
                                               "llc_bytes", "llc_bandwidth"}),
                              ("overhead", over, {"per_call_s", "backward_call_s"}),
                              ("efficiency", eff, {"points", *NATIVE})):
        extra = sorted(set(t) - allowed) if isinstance(t, dict) else []
        if extra:
            raise ProfileError(f"{where}: [{table}] has unknown key(s) "
                               f"{', '.join(map(repr, extra))}; allowed: "
                               f"{', '.join(sorted(allowed))}")
    if not isinstance(eff, dict):
        raise ProfileError(f"{where}: [efficiency] must be a table")
    pts = {key: _points(raw, f"{where}: [efficiency] {key}", "dim", "dims")
           for key, raw in eff.items()}
    keys = set(CONV_PASSES) | {f"{c}.{p}" for c in NATIVE for p in CONV_PASSES}
    tables = {}
    for section in ("conv_efficiency", "linear_efficiency"):
        t = d.get(section, {})
        if not isinstance(t, dict):
            raise ProfileError(f"{where}: [{section}] must be a table of passes "
                               f"({', '.join(CONV_PASSES)}, or 'fp32.forward' ...)")
        extra = sorted(set(t) - keys)
        if extra:
            raise ProfileError(f"{where}: [{section}] has unknown key(s) "
                               f"{', '.join(map(repr, extra))}; allowed: a pass "
                               f"({', '.join(CONV_PASSES)}) or a native format and a pass "
                               f"('bf16.grad_input')")
        tables[section] = t
    conv = {key: _points(raw, f"{where}: [conv_efficiency] {key}", "channels", "channels",
                         top=4.0)
            for key, raw in tables["conv_efficiency"].items()}
    lin = {key: _number(tables["linear_efficiency"], key, f"{where} [linear_efficiency]")
           for key in tables["linear_efficiency"]}
    kb = d.get("kind_bandwidth", {})
    if not isinstance(kb, dict):
        raise ProfileError(f"{where}: [kind_bandwidth] must be a table of layer passes "
                           "(\"MaxPool2d.forward\") to bytes/s")
    kb = {k: _number(kb, k, f"{where} [kind_bandwidth]") for k in kb}
    kind = d.get("kind", "published")
    if kind not in ("published", "measured"):
        raise ProfileError(f"{where}: kind must be 'published' or 'measured', got {kind!r}")
    sources = d.get("sources", {})
    if not isinstance(sources, dict) or not all(isinstance(v, str) for v in sources.values()):
        raise ProfileError(f"{where}: [sources] must map keys such as \"rates.fp16\" to text")
    return Profile(
        name=name, rates=rates, bandwidth=_number(mem, "bandwidth", f"{where} [memory]"),
        cache_bytes=_number(mem, "cache_bytes", f"{where} [memory]", required=False),
        cache_bandwidth=_number(mem, "cache_bandwidth", f"{where} [memory]", required=False),
        llc_bytes=_number(mem, "llc_bytes", f"{where} [memory]", required=False),
        llc_bandwidth=_number(mem, "llc_bandwidth", f"{where} [memory]", required=False),
        per_call_s=_number(over, "per_call_s", f"{where} [overhead]", strict=False,
                           required=False) or 0.0,
        backward_call_s=_number(over, "backward_call_s", f"{where} [overhead]", strict=False,
                                required=False),
        efficiency=pts, kind_bandwidth=kb, conv_efficiency=conv, linear_efficiency=lin,
        description=str(d.get("description", "")),
        kind=kind,
        sources=dict(sources), measured=dict(d.get("measured", {})),
        array=dict(d.get("array", {})))


def this_profile_path() -> pathlib.Path:
    """Where ``fixedsim cost calibrate`` keeps this machine's profile: ``$FIXEDSIM_PROFILE``,
    else ``~/.cache/fixedsim/this.toml``."""
    env = os.environ.get("FIXEDSIM_PROFILE")
    if env:
        return pathlib.Path(env)
    return pathlib.Path.home() / ".cache" / "fixedsim" / "this.toml"


def load_profile(machine) -> Profile:
    """A profile by name (:data:`PUBLISHED`, or ``"this"``: the calibrated profile of this
    machine) or by the path of a ``.toml`` file.

    Raises
    ------
    ProfileError (a ValueError)
        An unknown name, a file that cannot be read, malformed TOML or a malformed profile
        (each message names the file and the key); ``"this"`` before calibration.
    """
    if isinstance(machine, Profile):
        return machine
    if not isinstance(machine, (str, os.PathLike)):
        raise ProfileError(f"cost: machine must be a profile name or a .toml path, "
                           f"got {machine!r}")
    text = str(machine)
    if text.lower() in PUBLISHED:
        path = _DIR / f"{text.lower()}.toml"
    elif text.lower() == "this":
        path = this_profile_path()
        if not path.is_file():
            raise ProfileError(f"cost: no profile of this machine yet ({path}); run "
                               f"`fixedsim cost calibrate` first (it measures this machine "
                               f"in under a minute and writes it there)")
    elif text.endswith(".toml") or pathlib.Path(text).is_file():
        path = pathlib.Path(text)
    else:
        raise ProfileError(f"cost: unknown machine {text!r}; expected one of "
                           f"{', '.join(PUBLISHED)}, 'this' (after fixedsim cost calibrate) or "
                           f"the path of a .toml profile")
    try:
        raw = path.read_text()
    except OSError as err:
        raise ProfileError(f"machine profile {path}: {err.strerror}") from None
    return profile_from_dict(_toml(raw, f"machine profile {path}"), f"machine profile {path}")


# -- calibration -------------------------------------------------------------------------------
#: The clock of calibrate: wall time, or with one thread the process's CPU time (which leaves
#: out the time other processes of a shared machine hold the core).
_clock = time.perf_counter


def _best(fn, min_time=0.15, reps=3) -> float:
    """Best seconds per call of ``fn`` over ``reps`` rounds of at least ``min_time`` each."""
    fn()
    best = math.inf
    for _ in range(reps):
        n, t0 = 0, _clock()
        while True:
            fn()
            n += 1
            dt = _clock() - t0
            if dt >= min_time:
                break
        best = min(best, dt / n)
    return best


def _gemm_libraries():
    """``{class: (library name, matmul, make_a(M, K), make_b(K, N))}``: the fastest native
    library this machine has for each native format (PyTorch where installed, else numpy);
    ``matmul(make_a(M, K), make_b(K, N))`` is an ``(M, K) @ (K, N)`` product. PyTorch's
    float formats multiply as a ``Linear`` layer does, by ``torch.nn.functional.linear``
    with a contiguous ``(N, K)`` weight: on a CPU without native BF16 or FP16 arithmetic
    (AVX2), ``torch.matmul`` on those dtypes, or a weight passed transposed, runs 6-8x
    slower than the layer's kernel (0.6 against 4.0-5.1 GMAC/s at 512^3 on an AMD EPYC Zen
    3), and a calibration on it predicted the networks' BF16 epochs 4-6x too long."""
    import numpy as np

    rng = np.random.default_rng(0)
    f64 = lambda m, k: rng.standard_normal((m, k))  # noqa: E731
    f32 = lambda m, k: rng.standard_normal((m, k)).astype(np.float32)  # noqa: E731
    libs = {"fp64": ("numpy float64", np.matmul, f64, f64),
            "fp32": ("numpy float32", np.matmul, f32, f32)}
    try:
        import torch
    except ImportError:
        return libs, None
    for cls, name, dt in (("fp32", "float32", torch.float32), ("bf16", "bfloat16", torch.bfloat16),
                          ("fp16", "float16", torch.float16)):
        libs[cls] = (f"torch {name} linear", torch.nn.functional.linear,
                     lambda m, k, dt=dt: torch.randn(m, k).to(dt),
                     lambda k, n, dt=dt: torch.randn(n, k).to(dt))  # the (N, K) weight
    if hasattr(torch, "_int_mm"):
        i8 = lambda m, k: torch.randint(-100, 100, (m, k), dtype=torch.int8)  # noqa: E731
        libs["int8"] = ("torch._int_mm int8", torch._int_mm, i8, i8)
    return libs, torch


#: Smallest dimensions at which calibrate measures the efficiency of products.
EFFICIENCY_DIMS = (1, 4, 16, 64)


def _rate(mm, make_a, make_b, M, N, K, min_time):
    a, b = make_a(M, K), make_b(K, N)
    return M * N * K / _best(lambda: mm(a, b), min_time=min_time)


def calibrate(*, quick: bool = False, threads: int | None = None, log=None) -> Profile:
    """Measure this machine: native GEMM rate per dtype, memory bandwidth, per-call overhead.

    - GEMM: for each native format, the fastest library installed (numpy float64; PyTorch
      float32, bfloat16 and float16 through ``torch.nn.functional.linear`` as a ``Linear``
      layer calls it, and int8 through ``torch._int_mm``, where installed, else numpy
      float32) at n = 512, the best of three rounds; and the efficiency of products
      whose smallest dimension d is 1, 4, 16 and 64 (the mean rate of ``(d, 256, 256)``,
      ``(256, d, 256)`` and ``(256, 256, d)``, over the square rate) per format;
    - memory: a STREAM-like add ``c = a + b`` over 3 x 64 MiB (main memory) and over 3 x 256
      KiB (cache), bytes read and written per second; where the CPU has an L3, half of it
      as a core's share (``llc_bytes``) and the same add over three arrays of an eighth of
      it (``llc_bandwidth``);
    - overhead: the seconds of a PyTorch operation on a one-element tensor recorded by
      autograd, and of its gradient through ``torch.autograd.grad`` (the backward calls); a
      numpy operation's when PyTorch is not installed;
    - with PyTorch: its 2x2 max pooling's bytes per second by pass (``kind_bandwidth``);
      for each float format, its convolutions' fraction of the format's GEMM rate by input
      channels and pass (``conv_efficiency``, :data:`CONV_CHANNELS`), and a Linear layer's
      backward passes against its forward (``linear_efficiency``).

    Takes 10 to 40 seconds (``quick``: a few). The best of several rounds is kept (other
    processes on a shared machine only ever slow a round down); the load average is recorded.
    ``threads``: the BLAS and PyTorch threads (default: the libraries' own); on a machine
    whose cores other processes keep busy, one thread measures what a thread gets, where
    several wait for each other at every product, and with one thread the times are the
    process's CPU time (the time it held the core). The count is recorded
    (``measured.threads``), and validation runs with it.
    """
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ProfileError(f"calibrate: threads must be an int >= 1, got {threads!r}")
        from threadpoolctl import threadpool_limits

        libs, torch = _gemm_libraries()
        old = torch.get_num_threads() if torch is not None else None
        try:
            if torch is not None:
                torch.set_num_threads(threads)
            with threadpool_limits(threads):
                return _calibrate(quick, log, threads)
        finally:
            if torch is not None:
                torch.set_num_threads(old)
    return _calibrate(quick, log, None)


def _calibrate(quick, log, threads) -> Profile:
    global _clock
    import numpy as np

    _clock = time.process_time if threads == 1 else time.perf_counter
    log = log or (lambda s: None)
    rng = np.random.default_rng(0)
    rates, src, meas, eff = {}, {}, {}, {}
    n = 256 if quick else 512
    mt = 0.05 if quick else 0.15
    libs, torch = _gemm_libraries()
    for cls in NATIVE:
        if cls not in libs:
            continue
        name, mm, make_a, make_b = libs[cls]
        try:
            r = _rate(mm, make_a, make_b, n, n, n, mt)
        except RuntimeError as err:  # a dtype this build does not multiply
            log(f"{name}: skipped ({err})")
            continue
        rates[cls] = r
        src[f"rates.{cls}"] = f"measured: {name}, {n}^3"
        meas[f"gemm.{cls}"] = r
        pts = []
        for d in EFFICIENCY_DIMS:
            m = 128 if quick else 256
            rs = [_rate(mm, make_a, make_b, *shape, mt / 3) for shape in
                  ((d, m, m), (m, d, m), (m, m, d))]
            pts.append((d, min(1.0, sum(rs) / 3 / r)))
        pts.append((n, 1.0))
        eff[cls] = tuple(pts)
        src[f"efficiency.{cls}"] = (f"measured: {name}, mean rate of (d,{m},{m}), ({m},d,{m}) "
                                    f"and ({m},{m},d) products over the {n}^3 rate")
        log(f"{name:20} GEMM {n}^3: {r / 1e9:8.1f} GMAC/s; efficiency at smallest dimension "
            + ", ".join(f"{d}: {e:.2f}" for d, e in pts[:-1]))
    # memory
    def stream(nbytes):
        m = nbytes // 8
        a, b, c = (rng.standard_normal(m) for _ in range(3))
        return 3 * m * 8 / _best(lambda: np.add(a, b, out=c), min_time=0.1)
    bw = stream(64 << 20)
    cbw = stream(256 << 10)
    meas["stream.64MiB"], meas["stream.256KiB"] = bw, cbw
    src["memory.bandwidth"] = "measured: numpy add c = a + b over 3 x 64 MiB float64"
    src["memory.cache_bandwidth"] = "measured: numpy add c = a + b over 3 x 256 KiB float64"
    cache = _cache_bytes(2)
    if cache:
        src["memory.cache_bytes"] = "read: the L2 cache of cpu0 (sysfs cache/index*/size)"
    l3 = _cache_bytes(3)
    llc = lbw = None
    if l3 and (cache is None or l3 / 2 > cache):
        llc = l3 / 2
        lbw = stream(int(llc / 8) // 8 * 8)  # 3 arrays in 3/8 of the L3
        meas["stream.llc"] = lbw
        src["memory.llc_bytes"] = ("read: half the L3 cache of cpu0 (sysfs cache/index*/size; "
                                   "shared with the other cores)")
        src["memory.llc_bandwidth"] = (f"measured: numpy add c = a + b over 3 x "
                                       f"{llc / 8 / 2**20:.0f} MiB float64")
    log(f"memory: {bw / 1e9:.1f} GB/s (64 MiB), {cbw / 1e9:.1f} GB/s (256 KiB)"
        + ("" if llc is None else f", {lbw / 1e9:.1f} GB/s (3 x {llc / 8 / 2**20:.0f} MiB, "
           f"in the L3)"))
    # overhead
    if torch is not None:
        x = torch.zeros(1, requires_grad=True)
        y = x * 2.0
        g = torch.ones(1)
        fwd = _best(lambda: x * 2.0, min_time=0.05)
        bwd = _best(lambda: torch.autograd.grad(y, x, g, retain_graph=True), min_time=0.05)
        over, back = fwd, bwd
        src["overhead.per_call_s"] = ("measured: a one-element PyTorch operation recorded by "
                                      "autograd")
        src["overhead.backward_call_s"] = ("measured: torch.autograd.grad of a one-element "
                                           "operation")
    else:
        x = np.zeros(1)
        over = _best(lambda: np.add(x, x), min_time=0.05)
        back = None
        src["overhead.per_call_s"] = "measured: numpy.add on one-element arrays"
    log(f"per call: {over * 1e6:.2f} us" + ("" if back is None else
                                            f", per backward call {back * 1e6:.2f} us"))
    kb = _pool_bandwidth(torch, mt) if torch is not None else {}
    for k, v in kb.items():
        meas[f"kind.{k}"] = v
        src[f"kind_bandwidth.{k}"] = (
            f"measured: torch max_pool2d 2x2, {k.split('.')[1]} pass, on {_POOL_SHAPE}, "
            "float32: the bytes fixedsim.cost counts for it over its time")
    if kb:
        log("max pooling: " + ", ".join(f"{k.split('.')[1]} {v / 1e9:.2f} GB/s"
                                        for k, v in kb.items()) + " of counted bytes")
    conv, lin = {}, {}
    if torch is not None:
        conv = _conv_efficiency(torch, rates, mt / 3)
        N, H, k, O = _CONV_GEOMETRY
        for key, table in conv.items():
            meas.update({f"conv.{key}.{c}": e for c, e in table})
            src[f"conv_efficiency.{key}"] = (
                f"measured: torch conv2d {k}x{k}, {O} outputs, no bias, on ({N}, C, {H}, {H}) "
                f"{key.split('.')[0]} data, {key.split('.')[1]} pass, C in {CONV_CHANNELS}: "
                f"its MAC rate over rates.{key.split('.')[0]}")
        log("convolutions (fraction of the GEMM rate, by input channels): " + "; ".join(
            f"{key} " + ", ".join(f"{c}: {e:.2f}" for c, e in table)
            for key, table in conv.items()))
        lin = _linear_efficiency(torch, rates, mt / 3)
        for key, v in lin.items():
            meas[f"linear.{key}"] = v
            src[f"linear_efficiency.{key}"] = (
                f"measured: torch linear {_LINEAR_SHAPE}, {key.split('.')[0]} data: the "
                f"forward's time over the {key.split('.')[1]} pass's (torch.autograd.grad)")
        log("Linear passes against the forward: " + ", ".join(
            f"{key} {v:.2f}" for key, v in lin.items()))
    return Profile(name="this", description=_cpu_name(), kind="measured", rates=rates,
                   bandwidth=bw, cache_bytes=cache, cache_bandwidth=cbw, llc_bytes=llc,
                   llc_bandwidth=lbw, per_call_s=over,
                   backward_call_s=back, efficiency=eff, kind_bandwidth=kb,
                   conv_efficiency=conv, linear_efficiency=lin, sources=src,
                   measured={"date": time.strftime("%Y-%m-%d %H:%M"),
                             "clock": "process CPU time" if threads == 1 else "wall time",
                             "load_average": os.getloadavg()[0],
                             "threads": threads if threads is not None else (
                                 torch.get_num_threads() if torch is not None
                                 else os.cpu_count()), **meas})


#: The shape :func:`_pool_bandwidth` pools: (N, C, H, W), none of the networks' own.
_POOL_SHAPE = (32, 32, 32, 32)


def _pool_bandwidth(torch, min_time) -> dict:
    """Bytes per second of PyTorch's 2x2 max pooling in training, float32, on
    :data:`_POOL_SHAPE`, by pass: ``{"MaxPool2d.forward": ..., "MaxPool2d.grad_input":
    ...}``, each the bytes :func:`~fixedsim.cost.counts.count_step` counts for that pass of
    such a layer over its least time (the forward keeps the indices, as in training)."""
    from ..nn import Conv2d, Flatten, Linear, MaxPool2d, Policy, Sequential
    from .counts import count_step

    N, C, H, W = _POOL_SHAPE
    # after a layer with parameters: the backward pass stops at the first of them, so a pool
    # before it has no input gradient
    model = Sequential(Conv2d(C, C, 1, rng=0), MaxPool2d(2), Flatten(),
                       Linear(C * (H // 2) * (W // 2), 10, rng=0))
    rows = {r.product: r.bytes for r in count_step(model, Policy.float32(), N, (C, H, W)).rows
            if r.kind == "MaxPool2d"}
    x = torch.randn(*_POOL_SHAPE, requires_grad=True)
    g = torch.randn(N, C, H // 2, W // 2)
    pool = torch.nn.MaxPool2d(2)
    y = pool(x)
    times = {"forward": _best(lambda: pool(x), min_time=min_time),
             "grad_input": _best(lambda: torch.autograd.grad(y, x, g, retain_graph=True),
                                 min_time=min_time)}
    return {f"MaxPool2d.{k}": rows[k] / t for k, t in times.items()}


#: Input channels at which :func:`_conv_efficiency` measures.
CONV_CHANNELS = (1, 2, 4, 8, 16, 32)
#: Its convolutions: batch, image side, kernel side, output channels (none of the networks').
_CONV_GEOMETRY = (32, 20, 5, 16)
#: PyTorch's float formats calibrate measures the layers of, by native class.
_TORCH_FLOATS = (("fp32", "float32"), ("bf16", "bfloat16"), ("fp16", "float16"))


def _conv_efficiency(torch, rates, min_time) -> dict:
    """PyTorch's convolution (no bias) on :data:`_CONV_GEOMETRY` with each of
    :data:`CONV_CHANNELS` input channels, in each float format of ``rates``: ``{"fp32.forward":
    ((C, fraction), ...), ...}``, the fraction its MACs per second (``N Ho Wo O C kh kw``,
    the GEMM's of every pass) are of the format's rate, at most 4; the input gradient
    through ``torch.autograd.grad`` as a backward pass computes it."""
    N, H, k, O = _CONV_GEOMETRY
    out = {}
    for cls, name in _TORCH_FLOATS:
        if cls not in rates:
            continue
        dt = getattr(torch, name)
        for C in CONV_CHANNELS:
            x = torch.randn(N, C, H, H).to(dt).requires_grad_(True)
            w = torch.randn(O, C, k, k).to(dt).requires_grad_(True)
            y = torch.nn.functional.conv2d(x, w)
            g = torch.randn(y.shape).to(dt)
            macs = y.numel() * C * k * k
            times = {"forward": _best(lambda x=x, w=w: torch.nn.functional.conv2d(x, w),
                                      min_time=min_time),
                     "grad_input": _best(lambda y=y, x=x, g=g: torch.autograd.grad(
                         y, x, g, retain_graph=True), min_time=min_time),
                     "grad_weight": _best(lambda y=y, w=w, g=g: torch.autograd.grad(
                         y, w, g, retain_graph=True), min_time=min_time)}
            for p, t in times.items():
                out.setdefault(f"{cls}.{p}", []).append((C, min(4.0, macs / t / rates[cls])))
    return {key: tuple(v) for key, v in out.items()}


#: calibrate's Linear layer: (batch, in features, out features).
_LINEAR_SHAPE = (64, 512, 512)


def _linear_efficiency(torch, rates, min_time) -> dict:
    """A PyTorch Linear layer (no bias) of :data:`_LINEAR_SHAPE`, in each float format of
    ``rates``: ``{"bf16.grad_input": factor, ...}``, the forward product's time over the
    pass's (the same MACs), each pass as a backward pass computes it."""
    B, I, O = _LINEAR_SHAPE
    out = {}
    for cls, name in _TORCH_FLOATS:
        if cls not in rates:
            continue
        dt = getattr(torch, name)
        x = torch.randn(B, I).to(dt).requires_grad_(True)
        w = torch.randn(O, I).to(dt).requires_grad_(True)
        y = torch.nn.functional.linear(x, w)
        g = torch.randn(y.shape).to(dt)
        fwd = _best(lambda x=x, w=w: torch.nn.functional.linear(x, w), min_time=min_time)
        for p, v in (("grad_input", x), ("grad_weight", w)):
            t = _best(lambda v=v, y=y, g=g: torch.autograd.grad(y, v, g, retain_graph=True),
                      min_time=min_time)
            out[f"{cls}.{p}"] = fwd / t
    return out


def _cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f", {os.cpu_count()} CPUs"
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _cache_bytes(level: int):
    """The size of cpu0's unified or data cache of ``level`` (sysfs), else None."""
    base = pathlib.Path("/sys/devices/system/cpu/cpu0/cache")
    for d in sorted(base.glob("index*")):
        try:
            if (int((d / "level").read_text()) != level
                    or (d / "type").read_text().strip() == "Instruction"):
                continue
            t = (d / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        mult = {"K": 1024, "M": 1024 ** 2}.get(t[-1:], 1)
        try:
            return float(int(t.rstrip("KM")) * mult)
        except ValueError:
            return None
    return None
