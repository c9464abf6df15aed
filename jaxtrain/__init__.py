"""jaxtrain: a pure-JAX training stack for MPT language models."""

__version__ = "0.1.0"
