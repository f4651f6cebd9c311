"""Random erasing A/B on the validation split: the same CNN trained with each erase probability.

Usage: .venv/bin/python scripts/recipe-probes/erase.py EPOCHS P [P ...]   e.g. 24 0 0.25
Prints the final and per-epoch validation accuracy for each P. Reads only the training split.
"""

import sys
import time

from common import PARAMS, PLACEMENT, RECIPE, SPLIT

from hpo.learn.train import TrainingRun, fit, seeded_model
from hpo.settings.config import Augment

epochs = int(sys.argv[1])
for erase in [float(v) for v in sys.argv[2:]]:
    model, started = seeded_model(PARAMS.model, 1, PLACEMENT.device), time.perf_counter()
    run = TrainingRun(PARAMS.optimizer, RECIPE, Augment(2, True, erase), epochs, 1)
    history = fit(model, SPLIT.train, SPLIT.val, run)
    print(
        f"erase {erase}: val_acc {history[-1].val_accuracy:.4f}  ({time.perf_counter() - started:.0f}s)",
        [round(h.val_accuracy, 4) for h in history],
        flush=True,
    )
