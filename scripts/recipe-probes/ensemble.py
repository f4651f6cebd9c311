"""Does a second run of the same configuration raise validation accuracy as an ensemble member?

The finalizer retrains its pick from scratch; the pick's own trial already trained the same recipe
for the same horizon. This probe trains the studies' warm start with cnn-quick's recipe (no crop,
flip, warm-up 0.2 epochs, label smoothing 0.1, cosine) under SEEDS seeds on the probe split
(family.probe_split: 6,000 images held out of the study's own training part, so neither the
trials' validation split nor the test split is read), and prints each model alone and every pair
averaged, all with flip TTA as the shipped studies score.

Usage: .venv/bin/python scripts/recipe-probes/ensemble.py EPOCHS SEEDS THREADS   e.g. 12 3 2
"""

import itertools
import sys
import time

from family import CONFIGS, probe_split

from hpo.learn.devices import place
from hpo.learn.model import Ensemble
from hpo.learn.params import TrialParams
from hpo.learn.train import TrainingRun, evaluate, fit, seeded_model
from hpo.settings.config import Augment, TrainSettings

RECIPE = TrainSettings(schedule="cosine", warmup_epochs=0.2, label_smoothing=0.1)  # cnn-quick's [train]
AUGMENT = Augment(crop_padding=0, hflip=True, erase=0.0)  # cnn-quick's [augment]


def main() -> None:
    epochs, seeds, threads = (int(a) for a in sys.argv[1:4])
    placement = place("cpu", threads)
    split = probe_split(placement.device)
    params = TrialParams.from_flat(CONFIGS["plain-32-64"])
    print(f"probe split: {len(split.train)} train, {len(split.val)} held out; {epochs} epochs, {threads} thread(s)")
    models = {}
    for seed in range(1, seeds + 1):
        started = time.perf_counter()
        model = seeded_model(params.model, seed, placement.device)
        fit(model, split.train, None, TrainingRun(params.optimizer, RECIPE, AUGMENT, epochs, seed))
        models[seed] = model
        alone = evaluate(Ensemble([model], "flip"), split.val).accuracy
        print(f"SINGLE seed {seed} val {alone:.4f} train_s {time.perf_counter() - started:.0f}", flush=True)
    for a, b in itertools.combinations(models, 2):
        pair = evaluate(Ensemble([models[a], models[b]], "flip"), split.val).accuracy
        print(f"PAIR seeds {a}+{b} val {pair:.4f}", flush=True)


if __name__ == "__main__":
    main()
