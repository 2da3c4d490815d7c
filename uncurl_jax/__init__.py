"""uncurl_jax."""
