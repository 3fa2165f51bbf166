"""The loop a user lives in, on a real dataset: a first model trained on a seeded half of the
train split (the first images labelled), then fine-tuned with `train --weights` on the whole train
split (after the next batch was pre-labelled and corrected), against training on the whole split
from random weights for as long, and for as long as both steps together.

    python benchmarks/the_loop.py --data PATH/TO/DATASET [--first 10] [--then 5] [--scratch 5 15]
                                  [--then-lr LR [LR ...]]

Every run: 320 px, seed 0, --time in minutes; every model scored on the test split. Not part of CI.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import datasets
import torch

import odscratch as ods

IMG_SIZE = 320
SEED = 0


def half_of_train(data, folder):
    """A copy of `data` whose train split is a seeded half of it (the other splits as they are)."""
    splits = {split: ods.load_split(data, split) for split in ["train", "validation", "test"]}
    train = splits["train"]
    splits["train"] = train.shuffle(seed=SEED).select(range(len(train) // 2))
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return folder


def train(data, minutes, name, work, *extra):
    subprocess.run([sys.executable, ods.__file__, "train", "--data", str(data), "--img-size",
                    str(IMG_SIZE), "--time", str(minutes), "--seed", str(SEED), "--name", name,
                    *extra], cwd=work, check=True)
    return work / "runs" / "train" / name / "best.pt"


def test_map(weights, data):
    model, cfg, classes = ods.load_detector(weights, torch.device("cpu"))
    test = ods.CheckedDataset(ods.load_split(data, "test"), cfg.img_size, train=False)
    network = ods.model_network(model, ods.use_bf16(torch.device("cpu"), False))
    found = ods.predict(network, test, 16, ods.EVAL_CONF, ods.NMS_IOU)
    metrics = ods.evaluate(found, test.targets, len(classes))
    return {"map50": round(metrics["map50"], 3), "map": round(metrics["map"], 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--first", type=float, default=10, help="minutes on half of train")
    parser.add_argument("--then", type=float, default=5, help="minutes of fine-tuning")
    parser.add_argument("--scratch", type=float, nargs="*", default=[5, 15],
                        help="minutes from random weights on the whole train split")
    parser.add_argument("--then-lr", type=float, nargs="+", default=[ods.Config.lr],
                        help="fine-tune once at each of these learning rates")
    args = parser.parse_args()
    data = str(Path(args.data).resolve())
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        half = half_of_train(data, work / "half")
        first = train(half, args.first, "first", work)
        results[f"half of train, {args.first:g} min"] = test_map(first, data)
        for lr in args.then_lr:
            tuned = train(data, args.then, f"fine_tuned_{lr:g}", work, "--weights", str(first),
                          "--lr", str(lr))
            results[f"then --weights on all of train, {args.then:g} min, --lr {lr:g}"] = \
                test_map(tuned, data)
        for minutes in args.scratch:
            scratch = train(data, minutes, f"scratch_{minutes:g}", work)
            results[f"random weights on all of train, {minutes:g} min"] = test_map(scratch, data)
    for name, metrics in results.items():
        print(f"{name}: test mAP50 {metrics['map50']:.3f}, mAP50-95 {metrics['map']:.3f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
