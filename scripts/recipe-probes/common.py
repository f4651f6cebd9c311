"""What every recipe probe shares: the trial split on 2 CPU threads, the probed CNN and its recipe."""

from hpo.learn import data, sources
from hpo.learn.devices import place
from hpo.learn.params import TrialParams
from hpo.settings.config import TrainSettings

PLACEMENT = place("cpu", 2)
_DATASET = sources.fashion_mnist(data.find_data_dir())
SPLIT = data.trial_data(_DATASET, 0.1, 0, PLACEMENT.device, 0)  # 54,000 train / 6,000 validation
PARAMS = TrialParams.from_flat(
    {
        "n_conv": 2,
        "filters_0": 32,
        "filters_1": 64,
        "kernel_size": 3,
        "n_fc": 1,
        "fc_size": 256,
        "dropout": 0.3,
        "optimizer": "adam",
        "lr": 2e-3,
        "batch_size": 128,
        "weight_decay": 5e-4,
    }
)
RECIPE = TrainSettings(warmup_epochs=0.2, label_smoothing=0.1)
