"""The user-attribute keys hpo writes on trials: one name each, for the writer and every reader."""

REASON = "fail_reason"  # why a FAIL trial failed, in words a person can act on; every FAIL has one
PID = "pid"  # the worker process running the trial, and
HOST = "host"  # the host it runs on (with PID: who owns the trial)
EPOCH = "epoch"  # epochs finished so far
HISTORY = "history"  # one row per epoch: losses, accuracy, seconds
CHECKPOINT = "checkpoint"  # {"artifact_id", "epoch"}: a retried trial inherits it and resumes there
TRIAL_MODEL = "trial_model"  # artifact id of a COMPLETE trial's trained weights, the finalizer's to reuse
WARM_START = "warm_start"  # on a queued first trial: where its configuration came from
