"""Optuna-driven search under `sweep` (`sweep.search: random | tpe`): the space and its validation (`space`), the
study's storage, sampler and pruner (`study`), one trial as a tune child (`trials`), pruning that cancels the
trial's job (`pruning`), the honest choice among trials (`choice`) and the study's report (`report`). Optuna is
the engine (sampling, pruning, shared storage, retries); these modules are the adapter to tune runs and jobs."""
