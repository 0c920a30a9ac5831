"""The seed tutorial on this platform: TensorFlow Federated's simple example, step for step.

| TFF tutorial                                   | here                                            |
|------------------------------------------------|-------------------------------------------------|
| 784-feature client datasets (MNIST)            | scikit-learn's bundled 8x8 digits, zoomed to    |
|                                                | 28x28 = 784 features (no download), 3 datasites |
| Dense(10, relu) -> Dense(1)                    | MODEL: Linear(784, 10) -> ReLU -> Linear(10, 1) |
| loss: mean squared error                       | PLAN["loss"] = "mse"                            |
| client optimizer SGD(learning_rate=0.02)       | PLAN["optimizer"] = "sgd", "learning_rate" 0.02 |
| 3 clients                                      | 3 datasites (real syft servers on loopback)     |
| 5 rounds of build_federated_averaging_process  | PLAN["rounds"] = 5; researcher.api.train (FedAvg) |
| print(metrics) every round                     | the per-round line printed below                |
| (no privacy)                                   | DP-SGD at each site: target_epsilon 3, delta 1e-5 |

Run: ``.venv/bin/python scripts/tff_example.py`` (scripts/setup first).
"""

from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from demo import approve_pending, start_site, write_federation
from scipy.ndimage import zoom
from sklearn.datasets import load_digits
from torch import nn

from datasites.serving import process
from researcher import api
from researcher.job import make_job

N_FEATURES = 784
MODEL = nn.Sequential(nn.Linear(N_FEATURES, 10), nn.ReLU(), nn.Linear(10, 1))  # one output: mse
PLAN = {
    "rounds": 5,
    "loss": "mse",
    "optimizer": "sgd",
    "learning_rate": 0.02,
    "batch_size": 20,
    "local_epochs": 1,
    "target_epsilon": 3.0,
    "delta": 1e-5,
    "max_grad_norm": 1.0,
}


def client_frames() -> list[pd.DataFrame]:
    digits = load_digits()
    images = np.stack([zoom(img, 3.5, order=1) for img in digits.images])  # 8x8 -> 28x28
    frame = pd.DataFrame(
        images.reshape(len(images), -1), columns=[f"px{i}" for i in range(N_FEATURES)]
    )
    frame["target"] = digits.target.astype(float)
    shuffled = frame.sample(frac=1.0, random_state=0)
    cuts = np.linspace(0, len(shuffled), 4).astype(int)
    return [shuffled.iloc[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="fedsite-tff-"))
    with ThreadPoolExecutor(3) as pool:
        sites = list(
            pool.map(
                lambda a: start_site(work, a[0], a[1], 3.0, "digits"),
                [(f"client-{i}", f) for i, f in enumerate(client_frames())],
            )
        )
    try:
        fed = write_federation(work, sites)
        spec = api.with_pooled_scaling(
            fed,
            make_job(
                MODEL,
                "digits",
                "target",
                PLAN,
                name="tff_simple",
                n_features=N_FEATURES,
                n_outputs=1,
            ),
        )
        api.submit(fed, spec)
        approve_pending(sites)

        def on_round(rec) -> None:  # noqa: ANN001
            # sites release no training loss, and their validation loss only with DP noise
            val = np.average(
                [u.metrics["val_loss"] for u in rec.updates], weights=[u.n for u in rec.updates]
            )
            print(f"round {rec.round:2d}, metrics=OrderedDict([('val_loss (DP)', {val:.4f})])")

        api.train(fed, spec, work / "run", on_round=on_round)
        print(f"model, metrics and plots in {work / 'run'}")
    finally:
        for site in sites:
            process.stop(site)


if __name__ == "__main__":
    main()
