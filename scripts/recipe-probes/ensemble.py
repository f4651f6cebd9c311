"""Ensemble A/B on the validation split: two models of E epochs against one of 2E epochs, with and
without flip TTA (same CNN, same recipe, so the same cost).

Usage: .venv/bin/python scripts/recipe-probes/ensemble.py E      e.g. 12
Reads only the training split.
"""
import sys, time
from hpo import data
from hpo.config import Augment, Recipe
from hpo.model import Ensemble
from hpo.train import Hyper, fit, seeded_model, evaluate
from hpo.devices import place
pl = place("cpu", 2)
imgs, labels = data.load_split(data.find_data_dir(), "train")
td = data.trial_data(imgs, labels, 0.1, 0, pl.device, 0)
p = {"n_conv": 2, "filters_0": 32, "filters_1": 64, "kernel_size": 3, "n_fc": 1, "fc_size": 256, "dropout": 0.3,
     "optimizer": "adam", "lr": 2e-3, "batch_size": 128, "weight_decay": 5e-4}
E = int(sys.argv[1])
def train(seed, epochs):
    m = seeded_model(p, seed, pl.device); t = time.perf_counter()
    fit(m, td.train, None, Hyper.from_params(p), Recipe(warmup_epochs=0.2, label_smoothing=0.1), Augment(2, True, 0.0), epochs, seed)
    return m, time.perf_counter() - t
a, ta = train(1, E); b, tb = train(2, E); c, tc = train(3, 2 * E)
for name, model in [("A", Ensemble([a])), ("A+tta", Ensemble([a], "flip")), ("B", Ensemble([b])), ("A+B", Ensemble([a, b])), ("A+B+tta", Ensemble([a, b], "flip")), (f"C {2*E}ep", Ensemble([c])), (f"C {2*E}ep+tta", Ensemble([c], "flip"))]:
    print(name, f"{evaluate(model, td.val).accuracy:.4f}", flush=True)
print("times", round(ta), round(tb), round(tc))
