import jax
import pytest
from hypothesis import settings

# Bounded fuzzing in CI; `pytest --hypothesis-profile=deep` runs the long profile.
settings.register_profile("ci", max_examples=12, deadline=None)
settings.register_profile("deep", max_examples=300, deadline=None)
settings.load_profile("ci")

jax.config.update("jax_enable_x64", False)


def pytest_collection_modifyitems(config, items):
  platform = jax.default_backend()
  for item in items:
    if "gpu" in item.keywords and platform != "gpu":
      item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (run on the device with -m gpu)"))
    if "tpu" in item.keywords and platform != "tpu":
      item.add_marker(pytest.mark.skip(reason="needs a TPU"))
