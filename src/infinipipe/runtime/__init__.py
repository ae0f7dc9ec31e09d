"""Execution of plans: single-process reference executor and the distributed stage executor."""
