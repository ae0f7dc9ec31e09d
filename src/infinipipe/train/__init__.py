"""The training job: the loop, metrics, checkpoints and reports."""
