"""Physical channel pruning through torch-pruning's dependency graph."""
