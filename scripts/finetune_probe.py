#!/usr/bin/env python3
"""Experiment (not a feature, not a test): try fine-tuning recipes of
vsearch.finetune on the grocery train photos and print Recall@1/@10 of the *val*
photos against the 81 iconic images after every epoch, from one shared cache of
trunk activations (built once under artifacts/probe-cache, reused by later runs).

    python scripts/finetune_probe.py INDEX EPOCHS [KEY=VALUE ...]
    e.g. python scripts/finetune_probe.py artifacts/grocery-index 6 zero_shot_weight=0.3

INDEX: a base index of the 81 iconic images (see scripts/bench_adapt.sh).
KEY=VALUE: FinetuneConfig fields (views and catalog_repeat change the cache).
"""

import csv
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import torch

from vsearch import Engine
from vsearch.adapter import AdaptedNet, AdapterConfig
from vsearch.finetune import FinetuneConfig
from vsearch.projection import Projection
from vsearch.sources import read_source_items
from vsearch.training import Trainer
from vsearch.training_cache import load_or_build_cache
from vsearch.training_data import prepare

P = Path("artifacts/protocols/grocery")
index, epochs = sys.argv[1], int(sys.argv[2])
types = {f.name: f.type for f in fields(FinetuneConfig)}
overrides = {}
for arg in sys.argv[3:]:
    key, value = arg.split("=")
    overrides[key] = value == "True" if types[key] in ("bool", bool) else type(getattr(FinetuneConfig(), key))(value)
config = replace(FinetuneConfig(epochs=epochs, val_fraction=0.0), **overrides)
with Engine.open(index) as engine:
    data = prepare(engine, read_source_items(P / "train-pairs.csv"), config)
    with open(P / "queries-val.csv", newline="") as fh:
        data.val = [(row["image"], row["expected_id"]) for row in csv.DictReader(fh)]
    net = AdaptedNet(
        AdapterConfig(engine.manifest.model, config.train_from, config.head_dim, config.zero_shot_weight),
        Projection.load(engine.paths.projection),
    )
    work = Path(f"artifacts/probe-cache/v{config.views}-r{config.catalog_repeat}-{config.train_from}")
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    cache = load_or_build_cache(work, net, data, config, torch.device("cpu"), quiet=True)
    print(f"cache {len(cache['train_x'])} views, {time.time() - start:.0f} s; {overrides}", flush=True)
    trainer = Trainer(net, cache, data, config, torch.device("cpu"))
    print("epoch 0", trainer.validate(), flush=True)
    for _ in range(epochs):
        row = trainer.run_epoch(quiet=True)
        print(row, flush=True)
