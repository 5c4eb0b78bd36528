"""The upcycle stage: a dense Hugging Face checkpoint becomes a Hugging Face MoE checkpoint.

``copy.py``, ``fine_grained.py`` and ``drop.py`` are the methods, with one signature
(:data:`moe_adapt.upcycle.experts.Method`); ``layouts.py`` knows the target families;
``sizing.py`` solves the expert shapes; ``convert.py`` streams tensors from the dense checkpoint
into the new one; ``verify.py`` proves the result; ``config.py`` is the ``upcycle`` group's schema.
The stage that ties them together is :mod:`moe_adapt.stages.upcycle`.
"""
