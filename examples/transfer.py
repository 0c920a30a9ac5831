"""Transfer learning: start from weights trained elsewhere and freeze the body (layer "0").

    researcher submit examples/transfer.py -f federation.toml --init-weights runs/pretrained

The body is not trained and not returned; the job pins a digest of its initial weights, and
every site refuses a round whose frozen layers differ from them. `--init-weights` takes an
.npz of named arrays or a run dir (its global.npz), for example a run on the mock twins."""

import torch.nn as nn

DATASET = "cancer"
PLAN = {
    "rounds": 5,
    "local_epochs": 2,
    "batch_size": 16,
    "learning_rate": 0.5,
    "target_epsilon": 3.0,
    "frozen": ["0"],
}


def make_model(n_features, n_outputs):
    return nn.Sequential(nn.Linear(n_features, 32), nn.ReLU(), nn.Linear(32, n_outputs))
