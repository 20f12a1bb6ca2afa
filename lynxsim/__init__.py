"""lynxsim: a discrete-event simulator of Mixture-of-Experts LLM serving under batch-aware expert selection."""

__version__ = "0.1.0"
