"""Test configuration: hypothesis profiles.

``ci`` (the default) is derandomized and small, so the property tests are reproducible and the
whole suite stays fast on two cores; ``thorough`` explores more (``--hypothesis-profile=thorough``
or ``HYPOTHESIS_PROFILE=thorough``).
"""
import os

import torch
from hypothesis import HealthCheck, settings

# The tests run many tiny models; on a shared machine intra-op threads only add contention
# (measured: a 6x6 conv chain case 0.4 s with one thread, 3 s with two under load).
torch.set_num_threads(1)

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
               print_blob=True)
settings.register_profile("ci", max_examples=40, derandomize=True, **_COMMON)
settings.register_profile("thorough", max_examples=1000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
