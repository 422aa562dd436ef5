"""One thread runs torch's parallel regions: the engine's.

With GNU OpenMP (PyTorch's CPU builds), every thread that opens a parallel region gets a
team of worker threads of its own. Once the main thread has had a team (while loading
the model, say), the engine thread's team runs its many short regions about twice as
slow: a SmolLM-135M-shaped decode step took 47 ms instead of 24 (libgomp shortens its
workers' spinning when it manages more threads than there are CPUs, and each region
then pays for waking them). So ``tgi-core serve`` leaves the main thread a single
intra-op thread, which never opens a team, from before the model loads, and the engine
thread, where every forward runs, takes the machine's threads.
"""

from __future__ import annotations


def reserve_threads_for_engine() -> int:
    """Give the calling thread one intra-op thread; return how many it had (for the engine).

    Call it in the main thread before any parallel torch work.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads
