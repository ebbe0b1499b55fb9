"""Code the test files share (they import no other test file): run from tests/, which pytest's default
import mode puts on sys.path, as ``from helpers.<module> import ...``.

- ``spawn``: WORLD gloo processes on CPU, per-rank results through files, a deadline; comparing them.
- ``student``: the tiny Qwen2 student, its per-rank batches and losses (DDP/FSDP2 and DeepSpeed suites).
- ``steering``: the small MLP / transformer, its losses and the independently steered gradient.
- ``trl``: the tiny Qwen2-VL student / teacher, the synthetic-task dataset, the trainer config and the
  independent per-component gradients (the TRL trainer suites).
- ``va_opd``: the VA-OPD loss written out rollout by rollout.
"""
