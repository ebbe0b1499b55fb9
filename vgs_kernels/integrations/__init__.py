"""Integrations with training frameworks, one folder per framework, each an optional extra.

    from vgs_kernels.integrations.trl import VGSDistillationTrainer, VGSDistillationConfig  # pip install vgs-kernels[trl]

Importing ``vgs_kernels`` (or this package) never imports a framework: each folder imports its own.
"""
