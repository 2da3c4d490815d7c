"""seqio tasks."""
