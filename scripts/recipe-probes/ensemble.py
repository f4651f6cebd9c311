"""Ensemble A/B on the validation split: two models of E epochs against one of 2E epochs, with and
without flip TTA (same CNN, same recipe, so the same cost).

Usage: .venv/bin/python scripts/recipe-probes/ensemble.py E      e.g. 12
Reads only the training split.
"""

import sys
import time

from common import PARAMS, PLACEMENT, RECIPE, SPLIT

from hpo.config import Augment
from hpo.model import Ensemble
from hpo.train import TrainingRun, evaluate, fit, seeded_model

E = int(sys.argv[1])


def train(seed: int, epochs: int):
    model, started = seeded_model(PARAMS.model, seed, PLACEMENT.device), time.perf_counter()
    fit(model, SPLIT.train, None, TrainingRun(PARAMS.optimizer, RECIPE, Augment(2, True, 0.0), epochs, seed))
    return model, time.perf_counter() - started


a, ta = train(1, E)
b, tb = train(2, E)
c, tc = train(3, 2 * E)
for name, model in [
    ("A", Ensemble([a])),
    ("A+tta", Ensemble([a], "flip")),
    ("B", Ensemble([b])),
    ("A+B", Ensemble([a, b])),
    ("A+B+tta", Ensemble([a, b], "flip")),
    (f"C {2 * E}ep", Ensemble([c])),
    (f"C {2 * E}ep+tta", Ensemble([c], "flip")),
]:
    print(name, f"{evaluate(model, SPLIT.val).accuracy:.4f}", flush=True)
print("times", round(ta), round(tb), round(tc))
