"""Training runs: the run config, the one visible loop, workers, resume, checkpoints, output folder, trackers."""
