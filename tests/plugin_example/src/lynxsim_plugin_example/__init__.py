"""Example lynxsim plug-ins, one of each kind (docs/extending.md): the ``top_n`` policy, the ``cohort``
scheduler, the ``weighted_round_robin`` router, the ``scaled`` cost model and the ``hot_experts`` routing
source. Each is small enough to read whole and has an effect a test can see in a run's records."""
