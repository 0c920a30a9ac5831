"""Writes docs/notebooks/researcher.ipynb (kept as the source of the notebook; rerun to edit)."""
import sys
import nbformat as nbf

md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
cells = [
md("""# The researcher's Python API, end to end

This notebook trains a model across two datasites with differential privacy, from Python:
list the datasets, try the job on a mock twin, submit it, wait for the admins, train with a
progress bar, and plot the rounds. No private row ever reaches this notebook: it sees the
sites' published schema, their DP mock twins and their DP-noised model updates.

**Where the sites come from.** With `FEDSITE_FEDERATION=path/to/federation.toml` set, the
notebook uses that federation and skips the admin's step (your sites' admins approve in their
own console). Without it, the next cell plays the data owners: it starts two small datasites on
this machine (HTTPS on loopback, breast-cancer rows split between them) and writes their
`federation.toml`. That takes a minute."""),
code("""import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

FEDERATION = os.environ.get("FEDSITE_FEDERATION")
LOCAL = FEDERATION is None
DATASET = "breast-cancer" if LOCAL else os.environ.get("FEDSITE_DATASET", "cancer")"""),
md("""## The data owners' part (local sites only)

Each site holds its share of the training rows; the researcher keeps a test split. The helpers
come from `scripts/demo.py`: `start_site` runs what `datasite init`, `launch`, `upload`,
`users add`, `policy set` and `budget set` do, in this process."""),
code("""if LOCAL:
    root = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "scripts" / "demo.py").exists())
    sys.path.insert(0, str(root / "scripts"))
    from demo import start_sites, start_site, write_federation
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    frame = load_breast_cancer(as_frame=True).frame
    train_rows, test = train_test_split(frame, test_size=0.25, stratify=frame["target"], random_state=0)
    halves = [train_rows.iloc[::2].reset_index(drop=True), train_rows.iloc[1::2].reset_index(drop=True)]
    work = Path(os.environ.get("FEDSITE_NOTEBOOK_DIR") or tempfile.mkdtemp(prefix="fedsite-notebook-"))
    site_dirs = start_sites(
        work,
        list(zip(["hospital-a", "hospital-b"], halves)),
        lambda name, rows: start_site(work, name, rows, 3.0, tls=True),
    )
    write_federation(work, site_dirs)
    FEDERATION = work / "federation.toml"
    print(f"two datasites running; state in {work}")"""),
md("""## 1. The federation and its datasets

`datasets` lists, per site, each dataset's published schema, its DP row count and a preview of
its mock twin."""),
code("""import researcher
from researcher import Federation

fed = Federation.load(Path(FEDERATION))
listing = researcher.datasets(fed)
rows = [
    {"site": site, "dataset": d["name"], "rows (DP)": d["rows"], "target": d["target"],
     "features": len(d["schema"] or {}) - 1, "mock epsilon": d["mock_epsilon"]}
    for site, found in listing.items() if isinstance(found, list)
    for d in found
]
pd.DataFrame(rows)"""),
code("""# a few rows of one site's DP mock twin: synthetic, for running code, not for modelling
first = next(found for found in listing.values() if isinstance(found, list))
pd.DataFrame(next(d for d in first if d["name"] == DATASET)["mock_preview"])"""),
md("""## 2. The job: a model and a plan

The model is ordinary PyTorch, built here; only its declarative spec travels. The plan asks for
3 rounds with a total epsilon of 2 per site (`target_epsilon` covers every round).
`with_pooled_scaling` standardises the features federation-wide from the sites' published
statistics, as `researcher submit` does."""),
code("""import torch.nn as nn

from researcher.api import dataset_metas, with_pooled_scaling
from researcher.job import make_job
from researcher.model import n_features, n_outputs

meta = next(iter(dataset_metas(fed, DATASET).values()))
model = nn.Sequential(nn.Linear(n_features(meta), 16), nn.ReLU(), nn.Linear(16, n_outputs(meta, "cross_entropy")))
plan = {"rounds": 3, "batch_size": 32, "learning_rate": 0.5, "target_epsilon": 2.0, "site_metrics": False}
job = with_pooled_scaling(fed, make_job(model, DATASET, meta["target"], plan, name="notebook",
                                        n_features=n_features(meta), n_outputs=n_outputs(meta, "cross_entropy")))
print(job.name)"""),
md("""## 3. Try it on a mock twin

`dry_run` runs the exact function the sites will run, here, on a site's DP mock: a job that
cannot run fails now, before anyone reviews it. It also says what the whole plan would spend at
each site."""),
code("""from researcher import dry_run

trial = dry_run(fed, job)
print("ran on the mock of", trial["mock_site"])
pd.Series(trial["epsilon_per_site"], name="epsilon of the whole plan")"""),
md("""## 4. Submit, and follow the review

`submit` sends one request per site. Each site's admin sees the model table, the plan and an
automatic policy report, and approves or denies with a reason."""),
code("""from researcher import status, submit

submit(fed, job, dry=False)  # the dry run above already ran it
pd.DataFrame(status(fed, job)).T[["status"]]"""),
md("""*Local sites only:* here we play both admins and approve (a real admin runs
`datasite approve` or clicks Approve in the console)."""),
code("""if LOCAL:
    from demo import approve_pending

    approve_pending(site_dirs)
pd.DataFrame(status(fed, job)).T[["status"]]"""),
md("""## 5. Train, with a progress bar

Every site trains in parallel from the global weights with DP-SGD on its own rows, charges its
budget, and returns a noisy update; the default strategy averages them. `on_round` sees each
round as it ends. The test rows are ours, so evaluating on them is exact and free."""),
code("""from tqdm.auto import tqdm

x_test = test.drop(columns=["target"]).to_numpy(np.float32) if LOCAL else None
y_test = test["target"].to_numpy() if LOCAL else None
bar = tqdm(total=job.plan.rounds, desc="rounds")


def on_round(record):
    sites = ", ".join(u.site for u in record.updates)
    accuracy = f"{record.test_accuracy:.3f}" if record.test_accuracy is not None else "-"
    bar.set_postfix_str(f"test accuracy {accuracy} ({sites})")
    bar.update(1)


run_dir = Path(tempfile.mkdtemp(prefix="fedsite-run-")) / "run"
result = researcher.train(fed, job, run_dir, min_sites=1,
                          test=(x_test, y_test) if LOCAL else None, on_round=on_round)
bar.close()
print("final test accuracy:", result.rounds[-1].get("test_accuracy"))"""),
md("""## 6. Plots

`result.rounds` holds each round's figures; the run directory holds the same as `metrics.csv`,
with the plots `train` draws (`accuracy.png`, `epsilon.png`)."""),
code("""# researcher.plots switches matplotlib to its file backend when train imports it: back to inline
%matplotlib inline
import matplotlib.pyplot as plt

rounds = pd.DataFrame(result.rounds)
fig, ax = plt.subplots(figsize=(5, 3))
if "test_accuracy" in rounds:
    ax.plot(rounds["round"], rounds["test_accuracy"], marker="o")
ax.set(xlabel="round", ylabel="test accuracy", title="global model, our test split")
plt.show()
spent = {u.site: u.privacy.get("epsilon_spent") for u in result.last.updates}
pd.Series(spent, name="epsilon spent at each site (job and public mock)")"""),
code("""from IPython.display import Image, display

display(Image(filename=str(run_dir / "epsilon.png")))"""),
md("""## Clean up (local sites only)"""),
code("""if LOCAL:
    from datasites.serving import process

    for site in site_dirs:
        process.stop(site)
    print("stopped")"""),
]
nb = nbf.v4.new_notebook(cells=cells, metadata={
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
})
nbf.write(nb, sys.argv[1])
