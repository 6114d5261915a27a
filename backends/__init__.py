"""qgraph's backends, one folder each; see README.md in this folder for the contract.

``BACKENDS`` is the one explicit table from backend names to their modules' entry points.
"""

from qgraph.backends import onnxruntime, tensorrt

__all__ = ["BACKENDS", "onnxruntime", "tensorrt"]

#: Backend name → module exposing ``RULES`` (precision → BackendRules), ``lower`` and ``inspect``.
BACKENDS = {"tensorrt": tensorrt, "onnxruntime": onnxruntime}
