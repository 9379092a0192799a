"""The training engine: the loop, its callbacks, checkpoints, optimiser and run folder."""
