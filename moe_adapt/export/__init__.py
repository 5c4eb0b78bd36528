"""Export: compressed and converted artefacts of a checkpoint and their per-language retention."""
