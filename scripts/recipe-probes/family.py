"""Model-family probe on the probe split: which conv blocks, widths and heads reach what validation
accuracy in how long, at the horizon a CPU budget affords.

The probe split never reads the images that rank a study's trials: it holds 6,000 images out of the
study's own training part (seed 0's 54,000) and trains on the other 48,000, so a family chosen
here is not chosen on the trials' validation split, nor on the test split.

Usage: .venv/bin/python scripts/recipe-probes/family.py EPOCHS THREADS NAME [NAME ...]
       (names below; prints one line per epoch and a summary line per configuration)
"""

import sys
import time

import numpy as np
import torch

from hpo.learn import data
from hpo.learn.devices import place
from hpo.learn.params import TrialParams
from hpo.learn.train import Hooks, TrainingRun, fit, seeded_model
from hpo.settings.config import Augment, TrainSettings

BASE = {"kernel_size": 3, "n_fc": 1, "dropout": 0.2, "batch_size": 128, "weight_decay": 5e-4}
ADAM = {"optimizer": "adam", "lr": 2e-3}
SGD = {"optimizer": "sgd", "lr": 0.05}


def residual(first: int, n_conv: int, optimizer: dict = ADAM) -> dict:
    """A residual point with a pooled head and FC 128, doubling its width per block from `first`."""
    return {**BASE, **optimizer, "n_conv": n_conv, "filters_0": first, "growth": 2.0, "fc_size": 128,
            "residual": True, "pool": "avg"}  # fmt: skip


CONFIGS = {
    # the warm start of the shipped studies: 2 plain blocks, flattened into a 256-unit layer
    "plain-32-64": {**BASE, **ADAM, "n_conv": 2, "filters_0": 32, "growth": 2.0, "fc_size": 256, "dropout": 0.3},
    "plain-32-64-128-avg": {
        **BASE,
        **ADAM,
        "n_conv": 3,
        "filters_0": 32,
        "growth": 2.0,
        "fc_size": 128,
        "pool": "avg",
    },  # fmt: skip
    "res-32-64-avg": residual(32, 2),
    "res-32-64-flat": {**residual(32, 2), "fc_size": 256, "pool": "flatten"},
    "res-24-48-96-avg": residual(24, 3),
    "res-32-64-128-avg": residual(32, 3),
    "res-16-32-avg": residual(16, 2),
    "res-16-32-64-avg": residual(16, 3),
    "res-32-64-128-avg-sgd": residual(32, 3, SGD),
}
RECIPE = TrainSettings(warmup_epochs=0.3, label_smoothing=0.1)
AUGMENT = Augment(2, True, 0.0)


def probe_split(device: torch.device) -> data.TrialData:
    images, labels = data.load_split(data.find_data_dir(), "train")
    study_train, _study_val = data.stratified_split(labels, 0.1, 0)  # the study's split: its val is never read
    inner_train, inner_val = data.stratified_split(labels[study_train], 6000 / len(study_train), 7)
    keep, held = study_train[inner_train], study_train[inner_val]
    assert not set(held.tolist()) & set(_study_val.tolist())
    return data.TrialData(
        data.DeviceData(images[keep], labels[keep], device), data.DeviceData(images[held], labels[held], device)
    )


def main() -> None:
    epochs, threads, names = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    placement = place("cpu", threads)
    split = probe_split(placement.device)
    print(
        f"probe split: {len(split.train)} train, {len(split.val)} held out of the study's training part; "
        f"{epochs} epochs, {threads} thread(s)",
        flush=True,
    )
    for name in names:
        params = TrialParams.from_flat(CONFIGS[name])
        model = seeded_model(params.model, 1, placement.device)
        started = time.perf_counter()

        def on_epoch(stats, name=name):
            print(f"{name} epoch {stats.epoch} val {stats.val_accuracy:.4f} ({stats.seconds:.1f}s)", flush=True)

        history = fit(
            model, split.train, split.val, TrainingRun(params.optimizer, RECIPE, AUGMENT, epochs, 1), Hooks(on_epoch)
        )
        n = sum(p.numel() for p in model.parameters())
        best = max(s.val_accuracy for s in history)
        print(
            f"SUMMARY {name} params {n} epochs {epochs} last {history[-1].val_accuracy:.4f} best {best:.4f} "
            f"median_epoch_s {np.median([s.seconds for s in history]):.1f} total_s {time.perf_counter() - started:.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
