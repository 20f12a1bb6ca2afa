"""``lynxsim report``: the Lynx paper's figures and tables, and what lies past them, regenerated from the
experiment files of experiments/paper/ through the sweep machinery."""
