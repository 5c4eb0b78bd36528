"""The generic training loop: the :class:`~.trainer.Trainer` with its ordered, stateful callbacks
(:mod:`.callbacks`: metrics, NaN guard, checkpoints; :mod:`.progress`: progress and wandb, configured
by the ``logger`` group, :mod:`.config`), the curves picture (:mod:`.curves`) and the one "train into
a folder" sequence every training phase uses (:mod:`.phase`). What is trained on comes from elsewhere
(:mod:`moe_adapt.cpt`, :mod:`moe_adapt.distill`)."""
