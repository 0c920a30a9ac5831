"""FedProx (Li et al. 2020): each site adds mu * (w - w_global) to every DP-SGD step, after
clipping and noise, so label-skewed sites drift less from the global model."""

import torch.nn as nn

DATASET = "cancer"
PLAN = {
    "rounds": 10,
    "local_epochs": 2,
    "batch_size": 16,
    "learning_rate": 0.5,
    "target_epsilon": 3.0,
    "proximal_mu": 0.1,
}


def make_model(n_features, n_outputs):
    return nn.Sequential(nn.Linear(n_features, 32), nn.ReLU(), nn.Linear(32, n_outputs))
