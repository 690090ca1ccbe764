"""Building and running one training job: the datamodule, network, trigger, method, callbacks and
loggers from a Hydra config (build), resuming safely (checkpoints), the run's summary (summary), and
one attempt at a run folder (run)."""
