"""Reuse schedules: which :class:`~fixedsim.reuse.Reuse` setting the layers use as training goes.

A schedule sees the training loss of every step (:meth:`ReuseSchedule.observe`) and says, when
it changes its mind, which setting to use from the next step on. The adaptive strategies of
Adaptive Deep Reuse (Ning, Guan and Shen, ICDE 2019) compare the mean loss of consecutive
windows of ``window`` steps: when the relative improvement of the latest window over the one
before falls below ``min_delta``, training is taken to have stopped improving at this setting.

* :class:`Constant`: one setting (or dense) throughout.
* :class:`Adaptive`: a list of stages from coarse (large ``L``, small ``H``: low remain ratio)
  to fine, ending with ``None`` (dense) if wanted; it moves to the next stage when the loss
  stops improving.
* :class:`ClusterReuseOff`: cross-batch cluster reuse (CR) until the loss stops improving, then
  the same ``L`` and ``H`` within batches only (CR = 0).

Write your own by subclassing :class:`ReuseSchedule`: keep every decision a function of the
losses seen (and of ``state_dict``), so that a resumed run makes the same decisions.
"""

from __future__ import annotations

import dataclasses
import math

from .core import Reuse

__all__ = ["ReuseSchedule", "Constant", "Adaptive", "ClusterReuseOff", "parse_reuse"]


class ReuseSchedule:
    """Base class: the current setting, changed from the losses of the steps.

    Subclasses implement :meth:`current` and may override :meth:`on_plateau` (called when the
    windowed loss stops improving); the windowing is done here.

    Parameters
    ----------
    window : int, default 50
        Steps per loss window.
    min_delta : float, default 0.01
        The relative improvement of a window's mean loss over the previous window below which
        the loss is said to have stopped improving.
    """

    def __init__(self, window: int = 50, min_delta: float = 0.01):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"schedule window must be an int >= 1, got {window!r}")
        if not isinstance(min_delta, (int, float)) or not math.isfinite(min_delta) \
                or min_delta < 0:
            raise ValueError(f"schedule min_delta must be >= 0, got {min_delta!r}")
        self.window, self.min_delta = window, float(min_delta)
        self._sum, self._n, self._prev = 0.0, 0, None
        self.changes: list = []  # (step, str(setting)) of every change

    def current(self) -> Reuse | None:  # pragma: no cover - interface
        raise NotImplementedError

    def on_plateau(self, step: int) -> bool:
        """Change the setting because the loss stopped improving; True if it changed."""
        return False

    def observe(self, step: int, loss: float) -> bool:
        """Record the loss of ``step``; True when the setting changes from the next step."""
        self._sum += float(loss)
        self._n += 1
        if self._n < self.window:
            return False
        mean, self._sum, self._n = self._sum / self._n, 0.0, 0
        prev, self._prev = self._prev, mean
        if prev is None or (prev - mean) >= self.min_delta * abs(prev):
            return False
        self._prev = None  # a fresh comparison after a change
        changed = self.on_plateau(step)
        if changed:
            self.changes.append((step, str(self.current())))
        return changed

    def state_dict(self) -> dict:
        return {"sum": self._sum, "n": self._n, "prev": self._prev,
                "changes": [list(c) for c in self.changes], **self._extra_state()}

    def load_state_dict(self, d: dict) -> None:
        self._sum, self._n, self._prev = d["sum"], d["n"], d["prev"]
        self.changes = [tuple(c) for c in d["changes"]]
        self._load_extra(d)

    def _extra_state(self) -> dict:
        return {}

    def _load_extra(self, d: dict) -> None:
        pass


class Constant(ReuseSchedule):
    """One setting throughout (None: dense)."""

    def __init__(self, setting: Reuse | None):
        super().__init__()
        self.setting = setting

    def current(self):
        return self.setting

    def __repr__(self):
        return f"Constant({self.setting})"


