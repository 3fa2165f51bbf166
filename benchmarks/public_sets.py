"""Two public datasets of other kinds than BCCD, written in odscratch's schema (parquet, one file a
split) for benchmarks/tight_boxes.py. Neither is part of the project: clone them yourself.

- raccoon: github.com/datitran/raccoon_dataset (MIT licence, Dat Tran 2017; the photos were
  collected from Google and Pixabay). 200 photos of 1-3 raccoons each, a box covering about half
  the photo: few large objects. Its own lists split it 160 / 40 into train and test; 30 of the 160,
  drawn with SPLIT_SEED, are held out for validation.
- cherries: github.com/ai-agriculture-circuits-and-systems/CherryBBCH72 (CC BY 4.0). 2,521 crops
  of 640 x 640 pixels cut, overlapping, from 72 drone photos of a cherry orchard; cherry fruitlets
  about 23 pixels wide, 8 a crop on average and up to 71: many small objects. Crops of one photo
  overlap, so the split is by photo (the name before the last "_"): 52 / 8 / 12 photos, drawn with
  SPLIT_SEED.

    git clone https://github.com/datitran/raccoon_dataset
    git clone https://github.com/ai-agriculture-circuits-and-systems/CherryBBCH72
    python benchmarks/public_sets.py raccoon_dataset CherryBBCH72 OUT
    python benchmarks/tight_boxes.py --data raccoon=OUT/raccoon ...
"""
import argparse
import csv
import random
import xml.etree.ElementTree as ET
from pathlib import Path

import datasets
import PIL.Image

import odscratch as ods

SPLIT_SEED = 0
RACCOON_VALIDATION = 30            # of the 160 train photos
CHERRY_PHOTOS = {"train": 52, "validation": 8, "test": 12}


def rows(images, objects):
    return {"image": [{"bytes": Path(p).read_bytes(), "path": None} for p in images],
            "objects": objects}


def raccoon(folder):
    """{split: rows}: VOC boxes from annotations/*.xml, the split from data/*_labels.csv."""
    def listed(name):
        with open(folder / "data" / name) as f:
            return sorted({row["filename"] for row in csv.DictReader(f)})

    train, test = listed("train_labels.csv"), listed("test_labels.csv")
    validation = sorted(random.Random(SPLIT_SEED).sample(train, RACCOON_VALIDATION))
    splits = {"train": [n for n in train if n not in validation], "validation": validation,
              "test": test}
    out = {}
    for split, names in splits.items():
        objects = []
        for name in names:
            root = ET.parse(folder / "annotations" / name.replace(".jpg", ".xml")).getroot()
            boxes = [[float(o.find("bndbox").find(k).text)
                      for k in ("xmin", "ymin", "xmax", "ymax")] for o in root.iter("object")]
            objects.append({"bbox": boxes, "category": [0] * len(boxes)})
        out[split] = rows([folder / "images" / n for n in names], objects)
    return out, ["raccoon"]


def cherries(folder):
    """{split: rows}: YOLO boxes from data/labels/*.txt (a crop without one has no cherry), split by
    source photo."""
    images = sorted((folder / "data" / "images").glob("*.jpg"))
    photos = sorted({p.stem.rsplit("_", 1)[0] for p in images})
    random.Random(SPLIT_SEED).shuffle(photos)
    first = {"train": 0, "validation": CHERRY_PHOTOS["train"],
             "test": CHERRY_PHOTOS["train"] + CHERRY_PHOTOS["validation"]}
    out = {}
    for split, start in first.items():
        chosen = set(photos[start:start + CHERRY_PHOTOS[split]])
        paths = [p for p in images if p.stem.rsplit("_", 1)[0] in chosen]
        objects = []
        for path in paths:
            width, height = PIL.Image.open(path).size  # reads the header only
            label = folder / "data" / "labels" / f"{path.stem}.txt"
            lines = label.read_text().split("\n") if label.exists() else []
            boxes = []
            for cx, cy, w, h in (map(float, line.split()[1:]) for line in lines if line.strip()):
                boxes.append([(cx - w / 2) * width, (cy - h / 2) * height,
                              (cx + w / 2) * width, (cy + h / 2) * height])
            objects.append({"bbox": boxes, "category": [0] * len(boxes)})
        out[split] = rows(paths, objects)
    return out, ["cherry"]


def write(splits, classes, folder):
    features = ods.detection_features(classes)
    for split, columns in splits.items():
        ds = datasets.Dataset.from_dict(columns, features=features)
        (folder / "data").mkdir(parents=True, exist_ok=True)
        ds.to_parquet(folder / "data" / f"{split}-00000-of-00001.parquet")
        boxes = sum(len(o["bbox"]) for o in columns["objects"])
        print(f"{folder.name} {split}: {len(ds)} images, {boxes} boxes")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("raccoon", type=Path, help="a clone of datitran/raccoon_dataset")
    parser.add_argument("cherries", type=Path, help="a clone of CherryBBCH72")
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    write(*raccoon(args.raccoon), args.out / "raccoon")
    write(*cherries(args.cherries), args.out / "cherries")


if __name__ == "__main__":
    main()
