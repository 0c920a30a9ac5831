"""Personalization: after the federated rounds each site fine-tunes the head (layer "2") for
two epochs with DP-SGD, charged like any round. The tuned model stays at the site
(`datasite models`); only its DP validation metrics come back (runs/DIR/personalized.json)."""

import torch.nn as nn

DATASET = "cancer"
PLAN = {
    "rounds": 10,
    "local_epochs": 2,
    "batch_size": 16,
    "learning_rate": 0.5,
    "target_epsilon": 3.0,
    "validation_fraction": 0.2,
    "personalize_layers": ["2"],
    "personalize_epochs": 2,
}


def make_model(n_features, n_outputs):
    return nn.Sequential(nn.Linear(n_features, 32), nn.ReLU(), nn.Linear(32, n_outputs))
