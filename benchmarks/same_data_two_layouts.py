"""Does a dataset read from one layout hold what it holds in another? Split by split: images, classes,
boxes per class, and the boxes themselves (matched by image content, then by position).

    git clone https://github.com/Shenggan/BCCD_Dataset
    python benchmarks/same_data_two_layouts.py BCCD_Dataset PATH/TO/bccd-parquet

BCCD's original release is Pascal VOC; a Hugging Face copy stores the xml's numbers as they are, so
its boxes start 1 pixel right and below the VOC reading (VOC counts pixels from 1). Not part of CI.
"""

import hashlib
import sys

import numpy as np
import torch

import odscratch as ods


def split_contents(data, split):
    """-> classes, {image pixels' hash: (boxes [N, 4] sorted, class names sorted)}."""
    ds = ods.load_split(data, split)
    classes = ods.class_names(ds)
    found = {}
    for row in ds:
        key = hashlib.sha1(np.asarray(row["image"].convert("RGB")).tobytes()).hexdigest()
        boxes, labels = row["objects"]["bbox"], row["objects"]["category"]
        order = sorted(range(len(boxes)), key=lambda i: (boxes[i], labels[i]))
        found[key] = (torch.tensor([boxes[i] for i in order]).reshape(-1, 4), [classes[labels[i]] for i in order])
    return classes, found


def main(a, b):
    for split in ["train", "validation", "test"]:
        (classes_a, a_rows), (classes_b, b_rows) = split_contents(a, split), split_contents(b, split)
        same_images = a_rows.keys() == b_rows.keys()
        counts = [sum(len(v[1]) for v in rows.values()) for rows in (a_rows, b_rows)]
        shift = torch.cat([b_rows[k][0] - a_rows[k][0] for k in a_rows if k in b_rows
                           and a_rows[k][1] == b_rows[k][1] and len(a_rows[k][0]) == len(b_rows[k][0])])
        print(f"{split}: images {len(a_rows)} / {len(b_rows)} (same pixels: {same_images}), classes "
              f"{classes_a} / {classes_b}, boxes {counts[0]} / {counts[1]}; box difference b - a "
              f"(x1, y1, x2, y2): min {shift.min(0).values.tolist()}, max {shift.max(0).values.tolist()}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
