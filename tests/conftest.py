"""Shared test configuration.

Hypothesis profiles (choose with the environment variable HYPOTHESIS_PROFILE):

  ci        the default: derandomized (the same examples on every run), no deadline,
            a moderate number of examples
  dev       random examples, more of them, failures kept in the local database
  thorough  many examples, for a long fuzzing session

Every test runs with `torch.empty` / `torch.empty_like` returning NaN-filled floating-point
tensors (`sparsedsl.testing.poison_empty`), so an output a kernel forgets to write fails
instead of passing with whatever memory it got. In Triton's interpreter, `tl.dot` refuses the
operand shapes the GPU compiler refuses (`sparsedsl.testing.gpu_dot_shapes`).
"""
from __future__ import annotations

import os

import pytest

# first, in every (xdist worker) process: without a GPU this selects Triton's interpreter,
# which must happen before any test module imports Triton (torch._dynamo, flex_attention)
import sparsedsl.runtime  # noqa: F401,E402
from sparsedsl.testing import gpu_dot_shapes, poison_empty

# the interpreter then refuses the tl.dot shapes the GPU compiler refuses (K < 16)
gpu_dot_shapes()

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is a test extra; tests that need it skip themselves
    settings = None

if settings is not None:
    settings.register_profile("ci", derandomize=True, deadline=None, max_examples=60,
                              database=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("dev", deadline=None, max_examples=300, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("thorough", deadline=None, max_examples=5000, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow,
                                                     HealthCheck.data_too_large])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _nan_empty():
    """torch.empty / torch.empty_like give NaN-filled floating-point tensors during a test."""
    with poison_empty():
        yield
