"""Data, the model, training, devices, checkpoints and inference; never imports optuna."""
