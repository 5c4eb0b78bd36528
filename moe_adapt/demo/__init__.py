"""The demo's own model: a small dense checkpoint of a real family with a byte-level BPE tokenizer
(:mod:`.dense`), optionally pretrained on the offline demo corpus, and its schema (:mod:`.config`).
Used by the ``init_dense`` and ``teacher`` stages, so the whole pipeline runs on CPU with no download.
"""
