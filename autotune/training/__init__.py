"""Training: the Trainer, its callbacks, sample speech, the recovery loop and its outputs."""
