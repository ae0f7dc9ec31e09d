"""Planning: the plan IR, the cost model, the sequence processor, schedules and the solver."""
