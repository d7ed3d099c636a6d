"""Real matrix units as :class:`~fixedsim.MatmulSpec` presets, each with its provenance.

``spec(device, input, out="fp32")`` returns the spec of one device's matrix unit;
``devices()`` lists every preset with the data that validated it (or says that it is a
published model, not validated here). The presets are registered by the vendor modules
(:mod:`.nvidia`, :mod:`.cpu_units`), each built from the shared accumulator mechanisms of
:mod:`fixedsim.matmul` rather than a class per device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

__all__ = ["Preset", "devices", "register", "spec", "DEVICES", "INPUTS", "OUTPUTS",
           "MISSING"]

#: Every device name :func:`spec` knows, in the order :func:`devices` lists them.
DEVICES = ("V100", "A100", "A2", "A30", "Ada", "L40S", "H100", "H200", "B200",
           "MI100", "MI250", "MI300", "AVX512_BF16", "AMX_BF16", "AMX_FP16")
#: Input format names (case-insensitive in :func:`spec`).
INPUTS = ("fp16", "bf16", "tf32", "e4m3", "e5m2")
#: Output format names.
OUTPUTS = ("fp32", "fp16")


@dataclasses.dataclass(frozen=True)
class Preset:
    """One (device, input, output) combination of a matrix unit.

    Attributes
    ----------
    device, input, out : str
        Canonical names (``DEVICES``, ``INPUTS``, ``OUTPUTS``).
    build : callable
        ``build() -> MatmulSpec``.
    provenance : str
        What validated the model: the data, how many vectors and how many mismatched, or
        ``"published model, not validated here"`` with its source.
    vectors : int
        Measured vectors the model was checked on (0: none).
    mismatches : int or None
        Of those, how many differ in any bit (None: not validated).
    """

    device: str
    input: str
    out: str
    build: Callable
    provenance: str
    vectors: int = 0
    mismatches: int | None = None


_PRESETS: dict[tuple[str, str, str], Preset] = {}
#: (device, input, out) -> why a combination the device has is not a preset (the vendor
#: modules fill it); :func:`spec` raises with that reason.
MISSING: dict[tuple[str, str, str], str] = {}


def register(preset: Preset) -> Preset:
    """Add a preset (the vendor modules call this at import)."""
    key = (preset.device, preset.input, preset.out)
    if preset.device not in DEVICES or preset.input not in INPUTS or preset.out not in OUTPUTS:
        raise ValueError(f"unknown preset key {key}")
    if key in _PRESETS:
        raise ValueError(f"preset {key} registered twice")
    _PRESETS[key] = preset
    return preset


def _canonical(value, names, what):
    if not isinstance(value, str):
        raise TypeError(f"hardware.spec {what} must be a str, one of {', '.join(names)}; "
                        f"got {value!r}")
    for n in names:
        if n.lower() == value.lower():
            return n
    raise ValueError(f"hardware.spec {what}={value!r} is not known; {what} is one of "
                     f"{', '.join(names)}")


def spec(device: str, input: str, out: str = "fp32"):
    """The :class:`~fixedsim.MatmulSpec` of one device's matrix unit.

    Parameters
    ----------
    device : str
        One of :data:`DEVICES` (case-insensitive).
    input : str
        One of :data:`INPUTS` (case-insensitive).
    out : str, default "fp32"
        One of :data:`OUTPUTS`.

    Raises
    ------
    TypeError, ValueError
        A name that is not known, or a combination the device does not have (the error
        lists the inputs and outputs it has; for a combination the device has but no model
        here expresses, :data:`MISSING`'s reason).
    """
    d = _canonical(device, DEVICES, "device")
    i = _canonical(input, INPUTS, "input")
    o = _canonical(out, OUTPUTS, "out")
    p = _PRESETS.get((d, i, o))
    if p is None and (d, i, o) in MISSING:
        raise ValueError(f"hardware.spec: {d} has {i} input with {o} output, but no preset: "
                         f"{MISSING[(d, i, o)]}")
    if p is None:
        has = sorted(f"{k[1]}->{k[2]}" for k in _PRESETS if k[0] == d)
        raise ValueError(f"hardware.spec: {d} has no {i} input with {o} output; it has "
                         f"{', '.join(has) if has else 'no preset yet'}")
    return p.build()


def devices() -> list[Preset]:
    """Every preset, in the order of :data:`DEVICES`, then inputs, then outputs."""
    order = {n: i for i, n in enumerate(DEVICES)}
    ins = {n: i for i, n in enumerate(INPUTS)}
    outs = {n: i for i, n in enumerate(OUTPUTS)}
    return sorted(_PRESETS.values(),
                  key=lambda p: (order[p.device], ins[p.input], outs[p.out]))


from . import cpu_units, nvidia  # noqa: E402,F401  (register the CPU, AMD, NVIDIA presets)
