"""Every attribute key hpo writes on trials and studies: one name each, for the writer and every reader.

Optuna gives trials and studies two dictionaries each: user attributes, which the dashboard shows,
and system attributes, which it does not. The keys below are grouped by where they live. No other
module spells a key as a string literal.
"""

# --- Trial user attributes -----------------------------------------------------------------------
REASON = "fail_reason"  # why a FAIL trial failed, in words a person can act on; every FAIL has one
PID = "pid"  # the worker process running the trial, and
HOST = "host"  # the host it runs on (with PID: who owns the trial)
DEVICE = "device"  # "cpu" or "cuda:N": where it trains
DEVICE_NAME = "device_name"  # the device in words: "NVIDIA H100 80GB HBM3", "cpu x86_64 (2 threads)"
THREADS = "threads"  # CPU threads the trial's torch used
GPU_INDEX = "gpu_index"  # the CUDA device index, or None on the CPU
GPU_SLOT = "gpu_slot"  # [gpu, slot] claimed on this host, or None
SEED = "seed"  # the trial's seed; a retry keeps its original trial's
N_PARAMS = "n_params"  # the model's trainable parameters
EPOCH = "epoch"  # epochs finished so far
HISTORY = "history"  # one row per epoch: losses, accuracy, seconds
CHECKPOINT = "checkpoint"  # {"artifact_id", "epoch"}: a retried trial inherits it and resumes there
RESUMED_FROM = "resumed_from_epoch"  # on a retry that resumed: the checkpoint's epoch
RESUMED_EXACTLY = "resumed_exactly"  # ... and whether it resumed on the device type that saved it
TRIAL_MODEL = "trial_model"  # artifact id of a COMPLETE trial's trained weights, the finalizer's to reuse
VAL_OUTPUTS = "val_outputs"  # artifact id of a COMPLETE trial's validation probabilities
WARM_START = "warm_start"  # on a queued first trial: where its configuration came from
PLAN = "budget"  # the time budget's estimate that let the trial start (budget.Plan)
TRAIN_IMAGES = "train_images"  # images per training epoch
VAL_IMAGES = "val_images"  # images per validation pass
POOL_IMAGES = "pool_images"  # the data set's training pool, which the finalizer trains on
TEST_IMAGES = "test_images"  # the data set's test split, which the finalizer scores
WALL_TIME = "wall_time_s"  # seconds from the trial's start to its end, as its worker measured them

# --- Trial system attributes ---------------------------------------------------------------------
REQUEUE = "hpo:requeue"  # set before FAIL when a copy is due (reaper.fail); Optuna's retry keys are
# read through RetryHeartbeatStaleTrialCallback's public helpers, never by name

# --- Study user attributes -----------------------------------------------------------------------
SETTINGS = "settings"  # the study's settings in one line, for people (the dashboard's table)
FINAL = "hpo:final"  # the finalizer's summary: test accuracy, members, where the model is
FINAL_TEST_ACCURACY = "final_test_accuracy"  # the same accuracy alone, for the dashboard's table
EXTENDED = "hpo:extended"  # each `hpo extend`: when, and the budget before and after
DEADLINE = "hpo:deadline"  # the time budget: {"at": unix s, "time_s": budget, "set_at": unix s}
CALIBRATION = "hpo:calibration"  # one measured epoch's cost (budget.EpochCost)
DATA = "hpo:data"  # the fingerprint of the data it was created on (sources.DataSet.fingerprint)

# --- Study system attributes ---------------------------------------------------------------------
CONFIG = "hpo:config"  # the whole study file, as the study was created (or extended) with it
LIVENESS = "hpo:liveness"  # the heartbeat settings every host judges the study's trials by
