"""moe_adapt's Hydra launchers (Hydra finds them by importing every module under ``hydra_plugins``).

- ``hydra/launcher=torchrun`` (:mod:`.torchrun_launcher`): each job of a sweep as its own
  ``torchrun --nproc-per-node=N -m moe_adapt ...`` process group on this machine, one after another.
- ``hydra/launcher=slurm`` is no plugin of ours: ``conf/hydra/launcher/slurm.yaml`` sets moe_adapt's
  defaults on hydra-submitit-launcher's ``submitit_slurm`` (the ``slurm`` extra).

Guide: ``launch/README.md`` ("Sweeps") and ``docs/config.md`` ("Sweeps").
"""
