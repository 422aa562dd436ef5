"""Tensor parallelism across processes and machines, on torch.distributed.

``topology`` (which rank this process is, from the config or a launcher's environment),
``group`` (joining the process group; the store; gloo on CPU, NCCL on CUDA), ``plan``
(a step's plan as int64 tensors, broadcast by rank 0), ``runner`` (rank 0's model
runner, which broadcasts each step's plan before running its own shard),
``liveness`` (heartbeats and the watch for dead or hung ranks), ``launcher`` (the
worker processes ``--num-shard N`` starts on this machine), ``supervisor`` (rank 0's
side of the group: startup, failure, shutdown) and ``worker`` (the loop every other
rank runs). This ``__init__`` imports nothing heavy.
"""
