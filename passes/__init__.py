"""qgraph's passes, one per file; see README.md in this folder for the contract.

``PASSES`` is the one explicit table from pipeline-spec names to pass classes.
"""

from qgraph.passes.annotate import Annotate
from qgraph.passes.auto_precision import AutoPrecision
from qgraph.passes.calibrate import Calibrate
from qgraph.passes.fold_batchnorm import FoldBatchNorm
from qgraph.passes.gptq import GPTQ
from qgraph.passes.insert_distill_taps import InsertDistillTaps, RemoveDistillTaps
from qgraph.passes.insert_fake_quant import InsertFakeQuant
from qgraph.passes.insert_observers import InsertObservers
from qgraph.passes.insert_qdq import InsertQDQ
from qgraph.passes.smooth_quant import SmoothQuant

__all__ = [
    "PASSES",
    "Annotate",
    "AutoPrecision",
    "Calibrate",
    "FoldBatchNorm",
    "GPTQ",
    "InsertDistillTaps",
    "InsertFakeQuant",
    "InsertObservers",
    "InsertQDQ",
    "RemoveDistillTaps",
    "SmoothQuant",
]

#: Pipeline-spec name → pass class. Extend by adding a line here, not by registration at import.
PASSES = {
    "fold-batchnorm": FoldBatchNorm,
    "smooth-quant": SmoothQuant,
    "annotate": Annotate,
    "auto-precision": AutoPrecision,
    "insert-observers": InsertObservers,
    "calibrate": Calibrate,
    "insert-qdq": InsertQDQ,
    "gptq": GPTQ,
    "insert-fake-quant": InsertFakeQuant,
    "insert-distill-taps": InsertDistillTaps,
    "remove-distill-taps": RemoveDistillTaps,
}
