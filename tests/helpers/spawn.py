"""Several gloo processes on CPU, one spawn, each rank's results through a file, and the checks that
compare them with one process.

A test module defines, at module level (spawn pickles it by name; the child imports the test module
through the parent's sys.path), ``tasks(rank, path)``: it sets up the process group if it needs to and
returns the ``(name, thunk)`` pairs to run. ``spawn_ranks`` runs them on every rank; a thunk that raises
gives ``{"error": traceback}``, so one bug fails its test, not all of them, and the spawn is bounded by a
deadline, so a hang fails too.
"""
from __future__ import annotations

import contextlib
import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, tasks, port, path, world, env):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), **env)
    torch.set_num_threads(1)
    todo = tasks(rank, path)
    results = {}
    try:
        for name, fn in todo:
            try:
                results[name] = fn()
            except Exception:
                results[name] = {"error": traceback.format_exc()}
    finally:
        torch.save(results, os.path.join(path, f"rank{rank}.pt"))
        if dist.is_initialized():
            dist.destroy_process_group()  # else gloo may abort at teardown


def spawn_ranks(tasks, path, *, world: int, deadline: float, what: str = "the workers", env=None) -> list[dict]:
    """Runs ``tasks(rank, path)`` on ``world`` spawned processes (MASTER_ADDR/PORT, RANK, WORLD_SIZE,
    LOCAL_RANK and ``env`` set, one thread each); returns each rank's ``{name: result}``. Fails the
    test when they have not finished within ``deadline`` seconds."""
    path = str(path)
    ctx = mp.start_processes(_rank_main, args=(tasks, free_port(), path, world, dict(env or {})), nprocs=world,
                             join=False, start_method="spawn")
    stop = time.monotonic() + deadline
    while not ctx.join(timeout=5):
        if time.monotonic() > stop:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{what} did not finish within {deadline} s")
    return [torch.load(os.path.join(path, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def no_errors(ranks, name) -> list:
    """Each rank's result of ``name``; fails naming the rank and its traceback where one raised."""
    got = [r[name] for r in ranks]
    for r, res in enumerate(got):
        assert "error" not in res, f"rank {r}:\n{res['error']}"
    return got


def assert_params_close(got: dict, want: dict, *, atol: float, rtol: float, rank: int):
    """Every parameter of ``want`` equals rank ``rank``'s within the tolerances given."""
    for n, p in want.items():
        torch.testing.assert_close(got[n], p, atol=atol, rtol=rtol, msg=lambda m: f"rank {rank} {n}: {m}")


@contextlib.contextmanager
def one_thread():
    """The single-process reference on one thread (tiny tensors: more threads only wait for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
