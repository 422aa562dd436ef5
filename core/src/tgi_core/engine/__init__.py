"""The engine: request types, KV block manager, scheduler, sampler, runner, the loop.

``requests`` (what frontends build and receive), ``sequence`` (one generation's state),
``block_manager`` and ``scheduler`` (pure Python, no torch), ``sampler``,
``model_runner``, ``detokenizer``, ``engine``. This ``__init__`` imports nothing heavy.
"""
