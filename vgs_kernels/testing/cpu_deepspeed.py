"""DeepSpeed through Accelerate on CPU processes (the tests, benchmarks and examples; nothing of it on GPUs)."""
from __future__ import annotations

import os


def deepspeed_on_cpu() -> dict:
    """Sets up Accelerate's DeepSpeed state on gloo in this (spawned or launched) CPU process, where
    Accelerate gives DeepSpeed no communication backend (it picks one only for an accelerator), and returns
    the trainer argument that makes a trainer take that state: ``accelerator_config={"use_configured_state":
    True}``. Call it before building each trainer's models and arguments: it also drops a previous trainer's
    ZeRO-3 config (transformers would build the next models partitioned) and Accelerate's state (an
    Accelerator takes its DeepSpeed plugin only into a fresh one)."""
    from accelerate.state import AcceleratorState, PartialState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    AcceleratorState._reset_state(reset_partial_state=False)
    launched = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        if launched is None:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
    return {"accelerator_config": {"use_configured_state": True}}
