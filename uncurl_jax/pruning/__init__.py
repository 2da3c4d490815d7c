"""Expert pruning."""
