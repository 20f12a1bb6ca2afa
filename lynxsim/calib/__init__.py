"""The GPU side of lynxsim: real kernels (``kernels/``, torch), the timing sweeps that write measured tables into
the hardware profile (``lynxsim calibrate``), and trace-driven validation of the cost model against iterations run
on the GPU (``lynxsim validate``).

Only the modules that time or execute kernels (``timing``, ``sweeps``, ``validate``, ``kernels``) import torch;
planning (``plan``), table writing (``profile_io``), comparison (``compare``) and the command-line wiring
(``commands``) do not, so they run and are tested anywhere.
"""
