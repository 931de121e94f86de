"""qfi: quantization-aware, bit-level fault injection for PyTorch.

>>> with qfi.weights(model, "int8", names="mlp") as w, w.inject(qfi.BitFlip(ber=1e-6), seed=0) as log:
...     accuracy = evaluate(model)
"""

from qfi.activation_session import ActivationSession, activations
from qfi.allocator import keep_freed_memory
from qfi.errors import QfiError
from qfi.faults import BitFlip, Fault, FlipCount, FlipSites, StuckAt, parse_bits
from qfi.log import FaultLog
from qfi.observers import Observer, observe
from qfi.select import NameFilter, NameInfo, list_names, select_modules, select_weights
from qfi.training import FaultAwareTraining, fault_aware
from qfi.weight_session import WeightSession, weights

__all__ = [
    "ActivationSession",
    "BitFlip",
    "Fault",
    "FaultAwareTraining",
    "FaultLog",
    "FlipCount",
    "FlipSites",
    "NameFilter",
    "NameInfo",
    "Observer",
    "QfiError",
    "StuckAt",
    "WeightSession",
    "activations",
    "fault_aware",
    "keep_freed_memory",
    "list_names",
    "observe",
    "parse_bits",
    "select_modules",
    "select_weights",
    "weights",
]
