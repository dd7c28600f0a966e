"""CLI tests build many backends over the same tiny model; each jits the same step.

A per-session persistent compilation cache lets identical programs compile
once (a cold cache changes nothing but time).
"""

import pytest


@pytest.fixture(scope="session", autouse=True)
def _jax_compilation_cache(tmp_path_factory):
  try:
    import jax
  except ImportError:  # the torch-only tests do not need it
    yield
    return
  old = (jax.config.jax_compilation_cache_dir,
         jax.config.jax_persistent_cache_min_compile_time_secs,
         jax.config.jax_persistent_cache_min_entry_size_bytes)
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield
  jax.config.update("jax_compilation_cache_dir", old[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", old[2])
