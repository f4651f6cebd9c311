"""Training throughput of DynamicCNN shapes on this machine (8,192 images after a warm-up).

Usage: .venv/bin/python scripts/recipe-probes/throughput.py THREADS N_CONV,FILTERS,KERNEL,N_FC,FC,BATCH ...
FILTERS is the first block's width; the second block doubles it and later blocks stay at twice it.
"""

import sys
import time

from hpo.learn import data
from hpo.learn.devices import place
from hpo.learn.params import TrialParams
from hpo.learn.train import TrainingRun, fit, seeded_model
from hpo.settings.config import Augment, TrainSettings

pl = place("cpu", int(sys.argv[1]))
imgs, labels = data.load_split(data.find_data_dir(), "train")
d = data.DeviceData(imgs[:8192], labels[:8192], pl.device)
for desc in sys.argv[2:]:
    nconv, filt, k, nfc, fc, bs = [int(x) for x in desc.split(",")]
    widths = {f"filters_{i}": filt * (2**i if i < 2 else 2) for i in range(nconv)}
    p = {
        "n_conv": nconv,
        **widths,
        "kernel_size": k,
        "n_fc": nfc,
        "fc_size": fc,
        "dropout": 0.2,
        "optimizer": "adam",
        "lr": 1e-3,
        "batch_size": bs,
        "weight_decay": 1e-4,
    }
    params = TrialParams.from_flat(p)
    m = seeded_model(params.model, 0, pl.device)
    run = TrainingRun(params.optimizer, TrainSettings(), Augment(2, True), 1, 0)
    warm = data.DeviceData(imgs[:1024], labels[:1024], pl.device)
    fit(m, warm, None, run)
    t = time.perf_counter()
    fit(m, d, None, run)
    dt = time.perf_counter() - t
    print(desc, f"{8192 / dt:.0f} img/s  -> 60k epoch {60000 / (8192 / dt):.1f}s", flush=True)
