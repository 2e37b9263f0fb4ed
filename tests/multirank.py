"""Run a test function on N gloo ranks (CPU) and collect what each rank returns.

The function must be importable (module level) so spawned processes can find it. Each rank gets
``RANK``/``WORLD_SIZE``/``MASTER_*`` set, the CPU redirect enabled and a gloo default group; the
function receives ``(rank, world_size, *args)`` and its return value (picklable) comes back in rank order.
"""

import os
import pickle
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port that was free a moment ago on localhost."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    import torch
    import torch.distributed as dist

    from megasimpo.parallel import cpu

    torch.set_num_threads(1)
    cpu.enable()
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        # Plain pickle copies tensor data; the queue's own pickler would send shared-memory
        # handles that vanish when this process exits before the parent reads them.
        queue.put((rank, "ok", pickle.dumps(fn(rank, world_size, *args))))
    except BaseException:  # report, then let the parent fail the test
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        except Exception:
            pass
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = 600.0):
    """Runs ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; returns results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    import queue as queue_mod
    import time

    results, errors = {}, []
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size and not errors:
            try:
                rank, status, value = queue.get(timeout=1.0)
            except queue_mod.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:
                    errors.append(f"ranks {dead} died (exit codes "
                                  f"{[procs[i].exitcode for i in dead]}) without reporting")
                elif time.monotonic() > deadline:
                    errors.append(f"timed out after {timeout}s")
                continue
            if status == "ok":
                results[rank] = pickle.loads(value)
            else:
                errors.append(f"rank {rank}:\n{value}")
    finally:
        for p in procs:
            p.join(timeout=5 if errors else timeout)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]
