"""Compatibility module: the sessions live in their own files now.

``qfi/weight_session.py`` (weight faults with an undo log), ``qfi/activation_session.py``
(activation hooks), ``qfi/space.py`` (the index space of codes and the log rows) and
``qfi/outputs.py`` (walking module outputs).  The old names stay importable from here.
"""

from __future__ import annotations

from torch import Tensor

from qfi import outputs
from qfi.activation_session import ActivationSession, activations
from qfi.space import FaultSpace, get_fmt, log_rows
from qfi.weight_session import WeightSession, weights

_Space = FaultSpace


def first_float(out: object) -> Tensor | None:
    """The tensor that carries activation faults by default: the first floating tensor of ``out``
    (see ``qfi.outputs.pick``)."""
    hit = outputs.pick(out)
    return None if hit is None else hit[1]


__all__ = ["ActivationSession", "FaultSpace", "WeightSession", "activations", "first_float", "get_fmt",
           "log_rows", "weights"]
