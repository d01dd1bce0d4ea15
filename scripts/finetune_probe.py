#!/usr/bin/env python3
"""Experiment (not a feature, not a test) towards issue 4: fine-tune EfficientNet-Lite2's
last stages and a projection head with proxies on the grocery train photos, and report
val Recall@1/@10 against the 81 iconic images after each epoch.

    python scripts/finetune_probe.py VIEWS EPOCHS A|B      # e.g. 2 6 A, 2 4 B

A: train on all 81 products. B: train on products 0-40 only and also report the unseen
half. Data: $GROCERY (default ../shared/datasets/grocery-store/dataset).
"""

import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms as T

from vsearch.backbones import build_backbone
from vsearch.config import resolve_model
from vsearch.embed import Preprocess, center_crop
from vsearch.images import decode_image, read_source
from vsearch.malloc import tune_malloc

tune_malloc()
torch.manual_seed(0)
random.seed(0)
np.random.seed(0)
G = os.environ.get("GROCERY", "../shared/datasets/grocery-store/dataset")
V = int(sys.argv[1]) if len(sys.argv) > 1 else 2
EPOCHS = int(sys.argv[2]) if len(sys.argv) > 2 else 6
SPLIT = sys.argv[3] if len(sys.argv) > 3 else "A"  # A: all products; B: train on ids < 41 only


def split(name):
    out = []
    for line in open(f"{G}/{name}.txt"):
        p, fine, _ = [s.strip() for s in line.split(",")]
        out.append((f"{G}/{p}", int(fine)))
    return out


iconic = {}
for line in open(f"{G}/classes.csv").read().splitlines()[1:]:
    f = line.split(",")
    iconic[int(f[1])] = G + f[4]
train, val = split("train"), split("val")
seen = set(range(81)) if SPLIT == "A" else set(range(41))
train = [t for t in train if t[1] in seen]
cfg = resolve_model("efficientnet-lite2")
net = build_backbone(cfg).model
pre = Preprocess(cfg)
size = cfg.image_size
aug = T.Compose(
    [
        T.RandomResizedCrop(size, scale=(0.4, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ColorJitter(0.3, 0.3, 0.3, 0.05),
        T.RandomRotation(10),
    ]
)


def norm(im):
    return (torch.from_numpy(np.array(im, dtype=np.float32)).permute(2, 0, 1) / 255 - 0.5) / 0.5


def load(p):
    return decode_image(read_source(p), p)


CUT = 5  # frozen: stem + blocks[:5]


def frozen(x):
    with torch.inference_mode():
        x = net.bn1(net.conv_stem(x))
        for b in net.blocks[:CUT]:
            x = b(x)
        return x.half()


t0 = time.time()
items = train + [(iconic[c], c) for c in sorted(seen) for _ in range(10)]  # iconic images as extra samples
cache, labels = [], []
for _v in range(V):
    for i in range(0, len(items), 32):
        ims = [aug(load(p)) if True else None for p, _ in items[i : i + 32]]
        cache.append(frozen(torch.stack([norm(im) for im in ims])))
        labels += [c for _, c in items[i : i + 32]]
cache = torch.cat(cache)
labels = torch.tensor(labels)
print(f"cached {len(cache)} views {tuple(cache.shape[1:])} in {time.time() - t0:.0f}s", flush=True)


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*net.blocks[CUT:])
        self.conv_head = net.conv_head
        self.bn2 = net.bn2
        self.proj = nn.Linear(1280, 512)

    def forward(self, x):
        x = self.bn2(self.conv_head(self.blocks(x)))
        x = x.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3)
        return F.normalize(self.proj(x), dim=1)


head = Head()


def embed_full(ims, train_mode=False):
    x = torch.stack([pre(im) for im in ims])
    with torch.no_grad():
        return head(frozen(x).float())


head.eval()
with torch.no_grad():
    init = embed_full([load(iconic[c]) for c in range(81)])
proxies = nn.Parameter(init.clone())
opt = torch.optim.AdamW(
    [
        {"params": list(head.blocks.parameters()) + list(head.conv_head.parameters()) + list(head.bn2.parameters()), "lr": 1e-4},
        {"params": list(head.proj.parameters()) + [proxies], "lr": 1e-3},
    ],
    weight_decay=1e-4,
)


ZERO = None
if os.environ.get("ZERO_SHOT_INDEX"):  # also score zero-shot + fine-tuned similarities, summed
    from vsearch import Engine

    with Engine.open(os.environ["ZERO_SHOT_INDEX"]) as zero:
        gal_ids = {int(p): i for i, p in zero.catalog.image_products(list(range(1, 1000))).items()}
        order = [gal_ids[c] for c in range(81)]
        zg = torch.from_numpy(zero.index.reconstruct(np.array(order, dtype=np.int64)))
        zq = torch.cat(
            [
                torch.from_numpy(zero.projection.apply(zero.embed_queries([load(p) for p, _ in val[i : i + 32]])))
                for i in range(0, len(val), 32)
            ]
        )
    ZERO = zq @ zg.T


def evaluate():
    head.eval()
    with torch.no_grad():
        gal = embed_full([load(iconic[c]) for c in range(81)])
        qs, ys = [], []
        for i in range(0, len(val), 32):
            ims = [load(p) for p, _ in val[i : i + 32]]
            q = embed_full(ims) + embed_full([center_crop(im, 0.8) for im in ims])
            qs.append(F.normalize(q, dim=1))
            ys += [c for _, c in val[i : i + 32]]
        Q = torch.cat(qs)
        ys = torch.tensor(ys)
        S = Q @ gal.T
        top = S.topk(10, dim=1).indices
        r1 = (top[:, 0] == ys).float()
        r10 = (top == ys[:, None]).any(1).float()
        un = torch.tensor([y.item() not in seen for y in ys])
        out = f"R@1 {r1.mean():.3f} R@10 {r10.mean():.3f}"
        if un.any():
            out += f" | unseen R@1 {r1[un].mean():.3f} R@10 {r10[un].mean():.3f} | seen R@1 {r1[~un].mean():.3f}"
        if ZERO is not None:
            for w in (0.5, 1.0):
                top = (ZERO + w * S).topk(10, dim=1).indices
                c1 = (top[:, 0] == ys).float()
                c10 = (top == ys[:, None]).any(1).float()
                out += f" || zero+{w}*ft R@1 {c1.mean():.3f} R@10 {c10.mean():.3f}"
                if un.any():
                    out += f" unseen {c1[un].mean():.3f}/{c10[un].mean():.3f} seen {c1[~un].mean():.3f}"
        return out


print("epoch 0", evaluate(), flush=True)
for epoch in range(1, EPOCHS + 1):
    head.train()
    net.bn2.eval()
    for m in head.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()  # small batches: keep ImageNet BN statistics
    perm = torch.randperm(len(cache))
    total = 0.0
    t = time.time()
    for i in range(0, len(perm), 64):
        idx = perm[i : i + 64]
        e = head(cache[idx].float())
        logits = e @ F.normalize(proxies, dim=1).T / 0.05
        loss = F.cross_entropy(logits, labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item() * len(idx)
    print(f"epoch {epoch} loss {total / len(perm):.3f} {time.time() - t:.0f}s", evaluate(), flush=True)
print(f"total {time.time() - t0:.0f}s")
