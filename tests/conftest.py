"""Test-wide setup: 8 host CPU devices for the JAX sharding tests.

Must run before JAX initialises its backend, hence at conftest import time.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
