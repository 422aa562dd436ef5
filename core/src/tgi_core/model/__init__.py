"""What model plugins build on: checkpoint loading, tensor-parallel layers, the model contract.

Submodules: ``checkpoint`` (a Hugging Face folder), ``weights`` (lazy tensors),
``loader`` (build a model and fill its weights), ``base`` (the model contract),
``parallel`` (tensor-parallel placement), ``layers`` (the layer library), ``runner``
(drive a model over a paged cache), ``sources`` (what ``--model-id`` names: a folder or
a registered model source). This ``__init__`` imports nothing heavy.
"""
