"""The LTD design choices, measured: how S conditions R, S's area range, jitter, background weight.

Each variant pretrains LTD on the synthetic train images for the same few epochs and reports the LTD
metric on the same held-out crops (the module's LTD_AREA, whatever the variant trained on): mean IoU
of the predicted S box and the share with IoU >= 0.5. A square box of the typical crop area in the
middle of R scores about 0.19 mean IoU on these crops (see test_pretrain_beats_predicting_the_centre).

    python benchmarks/ltd_choices.py                     # all variants, about 2 minutes each
    python benchmarks/ltd_choices.py --only "product" "area 0.1-0.6"

Variants are swapped in with unittest.mock.patch: the module keeps one design, this script shows why.
"""
import argparse
import shutil
from unittest.mock import patch

import torch
import torch.nn.functional as F

import odscratch as ods

COMMON_AREA = ods.LTD_AREA
validate_ltd = ods.validate_ltd


def validate_on_common_crops(*args):
    with patch.object(ods, "LTD_AREA", COMMON_AREA):
        return validate_ltd(*args)


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


def depthwise_correlation(self, pair):
    # S's feature map slid over R's, channel by channel (SiamRPN++'s depthwise cross-correlation)
    R, S = pair
    features, template = self.detector.features(R), self.detector.features(S)  # [B, C, h, w], [B, C, k, k]
    B, C, h, w = features.shape
    k = template.shape[-1]
    out = F.conv2d(features.reshape(1, B * C, h, w), template.reshape(B * C, 1, k, k), padding=k // 2, groups=B * C)
    return self.detector.cells(out[..., :h, :w].reshape(B, C, h, w) / k**2)


VARIANTS = {
    "product (the module)": [],
    "normalized product": [patch.object(ods.LTDNet, "forward", normalized_product)],
    "cosine gate": [patch.object(ods.LTDNet, "forward", cosine_gate)],
    "depthwise correlation": [patch.object(ods.LTDNet, "forward", depthwise_correlation)],
    "no jitter": [patch.object(ods.sample_ltd_crop, "__defaults__", (torch.nn.Identity(),))],
    "background weight 1.0": [patch.object(ods, "BACKGROUND_WEIGHT", 1.0)],
    "area 0.01-0.1": [patch.object(ods, "LTD_AREA", (0.01, 0.1))],
    "area 0.1-0.6": [patch.object(ods, "LTD_AREA", (0.1, 0.6))],
}

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="synthetic")
    parser.add_argument("--img-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()
    rows = []
    for name in args.only:
        cfg = ods.RunConfig(data=args.data, img_size=args.img_size, epochs=args.epochs, batch=args.batch, seed=args.seed)
        with patch.object(ods, "validate_ltd", validate_on_common_crops):
            for p in VARIANTS[name]:
                p.start()
            try:
                run_dir, best = ods.pretrain_backbone(cfg, "choices", mask_crop=False)
            finally:
                for p in VARIANTS[name]:
                    p.stop()
        rows.append((name, best["iou"], best["hit50"]))
        print(f"RESULT {name}: {best}", flush=True)
        shutil.rmtree(run_dir)
    print(f"\nLTD on {args.data}, {args.epochs} epochs at {args.img_size} px, batch {args.batch}, seed {args.seed}")
    print("| variant | held-out mean IoU | IoU >= 0.5 |\n|---|---|---|")
    for name, iou, hit in rows:
        print(f"| {name} | {iou:.3f} | {hit:.1%} |")
