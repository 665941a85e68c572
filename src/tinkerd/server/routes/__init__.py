"""The HTTP routes, one module per group of the API; shared here: the REST path of one checkpoint."""

CHECKPOINT = "/training_runs/{run_id}/checkpoints/{kind}/{name}"  # the REST checkpoint_id is "{kind}/{name}"
