"""Distributed DP over secure aggregation: each round is one DP-SGD step over all the sites'
rows; each site adds a share of the noise and masks its sum, so the researcher sees only the
noisy total. `researcher submit` fills in `peers` (the federation's sites) and `sample_rate`
(batch_size over the published rows). Train with `--strategy fedavgm` for server momentum."""

import torch.nn as nn

DATASET = "cancer"
PLAN = {
    "rounds": 40,  # = DP-SGD steps: many cheap rounds
    "batch_size": 128,  # the expected batch over all sites together
    "learning_rate": 4.0,
    "max_grad_norm": 1.0,
    "target_epsilon": 3.0,
    "validation_fraction": 0.0,
    "site_metrics": False,  # only the masked sum leaves a site
    "aggregation": "secure",
    "dp": "distributed",
    "colluding_sites": 0,  # raise it if a site's policy asks (datasite policy --colluding-sites)
}


def make_model(n_features, n_outputs):
    return nn.Sequential(nn.Linear(n_features, 32), nn.ReLU(), nn.Linear(32, n_outputs))
