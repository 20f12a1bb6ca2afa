"""lynxsim: a discrete-event simulator of Mixture-of-Experts LLM serving under batch-aware expert selection."""

import os as _os

__version__ = "0.1.0"

# numba reads its optimization level when first imported, which any module of the package may do: level 1 unless
# the environment says otherwise (lynxsim.jit says why).
_os.environ.setdefault("NUMBA_OPT", "1")
