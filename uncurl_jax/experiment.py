"""`python -m uncurl_jax.experiment`: an alias of `python -m uncurl_jax.study` (the study)."""

from uncurl_jax import cli
from uncurl_jax.study.__main__ import main

if __name__ == "__main__":
  cli.run(main)
