"""Sweeps: one experiment run at every point of a grid of config keys, in parallel, into a results store that
survives a crash (``lynxsim sweep``, ``lynxsim query``, ``lynxsim plot``)."""
