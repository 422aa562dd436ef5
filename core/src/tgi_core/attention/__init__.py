"""Attention backends: the protocol (``backend``), the per-step batch (``batch``), the
paged KV cache (``kv_cache``) and the built-in backends (``sdpa``, ``reference``).

This package's ``__init__`` imports nothing, so registering the built-ins stays cheap.
"""
