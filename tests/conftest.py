"""Test-wide set-up: 8 simulated CPU devices for the sharding tests.

XLA reads XLA_FLAGS once, when jax initializes its backend, so this must run before any
test module imports jax. An XLA_FLAGS value that already has the flag is kept.
"""

import os

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count=8"

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _DEVICE_COUNT_FLAG).strip()
