"""``tgi-core bench``: a load generator for any TGI- or OpenAI-compatible server.

``workload`` (length ranges, prompts of exact token lengths, seeded request plans),
``wire`` (the two streaming APIs' request bodies and events), ``client`` (concurrent
streaming clients over httpx, one result per request), ``stats`` (percentiles and the
per-concurrency summary), ``report`` (the terminal table and the JSON), ``plot`` (the
PNG, matplotlib imported only there) and ``command`` (the sweep the CLI runs). This
``__init__`` imports nothing.
"""
