"""Photos stored sideways, as phones store them: does a dataset whose JPEGs carry an EXIF
orientation tag (3, 6 and 8 in turn) and YOLO labels in upright coordinates, as a labelling tool
writes them, train as well as the same dataset stored upright?

    python benchmarks/phone_photos.py --data PATH/TO/DATASET [--minutes 5] [--before OLD.py]

Writes both copies of the dataset's train, validation and test splits as YOLO datasets in a
temporary folder (both re-encoded as JPEG quality 95), trains each for the same minutes with the
same seed at 320 px, and scores each model on its own copy's test split. With --before, an older
odscratch.py also trains and scores the sideways copy: what that version gave. Not part of CI.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import PIL.ExifTags
import PIL.Image

import odscratch as ods

ORIENTATIONS = [3, 6, 8]  # what phones write: turned 180, 90 clockwise, 90 anticlockwise
# the stored pixels: the upright photo turned back, so that the tag turns it upright again
STORE = {3: PIL.Image.Transpose.ROTATE_180, 6: PIL.Image.Transpose.ROTATE_90,
         8: PIL.Image.Transpose.ROTATE_270}
QUALITY = 95

SCORE = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import odscratch as ods
model, cfg, classes = ods.load_detector(sys.argv[2], torch.device("cpu"))
test = ods.CheckedDataset(ods.load_split(sys.argv[3], "test"), cfg.img_size, train=False)
network = ods.model_network(model, ods.use_bf16(torch.device("cpu"), False))
found = ods.predict(network, test, 16, ods.EVAL_CONF, ods.NMS_IOU)
metrics = ods.evaluate(found, test.targets, len(classes))
print(json.dumps({k: metrics[k] for k in ("map50", "map")}))
"""


def write_yolo_copy(data, root, sideways):
    """Every split of `data` -> a YOLO dataset at root; sideways: the JPEGs stored turned, with the
    EXIF tag that turns them back, the labels in upright coordinates either way."""
    spec = []
    for split in ["train", "validation", "test"]:
        ds = ods.load_split(data, split)
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i, row in enumerate(ds):
            image = row["image"].convert("RGB")
            width, height = image.size
            name = f"{split}_{i:04d}"
            exif = PIL.Image.Exif()
            if sideways:
                orientation = ORIENTATIONS[i % len(ORIENTATIONS)]
                exif[PIL.ExifTags.Base.Orientation] = orientation
                image = image.transpose(STORE[orientation])
            image.save(root / "images" / split / f"{name}.jpg", quality=QUALITY, exif=exif)
            lines = [f"{k} {(x1 + x2) / 2 / width:.6f} {(y1 + y2) / 2 / height:.6f} "
                     f"{(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f}"
                     for (x1, y1, x2, y2), k in zip(row["objects"]["bbox"],
                                                    row["objects"]["category"])]
            (root / "labels" / split / f"{name}.txt").write_text("\n".join(lines) + "\n")
        spec.append(f"{'val' if split == 'validation' else split}: images/{split}")
        classes = ods.class_names(ds)
    (root / "data.yaml").write_text("\n".join(spec) + f"\nnames: {json.dumps(classes)}\n")
    return root / "data.yaml"


def train_and_score(script, data, minutes, name, work):
    """One training run of `script` (an odscratch.py) on data, then its test mAP by the same
    script's evaluator."""
    subprocess.run([sys.executable, str(script), "train", "--data", str(data), "--img-size", "320",
                    "--time", str(minutes), "--seed", "0", "--name", name], cwd=work, check=True)
    best = work / "runs" / "train" / name / "best.pt"
    out = subprocess.run([sys.executable, "-c", SCORE, str(Path(script).parent), str(best),
                          str(data)], cwd=work, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--before", help="an older odscratch.py to train the sideways copy too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        copies = {"upright": write_yolo_copy(args.data, work / "upright", sideways=False),
                  "sideways": write_yolo_copy(args.data, work / "sideways", sideways=True)}
        runs = [("upright", ods.__file__, copies["upright"]),
                ("sideways", ods.__file__, copies["sideways"])]
        if args.before:
            runs.append(("sideways, before", Path(args.before).resolve(), copies["sideways"]))
        results = {}
        for name, script, data in runs:
            results[name] = train_and_score(script, data, args.minutes,
                                            name.replace(", ", "_"), work)
            print(f"{name}: test mAP50 {results[name]['map50']:.3f}, "
                  f"mAP50-95 {results[name]['map']:.3f}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
