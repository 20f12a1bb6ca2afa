"""The schemas of an experiment file's ``sweep:`` and ``report:`` sections.

They sit below ``lynxsim.config`` (which validates a whole experiment file, these sections included) and below
the packages that run them (``lynxsim.sweep``, ``lynxsim.report``), so that the config never imports the
machinery that runs experiments: imports go downward only."""
