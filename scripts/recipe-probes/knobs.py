"""The [train] and [augment] knobs the shipped studies fix, one at a time, on the probe split.

Each variant changes one setting of cnn-quick's recipe (crop padding 2, horizontal flip, warm-up 0.2
epochs, label smoothing 0.1, cosine) and trains the studies' warm start from the same initial weights
and the same batch order as the unchanged recipe, for each seed, so every difference is paired. The
probe split (family.probe_split) holds 6,000 images out of the study's own training part and trains
on the other 48,000: neither the trials' validation split nor the test split is read.

Usage: .venv/bin/python scripts/recipe-probes/knobs.py EPOCHS SEEDS [VARIANT ...]
       e.g. knobs.py 6 2 base no-smoothing   (SEEDS: seeds 1..SEEDS; all variants by default)
Prints one SUMMARY line per variant and seed; run two processes with different variants on 2 cores.
"""

import dataclasses
import sys
import time

from family import CONFIGS, probe_split

from hpo.learn.devices import place
from hpo.learn.params import TrialParams
from hpo.learn.train import TrainingRun, fit, seeded_model
from hpo.settings.config import Augment, TrainSettings

RECIPE = TrainSettings(schedule="cosine", warmup_epochs=0.2, label_smoothing=0.1)  # cnn-quick's [train]
AUGMENT = Augment(crop_padding=2, hflip=True, erase=0.0)  # cnn-quick's [augment]
VARIANTS = {
    "base": ({}, {}),
    "no-smoothing": ({"label_smoothing": 0.0}, {}),
    "no-warmup": ({"warmup_epochs": 0.0}, {}),
    "no-crop": ({}, {"crop_padding": 0}),
    "crop-4": ({}, {"crop_padding": 4}),
    "no-flip": ({}, {"hflip": False}),
}


def main() -> None:
    epochs, seeds, names = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:] or list(VARIANTS)
    placement = place("cpu", 1)
    split = probe_split(placement.device)
    params = TrialParams.from_flat(CONFIGS["plain-32-64"])
    print(f"probe split: {len(split.train)} train, {len(split.val)} held out; {epochs} epochs, 1 thread", flush=True)
    for seed in range(1, seeds + 1):
        for name in names:
            train_changes, augment_changes = VARIANTS[name]
            run = TrainingRun(
                params.optimizer,
                dataclasses.replace(RECIPE, **train_changes),
                dataclasses.replace(AUGMENT, **augment_changes),
                epochs,
                seed,
            )
            started = time.perf_counter()
            history = fit(seeded_model(params.model, seed, placement.device), split.train, split.val, run)
            curve = " ".join(f"{h.val_accuracy:.4f}" for h in history)
            print(
                f"SUMMARY {name} seed {seed} epochs {epochs} val {history[-1].val_accuracy:.4f} curve {curve} "
                f"total_s {time.perf_counter() - started:.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