class Adaptive(ReuseSchedule):
    """Coarse to fine: the next stage each time the loss stops improving.

    Parameters
    ----------
    stages : sequence of Reuse or None
        In order; ``None`` is dense (no reuse) and is normally last.
    window, min_delta
        As :class:`ReuseSchedule`.

    Examples
    --------
    >>> from fixedsim.reuse import Reuse
    >>> from fixedsim.reuse.schedules import Adaptive
    >>> s = Adaptive([Reuse(L=75, H=4), Reuse(L=25, H=8), None], window=2, min_delta=0.05)
    >>> [s.observe(i, loss) for i, loss in enumerate([2.0, 2.0, 1.0, 1.0, 0.99, 0.99])]
    [False, False, False, False, False, True]
    >>> s.current()
    Reuse(L=25, H=8, scope='batch', input_grad='centroid')
    """

    def __init__(self, stages, window: int = 50, min_delta: float = 0.01):
        super().__init__(window, min_delta)
        self.stages = list(stages)
        if not self.stages or not all(s is None or isinstance(s, Reuse) for s in self.stages):
            raise ValueError(f"Adaptive stages must be a non-empty list of Reuse or None, "
                             f"got {stages!r}")
        self.stage = 0

    def current(self):
        return self.stages[self.stage]

    def on_plateau(self, step):
        if self.stage + 1 >= len(self.stages):
            return False
        self.stage += 1
        return True

    def _extra_state(self):
        return {"stage": self.stage}

    def _load_extra(self, d):
        self.stage = int(d["stage"])

    def __repr__(self):
        return f"Adaptive({[str(s) if s else 'dense' for s in self.stages]})"


class ClusterReuseOff(ReuseSchedule):
    """Cross-batch cluster reuse until the loss stops improving, then within batches only.

    Parameters
    ----------
    setting : Reuse
        Its scope is made ``"cross_batch"``; after the plateau it becomes ``"batch"``.
    """

    def __init__(self, setting: Reuse, window: int = 50, min_delta: float = 0.01):
        super().__init__(window, min_delta)
        if not isinstance(setting, Reuse):
            raise ValueError(f"ClusterReuseOff needs a Reuse setting, got {setting!r}")
        self.on = dataclasses.replace(setting, scope="cross_batch")
        self.off = dataclasses.replace(setting, scope="batch")
        self.cr = True

    def current(self):
        return self.on if self.cr else self.off

    def on_plateau(self, step):
        if not self.cr:
            return False
        self.cr = False
        return True

    def _extra_state(self):
        return {"cr": self.cr}

    def _load_extra(self, d):
        self.cr = bool(d["cr"])

    def __repr__(self):
        return f"ClusterReuseOff({self.off})"


def _options(parts, text):
    window, min_delta = 50, 0.01
    for p in parts:
        key, sep, val = p.partition("=")
        try:
            if key == "window" and sep:
                window = int(val)
            elif key == "min_delta" and sep:
                min_delta = float(val)
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"reuse {text!r}: expected window=INT or min_delta=FLOAT, "
                             f"got {p!r}") from None
    return window, min_delta


def parse_reuse(text: str) -> ReuseSchedule:
    """A schedule from its text form (the ``reuse`` field of a training config).

    * ``""`` or ``"none"``: dense throughout.
    * ``"L=25,H=8[,scope=...][,input_grad=...]"``: :class:`Constant`.
    * ``"adaptive:L=75,H=4;L=25,H=8;dense[:window=50][:min_delta=0.01]"``: :class:`Adaptive`
      (stages separated by ``;``; ``dense`` is no reuse).
    * ``"cr-off:L=25,H=8[:window=50][:min_delta=0.01]"``: :class:`ClusterReuseOff`.

    Examples
    --------
    >>> from fixedsim.reuse.schedules import parse_reuse
    >>> s = parse_reuse("adaptive:L=75,H=4;L=25,H=8;dense:window=20")
    >>> s.stages[0], s.window
    (Reuse(L=75, H=4, scope='batch', input_grad='centroid'), 20)
    """
    if not isinstance(text, str):
        raise ValueError(f"reuse must be a string, got {text!r}")
    t = text.strip()
    if t in ("", "none", "dense"):
        return Constant(None)
    kind, sep, rest = t.partition(":")
    if not sep:
        return Constant(Reuse.parse(t))
    parts = rest.split(":")
    if kind == "adaptive":
        stages = [None if s.strip() == "dense" else Reuse.parse(s)
                  for s in parts[0].split(";")]
        return Adaptive(stages, *_options(parts[1:], text))
    if kind == "cr-off":
        return ClusterReuseOff(Reuse.parse(parts[0]), *_options(parts[1:], text))
    raise ValueError(f"reuse {text!r}: expected '', 'L=..,H=..', 'adaptive:...' or "
                     "'cr-off:...'")
