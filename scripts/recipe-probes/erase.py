"""Random erasing A/B on the validation split: the same CNN trained with each erase probability.

Usage: .venv/bin/python scripts/recipe-probes/erase.py EPOCHS P [P ...]   e.g. 24 0 0.25
Prints the final and per-epoch validation accuracy for each P. Reads only the training split.
"""
import sys, time
from hpo import data
from hpo.config import Augment, Recipe
from hpo.train import Hyper, fit, seeded_model, evaluate
from hpo.devices import place
pl = place("cpu", 2)
imgs, labels = data.load_split(data.find_data_dir(), "train")
td = data.trial_data(imgs, labels, 0.1, 0, pl.device, 0)
p = {"n_conv": 2, "filters_0": 32, "filters_1": 64, "kernel_size": 3, "n_fc": 1, "fc_size": 256, "dropout": 0.3,
     "optimizer": "adam", "lr": 2e-3, "batch_size": 128, "weight_decay": 5e-4}
epochs = int(sys.argv[1])
for erase in [float(v) for v in sys.argv[2:]]:
    m = seeded_model(p, 1, pl.device); t = time.perf_counter()
    h = fit(m, td.train, td.val, Hyper.from_params(p), Recipe(warmup_epochs=0.2, label_smoothing=0.1), Augment(2, True, erase), epochs, 1)
    print(f"erase {erase}: val_acc {h[-1].val_accuracy:.4f}  ({time.perf_counter()-t:.0f}s)", [round(x.val_accuracy,4) for x in h], flush=True)
