"""Server momentum (FedAvgM), with its parameters: `researcher submit examples/fedavgm.py`, then
`researcher train -f federation.toml --run-dir runs/avgm`.

`STRATEGY` is how the researcher combines the sites' updates (post-processing of DP releases,
no epsilon). It runs here, so it is kept beside the submitted job and the sites review the same
job as `fedavg.py`'s. `scripts/demo --secure` uses these values."""

import torch.nn as nn

DATASET = "cancer"
PLAN = {
    "rounds": 10,
    "local_epochs": 2,
    "batch_size": 16,
    "learning_rate": 0.5,
    "target_epsilon": 3.0,
}
STRATEGY = {"name": "fedavgm", "server_lr": 0.5, "momentum": 0.5}


def make_model(n_features, n_outputs):
    return nn.Sequential(nn.Linear(n_features, 32), nn.ReLU(), nn.Linear(32, n_outputs))
