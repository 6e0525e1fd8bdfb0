import zlib

import jax
import numpy as np
import pytest


jax.config.update("jax_enable_x64", True)


@pytest.fixture
def rng(request):
    """A NumPy generator seeded from the test's name, so failures reproduce."""
    seed = zlib.crc32(request.node.name.encode())
    print(f"seed: {seed}")
    return np.random.default_rng(seed)
