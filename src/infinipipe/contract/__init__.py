"""The contract every floor reads, free of torch: the Plan IR, chunk shapes, the cost model and units."""
