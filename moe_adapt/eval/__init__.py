"""The eval stage: per-language perplexity, expert-routing analysis, bilingual benchmark metrics,
CIs over seeds (t-intervals) and the sweep report.

- :mod:`.perplexity`: per-language loss/perplexity of any HF causal LM (strided sliding window).
- :mod:`.routing`: per-layer, per-language expert usage of HF MoE checkpoints, JSD, plots.
- :mod:`.bilingual`: accuracy, LPG, CLCS and ECE on parallel multiple-choice items.
- :mod:`.stats`: t-intervals over seeds, item-level percentile bootstrap CIs, seed-paired differences.
- :mod:`.report`: Markdown + JSON + plots for a Hydra multirun sweep.
- :mod:`.config`: ``EvalConfig`` / ``ReportConfig`` (the ``eval`` and ``report`` config groups).
- :mod:`.evaluate`: the ``eval`` stage's work (:func:`~.evaluate.evaluate`; the stage itself is
  :mod:`moe_adapt.stages.eval`); :mod:`.heldout`, :mod:`.mc`, :mod:`.summary`
  are its held-out reader, multiple-choice scorer and Markdown/log views.
- :mod:`.harness`: lm-evaluation-harness tasks in-process (shipped tasks in ``tasks/``).
- the ``report`` stage (:mod:`moe_adapt.stages.report`) calls :func:`.report.write_report`.

Sub-modules are imported on use so that ``import moe_adapt.eval`` stays light.
"""
