"""Compressed updates, top-k: each site sends the 10% largest entries of its update; what it
holds back is kept at the site and added to the next round (error feedback)."""

import torch.nn as nn

DATASET = "cancer"
PLAN = {
    "rounds": 10,
    "local_epochs": 2,
    "batch_size": 16,
    "learning_rate": 0.5,
    "target_epsilon": 3.0,
    "compression": "topk",
    "topk_fraction": 0.1,
}


def make_model(n_features, n_outputs):
    return nn.Sequential(nn.Linear(n_features, 32), nn.ReLU(), nn.Linear(32, n_outputs))
