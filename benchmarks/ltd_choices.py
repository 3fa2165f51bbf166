"""The LTD design choices, measured: how S conditions R, and the range of S's area.

Each variant pretrains LTD on BCCD's train images (labels unused) for the same number of epochs and
reports the LTD metric on the held-out (validation) crops: mean IoU and share with IoU >= 0.5.

    python benchmarks/ltd_choices.py [--data ../shared/data/bccd] [--epochs 15]

Variants are swapped in by replacing LTDNet.forward / LTD_AREA for the run: the module keeps one
design, this script shows why. Every variant is validated on the same crops (the module's LTD_AREA),
so a variant trained on easier crops does not look better for it.
"""
import argparse
import shutil

import torch
import torch.nn.functional as F

import odscratch as ods

product = ods.LTDNet.forward
COMMON_AREA = ods.LTD_AREA
validate_ltd = ods.validate_ltd


def validate_on_common_crops(*args):
    trained_area, ods.LTD_AREA = ods.LTD_AREA, COMMON_AREA
    try:
        return validate_ltd(*args)
    finally:
        ods.LTD_AREA = trained_area


def normalized_product(self, pair):
    R, S = pair
    query = self.detector.features(S).mean((2, 3))
    query = query / (query.mean(1, keepdim=True) + 1e-6)  # unit mean: only the query's pattern counts
    return self.detector.cells(self.detector.features(R) * query[:, :, None, None])


def cosine_gate(self, pair):
    R, S = pair
    query = self.detector.features(S).mean((2, 3))
    features = self.detector.features(R)
    similarity = F.cosine_similarity(features, query[:, :, None, None], dim=1)  # [B, h, w]
    return self.detector.cells(features * similarity[:, None])


VARIANTS = {  # name: (forward, LTD_AREA)
    "product, area 0.04-0.4": (product, (0.04, 0.4)),
    "normalized product, area 0.04-0.4": (normalized_product, (0.04, 0.4)),
    "cosine gate, area 0.04-0.4": (cosine_gate, (0.04, 0.4)),
    "product, area 0.01-0.1": (product, (0.01, 0.1)),
    "product, area 0.1-0.6": (product, (0.1, 0.6)),
}

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data/bccd")
    parser.add_argument("--img-size", type=int, default=320)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    ods.validate_ltd = validate_on_common_crops
    rows = []
    for name, (forward, area) in VARIANTS.items():
        ods.LTDNet.forward, ods.LTD_AREA = forward, area
        cfg = ods.Config(data=args.data, img_size=args.img_size, epochs=args.epochs, seed=args.seed)
        run_dir, best = ods.pretrain_backbone(cfg, "choices", mask_crop=False)
        rows.append((name, best["iou"], best["hit50"]))
        shutil.rmtree(run_dir)
    print(f"\nLTD on {args.data}, {args.epochs} epochs at {args.img_size} px, seed {args.seed}")
    print("| variant | held-out mean IoU | IoU >= 0.5 |\n|---|---|---|")
    for name, iou, hit in rows:
        print(f"| {name} | {iou:.3f} | {hit:.1%} |")
