"""The eval stage: per-language perplexity, expert-routing analysis, bilingual benchmark metrics,
bootstrap CIs over seeds and the sweep report.

- :mod:`.perplexity`: per-language loss/perplexity of any HF causal LM (strided sliding window).
- :mod:`.routing`: per-layer, per-language expert usage of HF MoE checkpoints, JSD, plots.
- :mod:`.bilingual`: accuracy, LPG, CLCS and ECE on parallel multiple-choice items.
- :mod:`.stats`: percentile bootstrap CIs and seed-paired differences.
- :mod:`.report`: Markdown + JSON + plots for a Hydra multirun sweep.

Sub-modules are imported on use so that ``import moe_adapt.eval`` stays light.
"""
