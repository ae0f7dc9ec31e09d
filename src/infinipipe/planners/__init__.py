"""Planners: the sequence processor, schedules, the checkpointing ILP, grouping, EPP and the baselines."""
