"""FedAvg, the baseline: train with `researcher train -f federation.toml --run-dir runs/avg`.

Also the job for the server optimizers (`--strategy fedavgm|fedadam|fedyogi`) and the robust
rules (`--strategy median|trimmed-mean|norm-bounded`): a strategy is the researcher's choice of
post-processing, not a plan field, so the sites run the same job. With its parameters it goes
in the job file as `STRATEGY` (see `fedavgm.py`)."""

import torch.nn as nn

DATASET = "cancer"
PLAN = {
    "rounds": 10,
    "local_epochs": 2,
    "batch_size": 16,
    "learning_rate": 0.5,
    "target_epsilon": 3.0,
}


def make_model(n_features, n_outputs):
    return nn.Sequential(nn.Linear(n_features, 32), nn.ReLU(), nn.Linear(32, n_outputs))
