"""Tiny VLMs and processors built from transformers configs and tokenizers trained in code (no
downloads): families.py, one case per supported family row; coverage.py, the README's families table
and the coverage of transformers' image-text-to-text families; ``python -m vgs_kernels.testing``.
Needs the vlm extra (transformers, tokenizers, pillow): imported only by tests, benchmarks and examples."""
from vgs_kernels.testing.coverage import TABLE_END, TABLE_START, coverage, families_table, update_readme
from vgs_kernels.testing.families import (BPE_ID_PATH_RAISES, CASES, TOKENIZER_KINDS, tiny_case, tiny_processor,
                                          tiny_vlm)

__all__ = ["TABLE_END", "TABLE_START", "coverage", "families_table", "update_readme", "BPE_ID_PATH_RAISES", "CASES",
           "TOKENIZER_KINDS", "tiny_case", "tiny_processor", "tiny_vlm"]
