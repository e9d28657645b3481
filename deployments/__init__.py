"""Serving-graph stages: one module per stage plus the graph builder (the serving graph, issue #4)."""
