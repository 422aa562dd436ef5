"""The HTTP server: Litestar app assembly, shared state, errors, built-in frontends.

This ``__init__`` imports nothing, so registering the built-in frontends stays cheap.
"""
