"""One experiment end to end: the round loop, checkpoints, the run folder, plans and comparisons."""
