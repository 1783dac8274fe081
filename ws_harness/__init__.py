"""ws-harness: score hypotheses about which residual subspace carries a weight-steering diff."""

__version__ = "0.1.0"

__all__ = ["__version__"]
