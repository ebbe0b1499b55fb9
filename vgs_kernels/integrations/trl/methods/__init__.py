"""The method table: ``VGSDistillationConfig(method=...)`` picks a row, one file each (row.py says what a
row provides). A new method adds a file and a row here, not branches in the trainers."""
from typing import Dict

from vgs_kernels.integrations.trl.methods import opd, va_opd, vgs
from vgs_kernels.integrations.trl.methods.row import FORWARD_KEYS, PASSES, TEXT_KEYS, Heads, LossResult, Method

METHODS: Dict[str, Method] = {"vgs": vgs.ROW, "opd": opd.ROW, "va_opd": va_opd.ROW}

__all__ = ["METHODS", "Method", "Heads", "LossResult", "PASSES", "FORWARD_KEYS", "TEXT_KEYS"]
