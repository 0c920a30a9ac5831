"""Compressed updates, int8: each site sends its update as int8 per tensor with stochastic
rounding (about a quarter of float32). Post-processing of the DP release: no epsilon."""

import torch.nn as nn

DATASET = "cancer"
PLAN = {
    "rounds": 10,
    "local_epochs": 2,
    "batch_size": 16,
    "learning_rate": 0.5,
    "target_epsilon": 3.0,
    "compression": "int8",
}


def make_model(n_features, n_outputs):
    return nn.Sequential(nn.Linear(n_features, 32), nn.ReLU(), nn.Linear(32, n_outputs))
