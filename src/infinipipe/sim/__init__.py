"""Event-driven simulation of plans on the cost model."""
