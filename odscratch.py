"""
odscratch: an object detector built from scratch, in one file you can read top to bottom.

Part 1, the recipe:
1. A ResNet-18 (random init) turns an image into a grid of cells, one cell every `stride` pixels.
2. One linear layer maps each cell's C features to its box's four edges, each a distribution over
   17 distances from the cell's centre (DFL), and K+1 class logits, the last one "background".
3. Training: each ground-truth box belongs to the cell its centre falls in (and, by default, to the
   nearest cells inside it). Cross-entropy on every cell's class, DFL + GIoU on the boxes of the
   cells that own a ground-truth box.
4. Inference: softmax, a confidence threshold, per-class NMS, boxes scaled back to the image.
5. Evaluation: COCO's mAP, written out here and tested against pycocotools.
6. Optionally first, without labels: Learn To Detect (LTD). Cut a sub-image S out of an image R and
   train the same network to find S's box in R; its backbone then starts the detector.

Run it: `odscratch lesson` trains on built-in shapes with the loop that ends Part 1, offline.
Part 2, the product (`odscratch train`, `eval`, `detect`), can be skipped: it is not used here.
"""

# =============================================================================
# PART 1: THE RECIPE
# =============================================================================

import hashlib
import io
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, RandomSampler
from torchvision import tv_tensors
from torchvision.ops import (batched_nms, box_area, box_convert, box_iou, clip_boxes_to_image,
                             generalized_box_iou_loss)
from torchvision.transforms import v2


@dataclass
class Config:
    img_size: int = 160             # images are resized to img_size x img_size
    stride: int = 16                # pixels per grid cell: 8, 16 or 32 (where ResNet-18 is cut)
    assign_radius: float = 1.0      # 0.5: a box trains its centre's cell; 1: also nearby cells
    epochs: int = 4
    batch: int = 8                  # for detection (docs/yolo11n.md measures it); pretrain keeps 16
    lr: float = 2e-3
    weight_decay: float = 5e-4
    seed: int = 0
    fp32: bool = False              # turn off bf16 autocast
    iou_targets: bool = False       # a cell's class target is its box's IoU with the truth
    dfl_bins: int = 17              # each edge a distribution; 0: a box is (cx, cy, w, h)


# -----------------------------------------------------------------------------
# Data: every source becomes one format, the schema of detection-datasets/fashionpedia: a
# datasets.Dataset with `image` and `objects` = {bbox: [[x_min, y_min, x_max, y_max]] in pixels,
# category: ClassLabel}. The built-in synthetic shapes are drawn in-process, so everything runs
# offline; other sources (YOLO, COCO, VOC, Hugging Face) are read and checked in Part 2.

SYNTHETIC_CLASSES = ["ellipse", "rectangle", "triangle"]
SYNTHETIC_SPLITS = {"train": 2000, "validation": 200, "test": 200}  # images per split
SYNTHETIC_SIZE = 320                 # pixels per side
SYNTHETIC_OBJECT_SIDE = (0.1, 0.5)   # object side as a fraction of the image side, log-uniform
SYNTHETIC_MAX_COVER = 0.5            # an object may hide at most this much of an earlier one
SYNTHETIC_JPEG_QUALITY = 95
SPLIT_SEED = 0                       # fixes the synthetic images (and, in Part 2, carved splits)


def synthetic_background(rng):
    # smooth colour blobs + stripes + pixel noise: texture that the detector must learn to ignore
    coarse = rng.integers(0, 256, (*rng.integers(2, 8, size=2), 3), dtype=np.uint8)
    img = PIL.Image.fromarray(coarse).resize((SYNTHETIC_SIZE, SYNTHETIC_SIZE), PIL.Image.BILINEAR)
    draw = PIL.ImageDraw.Draw(img)
    for _ in range(rng.integers(0, 6)):
        x0, y0, x1, y1 = rng.uniform(0, SYNTHETIC_SIZE, 4)
        colour, width = tuple(rng.integers(0, 256, 3).tolist()), int(rng.integers(1, 4))
        draw.line((x0, y0, x1, y1), fill=colour, width=width)
    noise = rng.integers(-16, 17, (SYNTHETIC_SIZE, SYNTHETIC_SIZE, 1))
    return PIL.Image.fromarray(np.clip(np.asarray(img, np.int16) + noise, 0, 255).astype(np.uint8))


def synthetic_example(rng):
    """One image with 1-8 shapes; colour is random, so only the shape tells the class."""
    img = synthetic_background(rng)
    draw = PIL.ImageDraw.Draw(img)
    boxes, categories = [], []
    for _ in range(rng.integers(1, 9)):
        side = SYNTHETIC_SIZE * math.exp(rng.uniform(*np.log(SYNTHETIC_OBJECT_SIDE)))
        aspect = rng.uniform(0.7, 1.4)
        w, h = side * math.sqrt(aspect), side / math.sqrt(aspect)
        x0, y0 = rng.uniform(0, SYNTHETIC_SIZE - w), rng.uniform(0, SYNTHETIC_SIZE - h)
        box = [x0, y0, x0 + w, y0 + h]
        # some overlap is wanted, a shape hidden behind another is not
        if boxes:
            new, earlier = torch.tensor([box]), torch.tensor(boxes)  # [1, 4], [M, 4]
            corners = torch.min(new[:, 2:], earlier[:, 2:]) - torch.max(new[:, :2], earlier[:, :2])
            inter = corners.clamp(min=0).prod(-1)  # [M] intersection areas
            areas = torch.tensor([(b[2] - b[0]) * (b[3] - b[1]) for b in boxes])
            if (inter / areas).max() > SYNTHETIC_MAX_COVER:
                continue
        category = int(rng.integers(len(SYNTHETIC_CLASSES)))
        shape, colour = SYNTHETIC_CLASSES[category], tuple(rng.integers(0, 256, 3).tolist())
        if shape == "triangle":
            draw.polygon([((x0 + box[2]) / 2, y0), tuple(box[2:]), (x0, box[3])], fill=colour)
        else:  # draw.ellipse or draw.rectangle
            getattr(draw, shape)(box, fill=colour)
        boxes.append(box)
        categories.append(category)
    return img, boxes, categories


def detection_features(class_names):
    objects = {"bbox": datasets.List(datasets.List(datasets.Value("float32"), length=4)),
               "category": datasets.List(datasets.ClassLabel(names=class_names))}
    return datasets.Features({"image": datasets.Image(), "objects": objects})


def synthetic_rows(split, recipe):
    """The rows of one split, from one seeded numpy generator per split (`recipe`: see below)."""
    rng = np.random.default_rng([SPLIT_SEED, list(SYNTHETIC_SPLITS).index(split)])
    for _ in range(SYNTHETIC_SPLITS[split]):
        img, boxes, categories = synthetic_example(rng)
        # JPEG, not datasets' default PNG: the pixel noise makes PNG 30x slower to write
        jpeg = io.BytesIO()
        img.save(jpeg, "JPEG", quality=SYNTHETIC_JPEG_QUALITY)
        yield {"image": {"bytes": jpeg.getvalue(), "path": None},
               "objects": {"bbox": boxes, "category": categories}}


@lru_cache(maxsize=None)
def synthetic_split(split):
    """The same images for the same split on any machine, drawn once per machine: datasets keeps
    them in its cache under a hash of this file, so that any edit to it draws them anew."""
    recipe = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    features = detection_features(SYNTHETIC_CLASSES)
    return datasets.Dataset.from_generator(synthetic_rows, features=features,
                                           gen_kwargs={"split": split, "recipe": recipe})


def resize_transform(img_size):
    # Resize first: every later step then works on the small image.
    return v2.Compose([v2.ToImage(), v2.Resize((img_size, img_size), antialias=True)])


MIN_BOX_SIDE = 2  # pixels: a box narrower or shorter holds nothing to learn (read or augmented)
AUGMENT = v2.Compose([  # on the resized image, at training time only
    v2.RandomHorizontalFlip(),
    v2.RandomAffine(degrees=0, translate=(0.1, 0.1), scale=(0.75, 1.25)),  # zoom in or out
    v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3),
    v2.ClampBoundingBoxes(),
    v2.SanitizeBoundingBoxes(min_size=MIN_BOX_SIDE),  # boxes pushed out or squeezed thin go
])


def sample_seed(seed, epoch, i):
    """A seed for image i's draws this epoch: the same in any process, rank or resumed run."""
    return int(np.random.SeedSequence([seed, epoch, i]).generate_state(1, np.uint64)[0])


def read_target(objects):
    """A row's `objects` -> {boxes [N, 4] xyxy pixels, labels [N]}."""
    return {"boxes": torch.tensor(objects["bbox"], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(objects["category"], dtype=torch.long)}


def decode_split(ds, img_size):
    """A split -> its images resized ([3, img_size, img_size] uint8 each), (height, width)s and
    targets, in memory: enough for the built-in shapes (Part 2 checks yours, and keeps a file)."""
    resize, images, sizes = resize_transform(img_size), [], []
    for row in ds.select_columns(["image"]):
        image = row["image"].convert("RGB")  # datasets decodes it (turned as its EXIF says)
        images.append(resize(image).numpy())
        sizes.append((image.height, image.width))
    return images, sizes, [read_target(objects) for objects in ds["objects"]]


class DetectionDataset(torch.utils.data.Dataset):
    """Images resized to img_size ([3, S, S] uint8 each), their original (height, width) and targets
    -> (image [3, S, S] in [0, 1], {boxes [N, 4] xyxy in its pixels, labels [N], index i}). `sizes`
    and `targets` stay in the original pixels: what the evaluator compares against."""

    def __init__(self, images, sizes, targets, img_size, train, seed=0):
        self.images, self.sizes, self.targets, self.img_size = images, sizes, targets, img_size
        self.train, self.seed, self.epoch = train, seed, 0  # augmentation: sample_seed(...)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = torch.from_numpy(self.images[i])  # [3, img_size, img_size] uint8
        # the boxes in the resized image's pixels, as a tv_tensor that AUGMENT moves with it
        (height, width), target = self.sizes[i], self.targets[i]
        scale = torch.tensor([self.img_size / width, self.img_size / height] * 2)
        boxes = tv_tensors.BoundingBoxes(target["boxes"] * scale, format="XYXY",
                                         canvas_size=image.shape[-2:])
        sample = {"image": image, "boxes": boxes, "labels": target["labels"]}
        if self.train:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.seed, self.epoch, i))
                sample = AUGMENT(sample)
        image = v2.functional.to_dtype(sample["image"], torch.float32, scale=True)
        boxes = sample["boxes"].as_subclass(torch.Tensor)
        return image, {"boxes": boxes, "labels": sample["labels"], "index": i}


def collate(batch):
    """[(input, target)] -> (the inputs stacked, [targets]): images hold different numbers of
    boxes, so the targets stay a list. (LTD's input is a pair, stacked into [R, S].)"""
    inputs, targets = zip(*batch)
    return torch.utils.data.default_collate(inputs), list(targets)


# -----------------------------------------------------------------------------
# Model: a ResNet-18 cut after the layer whose stride gives the grid we want, and one linear layer
# applied to every cell. Nothing is downloaded: the weights start random.

BACKBONE_CHANNELS = {8: 128, 16: 256, 32: 512}  # ResNet-18's channels after layer2, layer3, layer4
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def resnet18_backbone(stride):
    r = torchvision.models.resnet18(weights=None)
    layers = [r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3, r.layer4]
    return nn.Sequential(*layers[:{8: 6, 16: 7, 32: 8}[stride]])


def cell_centres(h, w, device):
    """-> each cell's centre (x, y) in cells [h*w, 2], row by row."""
    rows_cols = torch.cartesian_prod(torch.arange(h, device=device), torch.arange(w, device=device))
    return rows_cols.flip(-1) + 0.5


def cells_to_boxes(raw, h, w, radius):
    """Raw head outputs [B, h*w, 4] -> boxes (cx, cy, w, h) relative to the image. A cell's centre
    prediction reaches `radius` cells from its centre: as far as the cells it learns from (Loss)."""
    centre = cell_centres(h, w, raw.device) + radius * (2 * raw[..., :2].sigmoid() - 1)
    return torch.cat([centre / torch.tensor([w, h], device=raw.device), raw[..., 2:].sigmoid()], -1)


def edge_distances(n, device):
    # -1/(n-1) (a box smaller than a cell may not hold its centre) to (n-2)/(n-1) of the image side
    return (torch.arange(n, device=device) - 1) / (n - 1)


def edges_to_boxes(edges, h, w):
    """Edge logits [B, h*w, 4, n] -> boxes (cx, cy, w, h) relative to the image. Each cell says
    how far its box's left, top, right and bottom edges are from its centre, as a distribution
    over n edge_distances: the box takes each one's expected distance."""
    distances = edges.softmax(-1) @ edge_distances(edges.shape[-1], edges.device)  # [B, h*w, 4]
    left, top, right, bottom = distances.unbind(-1)
    centre = cell_centres(h, w, edges.device) / torch.tensor([w, h], device=edges.device)
    return torch.stack([centre[:, 0] + (right - left) / 2, centre[:, 1] + (bottom - top) / 2,
                        (left + right).clamp(min=0), (top + bottom).clamp(min=0)], -1)


class GridDetector(nn.Module):
    """Images [B, 3, I, I] in [0, 1] -> per cell of the (I/stride)^2 grid a box [B, h*w, 4] (cx,
    cy, w, h relative to the image), K+1 class logits [B, h*w, K+1] (the last: background), edge
    logits [B, h*w, 4, dfl_bins] (None if 0). LTD calls its halves, `features`, `cells`, apart."""

    def __init__(self, num_classes, stride, radius=0.5, dfl_bins=0):
        super().__init__()
        self.radius, self.dfl_bins = radius, dfl_bins
        self.backbone = resnet18_backbone(stride)
        self.head = nn.Linear(BACKBONE_CHANNELS[stride], 4 * max(dfl_bins, 1) + num_classes + 1)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def features(self, images):                              # [B, 3, img_size, img_size] in [0, 1]
        return self.backbone((images - self.mean) / self.std)  # [B, C, h, w]

    def cells(self, features):
        _, _, h, w = features.shape
        out = self.head(features.flatten(2).transpose(1, 2)).float()  # [B, h*w, box + K + 1]
        if self.dfl_bins:
            edges = out[..., :4 * self.dfl_bins].unflatten(-1, (4, self.dfl_bins))
            return edges_to_boxes(edges, h, w), out[..., 4 * self.dfl_bins:], edges
        return cells_to_boxes(out[..., :4], h, w, self.radius), out[..., 4:], None

    def forward(self, images):
        return self.cells(self.features(images))


# channels_last spares the convolutions a layout conversion per layer: bf16 needs it (docs/speed.md)
MEMORY_FORMAT = torch.channels_last


def run_model(model, images, bf16):
    """The one forward pass: images (or LTD's [R, S] pair) moved to the model's device in
    channels_last, under bf16 autocast where bf16 is on (float32 outputs either way)."""
    device = next(model.parameters()).device
    move = lambda x: x.to(device, memory_format=MEMORY_FORMAT, non_blocking=True)
    # a detector's batch is one tensor; LTD's is [R, S]
    images = [move(x) for x in images] if isinstance(images, list) else move(images)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        return model(images)


# -----------------------------------------------------------------------------
# Loss: each ground-truth box goes to the cell its centre falls in (and with --assign-radius 1, the
# default, to the nearest cells inside it). Every cell learns its class (background when it owns
# no box); cells that own a box also learn the box.

# most cells are background: down-weighted, so that the few object cells are heard (docs/design.md)
BACKGROUND_WEIGHT = 0.1
DFL_WEIGHT = 0.25  # GFL's: DFL's log-losses are larger than the IoU loss beside it


def assign_boxes_to_cells(boxes, labels, h, w, background, radius):
    """boxes [N, 4] (cx, cy, w, h) relative to the image, their labels [N] -> per cell of the h x w
    grid a class [h*w] (`background` where no box) and a box [h*w, 4]; and how many boxes lost out.
    A box trains the cell its centre falls in (radius 0.5) and the cells within `radius` cells of
    its centre whose own centres lie inside it (radius 1: a large box's 2 x 2 cells around its
    centre; docs/yolo11n.md). A cell claimed by several boxes goes to the box whose centre it
    holds, then to the largest (it dominates the cell's features; a relative area is below 1, so
    the centre wins); a box left with no cell is a collision, lost for this image."""
    classes = torch.full((h * w,), background, dtype=torch.long)
    targets = torch.zeros(h * w, 4)
    if len(boxes) == 0:
        return classes, targets, 0
    cell_x, cell_y = cell_centres(h, w, boxes.device).T  # [h*w] each, in cells
    # a centre on the far edge (cx = 1) belongs to the last cell, not to one past the grid
    dx = cell_x - (boxes[:, 0:1] * w).clamp(max=w - 1e-4)  # [N, h*w]
    dy = cell_y - (boxes[:, 1:2] * h).clamp(max=h - 1e-4)
    holds_centre = (dx > -0.5) & (dx <= 0.5) & (dy > -0.5) & (dy <= 0.5)
    inside = (dx.abs() < boxes[:, 2:3] * w / 2) & (dy.abs() < boxes[:, 3:4] * h / 2)
    near = (dx > -radius) & (dx <= radius) & (dy > -radius) & (dy <= radius)
    claims = holds_centre | (inside & near)
    priority = claims * (1 + holds_centre + boxes[:, 2:3] * boxes[:, 3:4])  # centre, then area
    best, owner = priority.max(0)  # [h*w]
    owned = best > 0
    classes[owned], targets[owned] = labels[owner[owned]], boxes[owner[owned]]
    return classes, targets, len(boxes) - len(owner[owned].unique())


def paired_iou(a, b):
    """Boxes a, b [P, 4] xyxy -> the IoU of each a with its b [P] (box_iou compares all pairs)."""
    inter = (torch.min(a[:, 2:], b[:, 2:]) - torch.max(a[:, :2], b[:, :2])).clamp(min=0).prod(-1)
    return inter / (box_area(a) + box_area(b) - inter).clamp(min=1e-9)


def distribution_focal_loss(edges, distances):
    """Edge logits [P, 4, n], true distances [P, 4] in image sides -> DFL: the two of the
    edge_distances on either side of the true one learn it, each as much as it is close to it."""
    n = edges.shape[-1]
    at = (distances * (n - 1) + 1).clamp(0, n - 1.001).flatten()  # [P*4] in steps
    below, above = at.floor(), at.floor() + 1
    log_loss = lambda k: F.cross_entropy(edges.flatten(0, 1), k.long(), reduction="none")
    return (log_loss(below) * (above - at) + log_loss(above) * (at - below)).mean()


def detection_loss(boxes, logits, edges, targets, cfg):
    """The model's outputs (boxes [B, h*w, 4], logits [B, h*w, K+1], edges [B, h*w, 4, n] or None),
    targets (boxes in img_size pixels) -> loss parts and the number of boxes lost to collisions."""
    grid = math.isqrt(boxes.shape[1])  # images are square, so is the grid
    background = logits.shape[-1] - 1
    assigned = [assign_boxes_to_cells(box_convert(t["boxes"] / cfg.img_size, "xyxy", "cxcywh"),
                                      t["labels"], grid, grid, background, cfg.assign_radius)
                for t in targets]
    classes = torch.stack([a[0] for a in assigned]).to(logits.device)  # [B, h*w]
    target_boxes = torch.stack([a[1] for a in assigned]).to(boxes.device)  # [B, h*w, 4]
    positive = classes != background
    pred, true = boxes[positive], target_boxes[positive]  # [P, 4]
    pred_xyxy, true_xyxy = box_convert(pred, "cxcywh", "xyxy"), box_convert(true, "cxcywh", "xyxy")
    # Class: cross-entropy against a target per cell, each cell weighed by its class's weight.
    # With iou_targets, a cell that owns a box is that box's class only as far as its predicted
    # box overlaps it (the rest is background): the confidence NMS ranks by says how tight it is.
    target = F.one_hot(classes, background + 1).float()  # [B, h*w, K+1]
    if cfg.iou_targets:
        iou = paired_iou(pred_xyxy.detach(), true_xyxy)  # [P]
        target[positive] = target[positive] * iou[:, None]
        target[..., background][positive] = 1 - iou
    weighted = target * torch.tensor([1.0] * background + [BACKGROUND_WEIGHT], device=target.device)
    cls = -(weighted * logits.log_softmax(-1)).sum() / weighted.sum()
    # Box: GIoU, plus DFL on the edges' distances from the cell's centre (or, for a box as 4
    # numbers, SmoothL1 on (cx, cy, w, h) in cell units, so that errors are O(1))
    if len(pred):
        giou = generalized_box_iou_loss(pred_xyxy, true_xyxy, reduction="mean")
        if edges is None:
            box = F.smooth_l1_loss(pred * grid, true * grid)
        else:
            centre = cell_centres(grid, grid, boxes.device)[positive.nonzero()[:, 1]] / grid
            distances = torch.cat([centre - true_xyxy[:, :2], true_xyxy[:, 2:] - centre], -1)
            box = DFL_WEIGHT * distribution_focal_loss(edges[positive], distances)
    else:  # zeros that stay in the graph: backward (and DDP) work with no box in the batch
        box = giou = boxes.sum() * 0
    parts = {"loss": cls + box + giou, "cls": cls, "box": box, "giou": giou}
    return parts, sum(a[2] for a in assigned)


# -----------------------------------------------------------------------------
# Decoding: per-cell outputs -> a short list of boxes per image, in its original pixels. score_cells
# keeps every cell (fixed shapes: inside the ONNX export); select_detections thresholds, then NMS.

MAX_DETECTIONS = 100
NMS_IOU = 0.5
EVAL_CONF = 0.001  # evaluation keeps low-confidence boxes: they extend the PR curve


def score_cells(boxes, logits):
    """boxes [B, h*w, 4] (cx, cy, w, h), logits [B, h*w, K+1] -> boxes [B, h*w, 4] xyxy relative
    to the image, and class probabilities [B, h*w, K] (background's share left out)."""
    return box_convert(boxes, "cxcywh", "xyxy"), logits.softmax(-1)[..., :-1]


def select_detections(boxes, scores, sizes, conf, iou, max_det=MAX_DETECTIONS):
    """score_cells' output, sizes [(height, width)] -> per image {boxes [N, 4] xyxy pixels, scores
    [N], labels [N]}: each cell's best class, scores above conf, per-class NMS, the max_det best."""
    scores, labels = scores.max(-1)  # [B, h*w]
    results = []
    for b, (height, width) in enumerate(sizes):
        keep = scores[b] > conf
        xyxy = boxes[b, keep] * torch.tensor([width, height, width, height], device=boxes.device)
        xyxy = clip_boxes_to_image(xyxy, (height, width))
        kept = batched_nms(xyxy, scores[b, keep], labels[b, keep], iou)[:max_det]
        results.append({"boxes": xyxy[kept].cpu(), "scores": scores[b, keep][kept].cpu(),
                        "labels": labels[b, keep][kept].cpu()})
    return results


# -----------------------------------------------------------------------------
# Evaluation: COCO's mean average precision, written out so the rules can be read (and no
# pycocotools is needed at run time). For each class: sort all detections by score, walk down
# the list matching each to the best unmatched ground truth at IoU >= t, and average the
# precision at 101 recall points. mAP averages over classes and t = 0.50, 0.55, ..., 0.95.

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0, 1, 101)
CONFIDENCES = np.linspace(0, 1, 101)  # thresholds a user may detect with: what each one trades
MATCH_CHUNK = 500  # images matched at once: memory for [images, detections, ground truths]


def match_detections(predictions, targets):
    """-> hits [T, N, D]: was image n's d-th detection by score a hit at IoU threshold t? Each in
    turn takes the free ground truth of its class it overlaps most (COCO's greedy rule), for all
    images and thresholds at once. Also the labels and scores in that order [N, D] (-1: padding)."""
    ranked = []  # each image's detections by score, at most MAX_DETECTIONS per class (as COCO)
    for pred in predictions:
        order = torch.sort(pred["scores"], descending=True, stable=True).indices
        labels = pred["labels"][order]
        ranked.append(order[(labels[:, None] == labels[None]).tril().sum(1) <= MAX_DETECTIONS])
    most = max(map(len, ranked))
    labels, scores = (torch.stack([F.pad(p[key][o], (0, most - len(o)), value=-1) for p, o in
                                   zip(predictions, ranked)]) for key in ("labels", "scores"))
    thresholds = torch.tensor(np.minimum(IOU_THRESHOLDS, 1 - 1e-10))[:, None, None]  # [T, 1, 1]
    hits = torch.zeros(len(IOU_THRESHOLDS), len(ranked), most, dtype=torch.bool)
    for start in range(0, len(ranked), MATCH_CHUNK):  # MATCH_CHUNK images at a time
        part = slice(start, start + MATCH_CHUNK)
        # IoU with each ground truth of the same image and class, zero-padded: [n, D, G]
        most_true = max(len(t["labels"]) for t in targets[part]) + 1
        ious = torch.zeros(len(ranked[part]), most, most_true, dtype=torch.float64)
        for i, (true, order) in enumerate(zip(targets[part], ranked[part])):
            iou = box_iou(predictions[start + i]["boxes"][order].double(), true["boxes"].double())
            same_class = labels[start + i, :len(order), None] == true["labels"][None]
            ious[i, :len(order), :len(true["labels"])] = iou * same_class
        taken = torch.zeros(len(IOU_THRESHOLDS), len(ious), most_true, dtype=torch.bool)
        for d in range(most):
            free = (ious[:, d] >= thresholds) & ~taken  # [T, n, G]
            # the best free one; COCO keeps the last of equals (argmax finds the first: flip)
            best = most_true - 1 - torch.where(free, ious[:, d], -1.0).flip(-1).argmax(-1)
            hits[:, part, d] = found = free.any(-1)  # [T, n]
            taken |= F.one_hot(best, most_true).bool() & found[..., None]
    return hits, labels, scores


def precision_curve(hits, num_true):
    """hits [D] in descending score order -> COCO's interpolated precision at RECALL_POINTS."""
    tp, fp = np.cumsum(hits).astype(float), np.cumsum(~hits).astype(float)
    recall = tp / num_true
    precision = tp / (tp + fp + np.spacing(1))
    # the best precision at this recall or beyond; the first detection reaching each recall point
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    at = np.searchsorted(recall, RECALL_POINTS, side="left")
    return np.append(precision, 0)[at]  # recall points never reached count as precision 0


def evaluate(predictions, targets, num_classes):
    """COCO-style mAP. predictions / targets: one dict per image, `boxes` [N, 4] xyxy pixels,
    `labels` [N] (and `scores` [N]). Classes with no ground truth: -1, left out of the means."""
    hits, labels, scores = match_detections(predictions, targets)  # [T, N, D], [N, D], [N, D]
    num_true = np.bincount(torch.cat([t["labels"] for t in targets]), minlength=num_classes)
    ap = -np.ones((len(IOU_THRESHOLDS), num_classes))
    pr50, by_conf = [[] for _ in range(num_classes)], [[] for _ in range(num_classes)]  # IoU 0.5
    for k in np.flatnonzero(num_true):
        mine = labels == k  # [N, D]
        class_scores = scores[mine].double().numpy()
        order = np.argsort(-class_scores, kind="mergesort")
        class_hits = hits[:, mine].numpy()[:, order]
        # AP: the area under the curve, its mean over the 101 recall points
        ap[:, k] = [precision_curve(h, num_true[k]).mean() for h in class_hits]
        pr50[k] = precision_curve(class_hits[0], num_true[k]).tolist()
        # what each threshold c keeps, the detections scoring >= c: [precision, recall] at IoU 0.5
        kept = np.searchsorted(-class_scores[order], -CONFIDENCES, side="right")  # [101]
        true_positives = np.append(0, np.cumsum(class_hits[0]))[kept]
        by_conf[k] = [(true_positives / np.maximum(kept, 1)).tolist(),
                      (true_positives / num_true[k]).tolist()]
    valid = ap[:, num_true > 0]  # [T, classes with ground truth]
    at = {round(t * 100): i for i, t in enumerate(IOU_THRESHOLDS)}
    means = {f"map{t}": float(valid[at[t]].mean()) if valid.size else -1.0 for t in (50, 75, 90)}
    return {"map": float(valid.mean()) if valid.size else -1.0, **means, "pr50_per_class": pr50,
            "ap50_per_class": ap[at[50]].tolist(), "pr_by_confidence": by_conf,
            "ap_per_class": [float(ap[:, k].mean()) if num_true[k] else -1.0
                             for k in range(num_classes)]}


# -----------------------------------------------------------------------------
# Training: AdamW, a learning rate that warms up, then follows a cosine to zero, and one step for
# every model in this file: the lesson's loop calls it, and so does Part 2's (checkpoints, resume).

WARMUP_FRACTION = 0.05
GRAD_CLIP = 10.0


def learning_rate(cfg, progress):
    """progress: the share of the planned run done, 0 to 1."""
    if progress < WARMUP_FRACTION:
        return cfg.lr * progress / WARMUP_FRACTION
    cosine = math.cos(math.pi * (progress - WARMUP_FRACTION) / (1 - WARMUP_FRACTION))
    return cfg.lr * 0.5 * (1 + cosine)


def train_step(model, optimizer, images, targets, compute_loss, lr, bf16):
    """Forward, loss, backward, clip, step -> the loss parts, the boxes lost to shared cells, and
    whether the step was learnt. A NaN or inf loss makes the gradient's norm NaN or inf: that step
    is skipped (under torchrun every process sees the same averaged gradient, so all skip it)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    parts, lost = compute_loss(run_model(model, images, bf16), targets)
    optimizer.zero_grad(set_to_none=True)
    parts["loss"].backward()
    learnt = bool(torch.isfinite(nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)))
    if learnt:
        optimizer.step()
    return parts, lost, learnt


def use_bf16(device, fp32):
    # bf16 hardware trains ResNet-18 ~2x faster (docs/speed.md); emulated bf16 is slower than fp32
    if device.type == "cuda":
        return not fp32 and torch.cuda.is_bf16_supported()
    return not fp32 and getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()


def model_network(model, bf16):
    """A GridDetector, set to eval -> its network: images [B, 3, I, I] in [0, 1] -> score_cells'."""
    model.eval()
    return lambda images: score_cells(*run_model(model, images, bf16)[:2])


@torch.no_grad()
def predict(network, data, batch, conf, iou, indices=None):
    """A DetectionDataset (or its images at `indices`) -> a detections dict per image, in pixels."""
    results = []
    for images, targets in DataLoader(data, batch, sampler=indices, collate_fn=collate):
        sizes = [data.sizes[t["index"]] for t in targets]
        results += select_detections(*network(images), sizes, conf, iou)
    return results


# -----------------------------------------------------------------------------
# Learn To Detect (LTD): pretraining without labels. Cut a random sub-image S out of a reference
# image R, change its colours and blur it, and ask the network for S's box inside R. To answer, it
# needs what a detector needs: features that say what is where, at any scale. R is left intact
# (greying out S's hole gives the answer away: --mask-crop measures it). S is one object of one
# class, so LTD trains with detection's loss and loop; its backbone then starts a detector.

LTD_AREA = (0.04, 0.4)   # S's area as a fraction of R's, log-uniform (docs/ltd.md)
LTD_ASPECT = (0.5, 2.0)  # S's width / height, log-uniform
LTD_CROP_SIZE = 96       # S's fixed size: its scale in R must be inferred, not read off
LTD_JITTER = v2.Compose([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.05),
                         v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, 2.0))], p=0.5)])
MASK_GREY = 0.5
LTD_HELD_OUT_SEED = 0  # held-out crops come from their own seed (and epoch 0): the same every time


def log_uniform(low, high):
    return math.exp(torch.empty(()).uniform_(math.log(low), math.log(high)).item())


def sample_ltd_crop(R):
    """R [3, H, W] in [0, 1] -> S [3, LTD_CROP_SIZE, LTD_CROP_SIZE], S's box in R [4] (xyxy, R's
    pixels). Random from torch's generator, so --seed fixes it. S's colours are jittered after."""
    _, height, width = R.shape
    area, aspect = log_uniform(*LTD_AREA) * height * width, log_uniform(*LTD_ASPECT)
    w, h = min(round(math.sqrt(area * aspect)), width), min(round(math.sqrt(area / aspect)), height)
    x, y = torch.randint(0, width - w + 1, ()).item(), torch.randint(0, height - h + 1, ()).item()
    S = v2.functional.resized_crop(R, y, x, h, w, [LTD_CROP_SIZE, LTD_CROP_SIZE], antialias=True)
    return S, torch.tensor([x, y, x + w, y + h], dtype=torch.float32)


class LTDDataset(torch.utils.data.Dataset):
    """Images resized to img_size ([3, I, I] uint8) -> ((R [3, I, I] in [0, 1], S [3, LTD_CROP_SIZE,
    LTD_CROP_SIZE]), {boxes [1, 4], labels [1], index}): S as one object, new at each draw."""

    def __init__(self, images, img_size, mask_crop, seed=LTD_HELD_OUT_SEED):
        self.images, self.img_size, self.mask_crop = images, img_size, mask_crop
        self.seed, self.epoch = seed, 0  # the crops: sample_seed(seed, epoch, i)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        R = v2.functional.to_dtype(torch.from_numpy(self.images[i]), torch.float32, scale=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, self.epoch, i))
            S, box = sample_ltd_crop(R)
            S = LTD_JITTER(S)
        if self.mask_crop:
            x1, y1, x2, y2 = box.int().tolist()
            R[:, y1:y2, x1:x2] = MASK_GREY  # S was already cut from the intact R
        return (R, S), {"boxes": box[None], "labels": torch.zeros(1, dtype=torch.long), "index": i}


class LTDNet(nn.Module):
    """Where in R is S? One GridDetector with one class (and the centre-cell rule) sees both images.
    S's pooled features scale R's channels, so a cell's linear head sees the product of what is
    there and what is sought: a learned correlation (measured against alternatives: docs/ltd.md)."""

    def __init__(self, stride):
        super().__init__()
        self.detector = GridDetector(num_classes=1, stride=stride)

    def forward(self, pair):
        R, S = pair  # [B, 3, img_size, img_size], [B, 3, LTD_CROP_SIZE, LTD_CROP_SIZE]
        features = self.detector.features(R)                   # [B, C, h, w]
        # S uses R's running batch-norm statistics in training too: the crops' own made LTD collapse
        self.detector.backbone.train(False)
        query = self.detector.features(S).mean((2, 3))         # [B, C]
        self.detector.backbone.train(self.training)
        return self.detector.cells(features * query[:, :, None, None])


@torch.no_grad()
def locate_crops(model, pairs, batch, bf16):
    """Held-out (R, S) pairs -> predicted and true S boxes [n, 4] in R's pixels. The prediction
    is the box of the cell most sure that it holds S."""
    model.eval()
    predicted, true = [], []
    for (R, S), targets in DataLoader(pairs, batch, collate_fn=collate):
        boxes, logits, _ = run_model(model, [R, S], bf16)  # [b, h*w, 4], [b, h*w, 2]
        best = logits.softmax(-1)[..., 0].argmax(1)      # [b]
        found = box_convert(boxes[torch.arange(len(best)), best], "cxcywh", "xyxy")
        predicted.append(found.cpu() * R.shape[-1])
        true.append(torch.cat([t["boxes"] for t in targets]))
    return torch.cat(predicted), torch.cat(true)


def validate_ltd(model, data, batch, bf16):
    """The LTD metric: mean IoU of the predicted S box, and the share of pairs with IoU >= 0.5."""
    predicted, true = locate_crops(model, data, batch, bf16)
    iou = paired_iou(predicted, true)
    return {"iou": iou.mean().item(), "hit50": (iou >= 0.5).float().mean().item()}


# -----------------------------------------------------------------------------
# The lesson: all of the above in one loop, on the built-in shapes (`odscratch lesson` runs it).
# Part 2's `train` takes the same steps in the same order: the same seed gives the same weights.

PRINT_EVERY = 50  # steps


def lesson(cfg=Config()):
    """Train a detector on the built-in shapes, on the CPU; print the validation mAP at the end."""
    torch.manual_seed(cfg.seed)  # the model's first weights
    bf16 = use_bf16(torch.device("cpu"), cfg.fp32)
    train_data, val_data = (DetectionDataset(*decode_split(synthetic_split(split), cfg.img_size),
                                             cfg.img_size, train=split == "train", seed=cfg.seed)
                            for split in ("train", "validation"))
    # a new order of the images each epoch, fixed by the seed
    order = RandomSampler(train_data, generator=torch.Generator().manual_seed(cfg.seed))
    batches = DataLoader(train_data, cfg.batch, sampler=order, drop_last=True, collate_fn=collate)
    model = GridDetector(len(SYNTHETIC_CLASSES), cfg.stride, cfg.assign_radius, cfg.dfl_bins)
    model = model.to(memory_format=MEMORY_FORMAT)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss = lambda out, targets: detection_loss(*out, targets, cfg)
    steps = cfg.epochs * len(batches)
    for epoch in range(1, cfg.epochs + 1):
        train_data.epoch = epoch  # this epoch's augmentation
        for step, (images, targets) in enumerate(batches, (epoch - 1) * len(batches)):
            lr = learning_rate(cfg, step / steps)
            parts, _, _ = train_step(model, optimizer, images, targets, loss, lr, bf16)
            if step % PRINT_EVERY == 0:
                print(f"epoch {epoch}, step {step}/{steps}: loss {parts['loss'].item():.3f}, "
                      f"learning rate {lr:.5f}")
    found = predict(model_network(model, bf16), val_data, cfg.batch, EVAL_CONF, NMS_IOU)
    metrics = evaluate(found, val_data.targets, len(SYNTHETIC_CLASSES))
    print(f"validation mAP50-95 {metrics['map']:.3f}, AP90 {metrics['map90']:.3f}")
    print(f"mAP50 {metrics['map50']:.3f}")
    return model, metrics


# =============================================================================
# PART 2: THE PRODUCT
# =============================================================================
# The layouts labelling tools export and their checks, training that loses nothing (checkpoints,
# Ctrl-C, --resume, torchrun), pictures, `Detector`, ONNX, the command line. Its own imports: the
# recipe above needs none of them.
import contextlib
import copy
import csv
import datetime
import glob
import importlib.util
import json
import os
import queue
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, field, fields, replace
from fractions import Fraction
from typing import Annotated
from xml.etree import ElementTree

import huggingface_hub
import PIL.ExifTags
import PIL.ImageOps
import pyarrow.compute as pc
import torch.distributed as dist
import typer
import yaml
from filelock import FileLock
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table
from torch.utils.data import Subset
from torch.utils.data.distributed import DistributedSampler
from torchvision.ops import remove_small_boxes
from urllib.parse import urlparse
from torchvision.utils import make_grid

console = Console()
datasets.disable_progress_bars()
datasets.logging.set_verbosity_error()
# prepare_split counts broken EXIF blocks in one line: Pillow's warnings per image would repeat it
warnings.filterwarnings("ignore", category=UserWarning, module="PIL.TiffImagePlugin")
warnings.filterwarnings("ignore", "Possibly corrupt EXIF", UserWarning)


class UserError(Exception):
    """A problem with the user's input: shown as one line, never as a traceback."""


@dataclass
class RunConfig(Config):
    """The recipe's settings, and what a run of the product adds: every training option."""
    data: str = "synthetic"         # or a YOLO, COCO, VOC or Hugging Face dataset (or hub name)
    bbox_format: str = "auto"       # Hugging Face boxes: xyxy, xywh or auto (others say theirs)
    time: float = 0.0               # minutes; when set, the schedule ends at this budget
    patience: int = 0               # stop after this many validations without a better model
    val_every: int = 1              # validate after epoch 1, every val_every-th and the last
    device: str = "auto"


# -----------------------------------------------------------------------------
# Checks: every image and box of every source goes through them once, when a split becomes a
# CheckedDataset. Unreadable images are skipped and named, stray boxes clipped or dropped and
# counted, a wrong box format caught.


def class_names(ds):
    """A split in the schema -> its class names (its ClassLabel's)."""
    return ds.features["objects"]["category"].feature.names


UNREADABLE = (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError)  # what PIL raises


# One-time work: decoding every image to check it (and, for training, to resize it) is done once
# per machine. Threads decode (PIL lets go of Python's lock while it decodes) into a file of the
# images resized to --img-size as uint8, kept in PREPARED (`rm -r` it to free the disk): a second
# run, a --resume, or another process reads it at once; one process writes, the others wait for
# it. Training reads an image from it when it needs it: a large split never sits in memory. Its
# name is a hash of the split's content as datasets fingerprints it, and of each image file's size
# and time, so a changed file is prepared anew.
PREPARED = Path(datasets.config.HF_DATASETS_CACHE) / "odscratch"
PREPARE_BATCH = 256  # rows read at a time: a large split's images never sit in memory together
EXIF_LOCK = threading.Lock()


def open_image(record):
    # record is datasets' undecoded image: {"bytes": ..., "path": ...}
    return PIL.Image.open(io.BytesIO(record["bytes"]) if record["bytes"] else record["path"])


def exif_orientation(image):
    """An opened image's EXIF orientation, from its header: 2-8 say how to turn it, else 1. Phones
    store most photos sideways with this tag; labelling tools turn them, and boxes are drawn so."""
    known = image.format != "PNG" or "exif" in image.info  # a PNG's after its pixels: not read
    orientation = image.getexif().get(PIL.ExifTags.Base.Orientation, 1) if known else 1
    return orientation if orientation in range(1, 9) else 1


def upright(image):
    """An opened image as labelling tools show it (turned as its EXIF says), in RGB."""
    if exif_orientation(image) != 1:
        image = PIL.ImageOps.exif_transpose(image)
    return image.convert("RGB")


def cpu_cores():
    """The cores this process may use (a container or taskset may allow fewer than the CPU has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def prepare_image(record, resize):
    """datasets' undecoded image -> (pixels [3, S, S] uint8, (height, width) upright, turned?,
    malformed EXIF?), or (None, why PIL cannot decode it: missing, corrupt, truncated, or over
    PIL's decompression-bomb limit, Image.MAX_IMAGE_PIXELS: twice it is refused unread)."""
    try:
        with open_image(record) as image:
            image.load()  # the decoding, on this thread (Pillow lets go of Python's lock)
            # reading EXIF may warn, and warnings are process-wide: one thread at a time
            with EXIF_LOCK:
                malformed, turned = malformed_exif(image), exif_orientation(image) != 1
                image = upright(image)  # a decoded image turned: quick
            return resize(image).numpy(), (image.height, image.width), turned, malformed
    except FileNotFoundError:
        return None, "file not found"
    except UNREADABLE as e:
        return None, str(e).split(". ")[0]


def prepared_name(ds, img_size):
    """What the prepared split is kept under: its content and img_size, and its image files'
    sizes and times (an image embedded in the dataset is in its fingerprint)."""
    key = hashlib.sha256(f"{ds._fingerprint} {img_size}".encode())
    images = ds.select_columns(["image"]).with_format("arrow")  # the paths, not the bytes, read
    for start in range(0, len(ds), PREPARE_BATCH):
        column = images[start:start + PREPARE_BATCH]["image"]
        embedded = pc.is_valid(pc.struct_field(column, "bytes")).to_pylist()
        for path, inside in zip(pc.struct_field(column, "path").to_pylist(), embedded):
            if path and not inside and os.path.isfile(path):
                stat = os.stat(path)
                key.update(f"{path} {stat.st_size} {stat.st_mtime_ns}".encode())
    return PREPARED / key.hexdigest()[:20]


class PreparedImages:
    """A prepared split's images, [3, S, S] uint8 each, read from its file one at a time when
    asked for (the OS keeps what fits in its page cache; the process holds none of them)."""

    def __init__(self, path, count, img_size):
        self.path, self.count, self.shape = path, count, (3, img_size, img_size)

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        size = math.prod(self.shape)
        return np.fromfile(self.path, np.uint8, size, offset=i * size).reshape(self.shape)


def prepare_images(ds, img_size, path, name):
    """Decode and resize every image of ds on threads, with a progress bar -> path.u8 (the
    readable images, in order) and path.json (what was unreadable, sizes, EXIF counts)."""
    resize = resize_transform(img_size)
    info = {"unreadable": {}, "sizes": [], "turned": 0, "malformed": 0}
    columns = [TextColumn(f"{name}: reading images once"), BarColumn(), MofNCompleteColumn()]
    with ThreadPoolExecutor(cpu_cores()) as pool, open(path.with_suffix(".tmp"), "wb") as out, \
            Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("", total=len(ds))
        for start in range(0, len(ds), PREPARE_BATCH):
            records = ds[start:start + PREPARE_BATCH]["image"]
            for i, done in enumerate(pool.map(prepare_image, records, [resize] * len(records))):
                if done[0] is None:
                    info["unreadable"][start + i] = done[1]
                    continue
                pixels, size, turned, malformed = done
                out.write(pixels.tobytes())
                info["sizes"].append(size)
                info["turned"] += turned
                info["malformed"] += malformed
            progress.update(task, advance=len(records))
    os.replace(path.with_suffix(".tmp"), path.with_suffix(".u8"))
    write_atomically(path.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(info)))


def prepare_split(ds, name, img_size):
    """A split -> (its readable rows, their images resized to img_size (PreparedImages), their
    (height, width) upright). Unreadable images are counted and named, and leave the split:
    training goes on without them. Photos turned by their EXIF are counted."""
    ds = ds.cast_column("image", datasets.Image(decode=False))
    PREPARED.mkdir(parents=True, exist_ok=True)
    path = prepared_name(ds, img_size)
    with FileLock(path.with_suffix(".lock")):  # one process prepares; the others wait for it
        if not (path.with_suffix(".json").exists() and path.with_suffix(".u8").exists()):
            prepare_images(ds, img_size, path, name)
    info = json.loads(path.with_suffix(".json").read_text())
    bad = {int(i): problem for i, problem in info["unreadable"].items()}
    if info["turned"] or info["malformed"]:
        console.print(f"{name}: {info['turned']} images turned upright as their EXIF orientation "
                      "says" + (f"; {info['malformed']} with a malformed EXIF block, read as far "
                                "as it goes" if info["malformed"] else ""))
    pixels = PreparedImages(path.with_suffix(".u8"), len(ds) - len(bad), img_size)
    sizes = [tuple(size) for size in info["sizes"]]
    if not bad:
        return ds, pixels, sizes
    named = [f"{ds[i]['image']['path'] or f'image {i}'} ({problem})"
             for i, problem in list(bad.items())[:3]]
    more = " ..." if len(bad) > 3 else ""
    console.print(f"{name}: skipped {len(bad)} unreadable image(s): {'; '.join(named)}{more}",
                  soft_wrap=True)
    if len(bad) == len(ds):
        raise UserError(f"{name}: none of its {len(ds)} images can be read")
    return ds.select([i for i in range(len(ds)) if i not in bad]), pixels, sizes


def clip_and_drop(boxes, width, height):
    """Boxes partly outside the image are clipped to it; boxes left (almost) without area, under
    MIN_BOX_SIDE pixels wide or high, are dropped."""
    clipped = clip_boxes_to_image(boxes, (height, width))
    keep = torch.zeros(len(boxes), dtype=torch.bool)
    keep[remove_small_boxes(clipped, MIN_BOX_SIDE)] = True
    n_clipped = int(((clipped != boxes).any(1) & keep).sum())
    return clipped[keep], keep, n_clipped


IMPOSSIBLE_SHARE = 0.1  # more impossible boxes than this in a split: the wrong --bbox-format
FAR_OUTSIDE = 0.25      # a box reaching this share of the image size past its edge is impossible


def impossible_boxes(boxes, width, height):
    """How many xyxy boxes no annotation tool draws: max < min, or far past the image's edge. A few
    are noise (clipped or dropped); many mean the boxes are in the other format (xywh read as xyxy:
    max < min; xyxy read as xywh: far past the right and bottom edges)."""
    size = torch.tensor([width, height, width, height])
    inverted = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    outside = ((boxes < -FAR_OUTSIDE * size) | (boxes > (1 + FAR_OUTSIDE) * size)).any(1)
    return int((inverted | outside).sum())


def upright_size(image):
    """An opened image -> (width, height) as labelling tools show it, from the header alone: EXIF
    orientations 5 to 8 turn it a quarter."""
    width, height = image.size
    return (height, width) if exif_orientation(image) >= 5 else (width, height)


TIFF_HEADERS = (b"II*\x00", b"MM\x00*")  # how an EXIF block starts, after "Exif\0\0"


def malformed_exif(image):
    """Whether an opened image's EXIF block is broken: not a TIFF header, Pillow warns or fails
    reading it, or an orientation outside 1-8. (Read as far as it goes all the same.)"""
    data = image.info.get("exif")
    if data is None:
        return False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            exif = PIL.Image.Exif()
            exif.load(data)
            bad_orientation = exif.get(PIL.ExifTags.Base.Orientation, 1) not in range(1, 9)
        except Exception:
            return True
    header = data.removeprefix(b"Exif\x00\x00")[:4]
    return bad_orientation or bool(caught) or header not in TIFF_HEADERS


def read_targets(ds, sizes, name, train):
    """A split's boxes, read row by row, and its images' sizes [(height, width)] -> targets
    [{boxes [N, 4] xyxy pixels, labels [N]}]. Boxes partly outside their image are
    clipped, boxes without area dropped, both counted; a split where many boxes are impossible
    has the wrong --bbox-format, and is refused."""
    classes = class_names(ds)
    targets, n_boxes, n_impossible, n_clipped, n_dropped = [], 0, 0, 0, 0
    for row, (height, width) in zip(ds.select_columns(["objects"]), sizes):
        target = read_target(row["objects"])
        boxes, labels = target["boxes"], target["labels"]
        if len(labels) and not 0 <= labels.min() <= labels.max() < len(classes):
            wrong = labels.max() if labels.max() >= len(classes) else labels.min()
            raise UserError(f"{name}: category {wrong} is not in its class list {classes}")
        n_boxes += len(boxes)
        n_impossible += impossible_boxes(boxes, width, height)
        boxes, keep, clipped = clip_and_drop(boxes, width, height)
        n_clipped, n_dropped = n_clipped + clipped, n_dropped + int((~keep).sum())
        targets.append({"boxes": boxes, "labels": labels[keep]})
    if train and n_boxes == 0:
        raise UserError(f"{name}: none of its {len(ds)} images has a box, so there is nothing to "
                        "learn from")
    if n_impossible > IMPOSSIBLE_SHARE * n_boxes:
        raise UserError(f"{name}: {n_impossible} of {n_boxes} boxes are impossible as "
                        "[x_min, y_min, x_max, y_max] (max < min, or far outside the image): "
                        "is --bbox-format right? xyxy is [x_min, y_min, x_max, y_max], "
                        "xywh is [x, y, width, height]")
    if n_clipped or n_dropped:
        console.print(f"{name}: {n_clipped} boxes clipped to their image, "
                      f"{n_dropped} with no area dropped")
    return targets


class CheckedDataset(DetectionDataset):
    """A split in the schema -> a DetectionDataset of its readable images (decoded once per
    machine and kept resized: prepare_split) and checked boxes (read_targets); `ds`: those rows,
    `name`: what messages call it."""

    def __init__(self, ds, img_size, train, name="data", seed=0):
        self.ds, images, sizes = prepare_split(ds, name, img_size)
        self.name = name
        targets = read_targets(self.ds, sizes, name, train)
        super().__init__(images, sizes, targets, img_size, train, seed)


def ltd_images(ds, name, img_size):
    """A split's readable images, resized (its boxes, if any, not read): what LTDDataset takes."""
    return prepare_split(ds.select_columns(["image"]), name, img_size)[1]


# -----------------------------------------------------------------------------
# Your own data, as labelling tools export it (CVAT, Label Studio, Roboflow, LabelImg, ...): YOLO
# txt files with a data.yaml, COCO json, Pascal VOC xml, or anything Hugging Face datasets reads.
# A reader walks the annotation files once and gives, per split, one row per image: the image's
# path, its boxes in xyxy pixels, their class indices. datasets writes the rows to its cache (the
# images stay on disk and are read when used). Broken annotations are skipped, counted and named;
# a split that is mostly broken is refused.

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
SPLIT_WORDS = {"train": "train", "training": "train", "val": "validation", "valid": "validation",
               "validation": "validation", "dev": "validation", "test": "test", "testing": "test"}
MOSTLY_BROKEN = 0.5  # a split with more than this share of its images (or boxes) broken is refused
LAYOUTS = ("YOLO (a data.yaml, or classes.txt beside txt labels), COCO (.json), Pascal VOC (.xml), "
           "Hugging Face datasets (parquet or arrow files, or images with a metadata.jsonl)")


def split_named(name):
    """A file or folder name -> the split it names (instances_val2017 -> validation), or None."""
    words = re.findall(r"[a-z]+", name.lower())
    return next((SPLIT_WORDS[w] for w in words if w in SPLIT_WORDS), None)


@dataclass
class Annotations:
    """What a reader found. rows: {split: [{"image": path, "objects": {"bbox", "category"}}]};
    skipped: (split, "image" or "box", why, where) per thing left out; notes: lines to print."""
    layout: str
    classes: list
    rows: dict
    skipped: list
    notes: list


def image_row(path, boxes, categories):
    return {"image": str(path), "objects": {"bbox": boxes, "category": categories}}


def images_by_name(root):
    """Every image under root, by file name and by stem: where annotations name an image without
    saying in which folder it is."""
    index = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            index.setdefault(path.name, path)
            index.setdefault(path.stem, path)
    return index


def find_image(name, folders, index):
    """The image `name` in the first of `folders` that has it, else anywhere in the dataset."""
    name = name.replace("\\", "/")  # as written on Windows
    found = next((folder / name for folder in folders if (folder / name).is_file()), None)
    return found or index.get(Path(name).name) or index.get(Path(name).stem)


def image_size(path):
    """(width, height) from the image's header, upright, or None when PIL cannot open it."""
    try:
        with PIL.Image.open(path) as image:
            return upright_size(image)
    except UNREADABLE:
        return None


# YOLO: one txt file per image, one `class cx cy w h` line per box, relative to the image's size.

def yolo_label_path(image):
    # Ultralytics' rule: the last /images/ of the path becomes /labels/, the suffix becomes .txt
    head, images, tail = str(image).rpartition(f"{os.sep}images{os.sep}")
    return Path(f"{head}{os.sep}labels{os.sep}{tail}" if images else str(image)).with_suffix(".txt")


def read_yolo_label(path, width, height, num_classes, split, skipped):
    """A YOLO label file -> boxes in xyxy pixels and class indices. A line of 6 numbers has a score
    after the box (`detect --save-conf` writes it); one of 7 or more is a polygon (class x1 y1 x2 y2
    ...), as segmentation exports write it: its box is its bounds."""
    boxes, categories = [], []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            values = [float(v) for v in line.split()]
        except ValueError:
            values = [math.nan]
        if not values:
            continue
        where = f"{path.name}:{n}"
        polygon = len(values) >= 7 and len(values) % 2 == 1
        if len(values) not in (5, 6) and not polygon or not all(-0.01 <= v <= 1.01
                                                                 for v in values[1:]):
            why = "label lines that are not `class cx cy w h` in 0-1"
            skipped.append((split, "box", why, where))
        elif not values[0].is_integer() or not 0 <= values[0] < num_classes:
            skipped.append((split, "box", f"class ids past the {num_classes} names", where))
        else:
            if polygon:
                x, y = values[1::2], values[2::2]
                box = [min(x), min(y), max(x), max(y)]
            else:
                cx, cy, w, h = values[1:5]
                box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
            boxes.append([box[0] * width, box[1] * height, box[2] * width, box[3] * height])
            categories.append(int(values[0]))
    return boxes, categories


def names_file(root):
    # one class name per line: LabelImg writes classes.txt, CVAT's YOLO 1.1 export obj.names
    return min([*root.rglob("classes.txt"), *root.rglob("obj.names")], default=None)


def yolo_class_names(spec, root, source):
    """data.yaml's `names` (a list, or {id: name}), else a classes.txt or obj.names."""
    names = spec.get("names")
    if isinstance(names, dict):
        return [str(names.get(i, i)) for i in range(max(names) + 1)]
    if names:
        return [str(name) for name in names]
    if names := names_file(root):
        return [line.strip() for line in names.read_text().splitlines() if line.strip()]
    if spec.get("nc"):
        return [str(i) for i in range(spec["nc"])]
    raise UserError(f"{source} has no `names` and no classes.txt is beside it: add the class names "
                    "to it (names: [cat, dog])")


def yolo_split_images(entry, bases, source):
    """A data.yaml split entry (a folder, a .txt list of images, or a list of them) -> image paths.
    Paths are relative to data.yaml's `path`, else its own folder; Roboflow's `../train/images` is
    found in the dataset folder too, as Ultralytics finds it."""
    images = []
    for item in entry if isinstance(entry, list) else [entry]:
        item = str(item)
        tries = [base / item for base in bases]
        tries += [base / item[3:] for base in bases if item.startswith("../")]
        path = next((p for p in tries if p.exists()), None)
        if path is None:
            raise UserError(f"{source}: {item} not found (looked for {tries[0].resolve()})")
        if path.is_dir():
            images += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        else:  # a list of image paths, relative to the list's folder
            images += [path.parent / line for line in path.read_text().split()]
    return images


def read_yolo(source, root):
    """A data.yaml (or, without one, a folder holding classes.txt or obj.names) -> Annotations."""
    if source.suffix in (".yaml", ".yml"):
        try:
            spec = yaml.safe_load(source.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{source} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(spec, dict) or "train" not in spec:
            raise UserError(f"{source} is not a YOLO data.yaml: it has no `train` key")
        bases = [root / spec["path"], root] if spec.get("path") else [root]
        entries = {SPLIT_WORDS[key]: spec[key] for key in ("train", "val", "test") if spec.get(key)}
        layout = f"YOLO dataset ({source.name})"
    else:  # LabelImg, CVAT's YOLO 1.1: txt files beside the images, a file of class names, no yaml
        spec, bases = {}, [root]
        folders = [p for p in [*root.iterdir(), *root.glob("images/*")] if p.is_dir()]
        entries = {split_named(p.name): str(p) for p in folders if split_named(p.name)}
        entries = entries or {"train": str(root)}
        layout = f"YOLO dataset ({source.name}, no data.yaml)"
    classes = yolo_class_names(spec, root, source)
    rows, skipped, unlabelled = {}, [], 0
    for split, entry in entries.items():
        rows[split] = []
        for image in yolo_split_images(entry, bases, source.name):
            size = image_size(image)
            if size is None:
                why = "image files not found" if not image.exists() else "unreadable images"
                skipped.append((split, "image", why, image.name))
                continue
            label = yolo_label_path(image)
            if label.is_file():
                rows[split].append(image_row(image, *read_yolo_label(label, *size, len(classes),
                                                                     split, skipped)))
            else:
                rows[split].append(image_row(image, [], []))
                unlabelled += 1
    notes = [f"{unlabelled} images without a label file (no objects)"] if unlabelled else []
    return Annotations(layout, classes, rows, skipped, notes)


# COCO: one json per split, with `images`, `annotations` (bbox [x, y, width, height]) and
# `categories`, whose ids need not start at 0 nor follow each other.

def read_coco_json(path):
    try:
        coco = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        empty = not path.read_bytes().strip()
        raise UserError(f"{path} is {'empty' if empty else f'not valid JSON ({e})'}: export the "
                        "annotations from your labelling tool again") from None
    if not isinstance(coco, dict) or not {"images", "annotations", "categories"} <= set(coco):
        raise UserError(f"{path} is not a COCO annotation file: it needs `images`, `annotations` "
                        "and `categories`")
    return coco


def read_coco(files, root, bbox_format):
    """COCO json files -> Annotations. A file's split is named by the file or its folder (Roboflow's
    train/_annotations.coco.json, COCO's instances_val2017.json); else it is train."""
    cocos = {path: read_coco_json(path) for path in files}
    # classes: the categories that hold a box, in id order; Roboflow adds an unused parent category
    names = {c["id"]: str(c["name"]) for coco in cocos.values() for c in coco["categories"]}
    used = {a.get("category_id") for coco in cocos.values() for a in coco["annotations"]}
    classes = [names[i] for i in sorted(names) if i in used]
    unused = [names[i] for i in sorted(names) if i not in used]
    notes = [f"categories with no box left out: {', '.join(unused)}"] if unused else []
    index, rows, skipped, crowd = images_by_name(root), {}, [], 0
    for path, coco in cocos.items():
        # the file's name, or its folder's under --data (--data's own name names no split)
        inside = path.parent != root
        split = split_named(path.stem) or (inside and split_named(path.parent.name)) or "train"
        objects = {image["id"]: ([], []) for image in coco["images"]}
        for a in coco["annotations"]:
            box = a.get("bbox")
            if a.get("iscrowd"):
                crowd += 1
            elif a.get("image_id") not in objects:
                skipped.append((split, "box", "boxes of an image id not in `images`",
                                f"id {a.get('id')}"))
            elif a.get("category_id") not in names:
                skipped.append((split, "box", "category ids not in `categories`",
                                f"id {a.get('id')}"))
            elif not (isinstance(box, list) and len(box) == 4
                      and all(isinstance(v, (int, float)) for v in box)):
                skipped.append((split, "box", "bboxes that are not 4 numbers", f"id {a.get('id')}"))
            else:
                x, y, w, h = box
                objects[a["image_id"]][0].append([x, y, w, h] if bbox_format == "xyxy" else
                                                 [x, y, x + w, y + h])
                objects[a["image_id"]][1].append(classes.index(names[a["category_id"]]))
        rows.setdefault(split, [])
        for image in coco["images"]:
            name = str(image.get("file_name", ""))
            folders = [path.parent, path.parent / "images", root, root / "images"]
            found = find_image(name, folders, index)
            if found is None:
                skipped.append((split, "image", "image files not found (file_name)", name))
            else:
                rows[split].append(image_row(found, *objects[image["id"]]))
    if crowd:
        notes.append(f"{crowd} crowd boxes (iscrowd) left out")
    layout = f"COCO dataset ({files[0].name if len(files) == 1 else f'{len(files)} json files'})"
    return Annotations(layout, classes, rows, skipped, notes)


# Pascal VOC: one xml per image, <object><name> and <bndbox> in 1-based pixels, as LabelImg and
# CVAT write it; VOC's own Annotations/ + JPEGImages/ + ImageSets/Main/{train,val,test}.txt.

def voc_split_lists(annotations_folder):
    """VOC's ImageSets/Main lists beside Annotations/ -> {image id: split}, or {} without them."""
    if annotations_folder.name != "Annotations":
        return {}
    lists = annotations_folder.parent / "ImageSets" / "Main"
    names = {"train": "train", "val": "validation", "test": "test"}
    if not (lists / "train.txt").is_file() and (lists / "trainval.txt").is_file():
        names["trainval"] = "train"
    files = {split: lists / f"{name}.txt" for name, split in names.items()}
    return {image_id: split for split, file in files.items() if file.is_file()
            for image_id in file.read_text().split()}


def read_voc_xml(path):
    """One VOC xml -> (image file name, [(class name, [x1, y1, x2, y2] 0-based, difficult)], boxes
    without a <bndbox>), or None when it cannot be parsed."""
    try:
        annotation = ElementTree.parse(path).getroot()
    except ElementTree.ParseError:
        return None
    objects, broken = [], 0
    for obj in annotation.iter("object"):
        try:
            box = [float(obj.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
        except (AttributeError, TypeError, ValueError):
            broken += 1
            continue
        # pixels x_min..x_max counted from 1 cover [x_min - 1, x_max]
        box[0], box[1] = box[0] - 1, box[1] - 1
        name = str(obj.findtext("name", "")).strip()
        objects.append((name, box, obj.findtext("difficult") == "1"))
    return annotation.findtext("filename", path.stem).strip(), objects, broken


def read_voc(files, root):
    """VOC xml files -> Annotations; splits from ImageSets/Main, else folder names, else train."""
    index, found, skipped, difficult = images_by_name(root), [], [], 0
    lists = {folder: voc_split_lists(folder) for folder in {p.parent for p in files}}
    for path in files:
        if lists[path.parent]:
            split = lists[path.parent].get(path.stem)
            if split is None:
                continue  # VOC's lists say which images belong to the dataset
        else:
            parts = path.relative_to(root).parts[:-1]
            split = next((split_named(p) for p in parts if split_named(p)), "train")
        parsed = read_voc_xml(path)
        if parsed is None:
            skipped.append((split, "image", "xml files that cannot be parsed (empty?)", path.name))
            continue
        name, objects, broken = parsed
        skipped += [(split, "box", "objects without a <bndbox>", path.name)] * broken
        image = find_image(name, [path.parent, path.parent.parent / "JPEGImages"], index)
        if image is None:
            skipped.append((split, "image", "image files not found (<filename>)", name))
            continue
        difficult += sum(d for _, _, d in objects)
        found.append((split, image, objects))
    classes = sorted({name for _, _, objects in found for name, _, _ in objects})
    rows = {}
    for split, image, objects in found:
        rows.setdefault(split, []).append(image_row(image, [box for _, box, _ in objects],
                                                    [classes.index(n) for n, _, _ in objects]))
    notes = [f"{difficult} boxes marked difficult kept"] if difficult else []
    layout = "Pascal VOC dataset" + (" (ImageSets/Main)" if any(lists.values()) else "")
    return Annotations(layout, classes, rows, skipped, notes)


def yield_rows(rows):
    yield from rows


def annotations_to_splits(annotations, data):
    """Annotations -> {split: Dataset}. What was skipped is refused in one line where it is most of
    a split, else counted and named in one line per reason."""
    for split in dict.fromkeys(split for split, *_ in annotations.skipped):
        rows = annotations.rows.get(split, [])
        kept = {"image": len(rows), "box": sum(len(r["objects"]["bbox"]) for r in rows)}
        for level, n in kept.items():
            bad = [(why, where) for s, lvl, why, where in annotations.skipped
                   if (s, lvl) == (split, level)]
            if len(bad) > MOSTLY_BROKEN * (n + len(bad)):
                things = {"image": "images", "box": "boxes"}[level]
                raise UserError(f"{data}: {len(bad)} of the {n + len(bad)} {things} of its {split} "
                                f"split are broken ({bad[0][0]}: {bad[0][1]}, ...): fix the "
                                "annotations, or export them again")
    by_reason = {}
    for split, _, why, where in annotations.skipped:
        by_reason.setdefault(why, []).append(where)
    for why, wheres in by_reason.items():
        console.print(f"{data}: skipped {len(wheres)} {why}: {', '.join(wheres[:3])}"
                      f"{' ...' if len(wheres) > 3 else ''}", soft_wrap=True, markup=False)
    # datasets caches the rows under a hash of their content: a second run reads them back
    features = detection_features(annotations.classes)
    return {split: datasets.Dataset.from_generator(yield_rows, features=features,
                                                   gen_kwargs={"rows": rows})
            if rows else datasets.Dataset.from_list([], features=features)
            for split, rows in annotations.rows.items()}


# Hugging Face: a hub name, or a folder that datasets reads (parquet or arrow shards, an imagefolder
# with a metadata.jsonl, a save_to_disk folder), with `objects.bbox` and `objects.category` (or
# `categories`) as a ClassLabel, strings or integers.

HUB_TIMEOUT = 10  # seconds; through datasets, an unreachable hub costs ~25 s of retries, or minutes
GUESS_ROWS = 200  # rows whose boxes decide between xyxy and xywh when --bbox-format is auto


def objects_columns(objects):
    # datasets stores `objects` either as a dict of lists or as a list of dicts; the class is
    # `category` (fashionpedia) or `categories` (Hugging Face AutoTrain's layout)
    if isinstance(objects, dict):
        return objects["bbox"], objects.get("category", objects.get("categories"))
    return [o["bbox"] for o in objects], [o.get("category", o.get("categories")) for o in objects]


def category_feature(ds):
    """The class feature of a split as read (objects_columns' two layouts)."""
    objects = ds.features["objects"]
    objects = getattr(objects, "feature", objects)  # list of dicts -> the dict
    category = objects["category"] if "category" in objects else objects["categories"]
    return getattr(category, "feature", category)


def check_hub(name):
    """`name` is not a local folder, so it is a hub dataset: fail at once, in one line, if it cannot
    be had. With HF_HUB_OFFLINE=1, datasets looks in its local cache instead and answers at once."""
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"dataset folder not found: {name}")
    try:
        huggingface_hub.HfApi().dataset_info(name, timeout=HUB_TIMEOUT)
    except huggingface_hub.utils.RepositoryNotFoundError:  # .utils: where every version has it
        raise UserError(f"{name!r} is neither a local folder nor a dataset on the Hugging Face "
                        "hub") from None
    except Exception as e:
        raise UserError(f"cannot reach the Hugging Face hub for {name!r} ({type(e).__name__}): "
                        "point --data at a local folder, or use --data synthetic") from None


def guess_box_format(ds):
    """xyxy, unless the first rows' boxes are impossible as xyxy and possible as xywh."""
    rows = ds.select(range(min(len(ds), GUESS_ROWS)))
    rows = rows.cast_column("image", datasets.Image(decode=False))
    impossible, total = {"xyxy": 0, "xywh": 0}, 0
    for row in rows:
        try:
            width, height = upright_size(open_image(row["image"]))
        except UNREADABLE:
            continue
        boxes = torch.tensor(objects_columns(row["objects"])[0], dtype=torch.float32).reshape(-1, 4)
        total += len(boxes)
        impossible["xyxy"] += impossible_boxes(boxes, width, height)
        impossible["xywh"] += impossible_boxes(box_convert(boxes, "xywh", "xyxy"), width, height)
    return "xywh" if impossible["xyxy"] > IMPOSSIBLE_SHARE * total >= impossible["xywh"] else "xyxy"


def hugging_face_classes(splits):
    """From the ClassLabel; else the sorted names of the train split's categories; integer
    categories without names are named by their number."""
    train = splits.get("train", next(iter(splits.values())))
    feature = category_feature(train)
    if isinstance(feature, datasets.ClassLabel):
        return feature.names
    if getattr(feature, "dtype", None) == "string":
        return sorted({c for objects in train["objects"] for c in objects_columns(objects)[1]})
    numbers = [c for ds in splits.values() for objects in ds["objects"]
               for c in objects_columns(objects)[1]]
    return [str(i) for i in range(int(max(numbers, default=0)) + 1)]


def to_detection_schema(ds, classes, bbox_format, name):
    # Data already in the schema (fashionpedia, BCCD) passes through: no copy of its images.
    feature = category_feature(ds)
    strings = getattr(feature, "dtype", None) == "string"
    objects = ds.features["objects"]  # the schema's: a dict of lists, `category` a ClassLabel
    in_schema = isinstance(objects, dict) and "category" in objects and isinstance(
        feature, datasets.ClassLabel)
    if bbox_format == "xyxy" and in_schema:
        return ds

    def convert(objects_batch):
        out = []
        for objects in objects_batch:
            boxes, cats = objects_columns(objects)
            if bbox_format == "xywh":
                boxes = [[x, y, x + w, y + h] for x, y, w, h in boxes]
            unknown = set(cats) - set(classes) if strings else set()
            if unknown:
                raise UserError(f"{name}: categories {sorted(unknown)} are not in the class list "
                                f"{classes} (the train split's categories)")
            cats = [classes.index(c) for c in cats] if strings else cats
            out.append({"bbox": boxes, "category": cats})
        return {"objects": out}

    features = datasets.Features({**ds.features, **detection_features(classes)})
    return ds.map(convert, input_columns="objects", batched=True, features=features)


def saved_by_datasets(folder):
    # what Dataset.save_to_disk writes; datasets.load_dataset does not read it, load_from_disk does
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def read_hugging_face(data, path, bbox_format):
    """-> {split: Dataset} (in the schema; images only where there are no boxes), layout, notes."""
    if not path.exists():
        check_hub(data)
    try:
        if saved_by_datasets(path):
            splits = datasets.load_from_disk(str(path))
        else:
            splits = datasets.load_dataset(str(path) if path.exists() else data)
    except Exception as e:
        empty = re.search(r'Instruction "(\w+)" corresponds to no data', str(e))  # datasets' words
        if empty:
            raise UserError(f"split {empty[1]!r} of {data!r} is empty") from None
        if path.exists():
            raise UserError(f"no dataset found in {data}; looked for {LAYOUTS}") from None
        raise UserError(f"cannot load {data!r}: {str(e).splitlines()[0]} (offline? point --data at "
                        "a local folder, or use --data synthetic)") from None
    splits = {"train": splits} if isinstance(splits, datasets.Dataset) else dict(splits)
    splits = {SPLIT_WORDS.get(name, name): ds for name, ds in splits.items()}
    first = next(iter(splits.values()))
    kind = "hub dataset" if not path.exists() else f"dataset ({first.info.builder_name or 'saved'})"
    if "image" not in first.features:
        raise UserError(f"{data}: a Hugging Face {kind} without an `image` column (it has: "
                        f"{', '.join(first.features)}); looked for {LAYOUTS}")
    if "objects" not in first.features:
        return splits, f"Hugging Face {kind} with images only (no `objects` column)", []
    classes = hugging_face_classes(splits)
    chosen = guess_box_format(splits.get("train", first)) if bbox_format == "auto" else bbox_format
    splits = {split: to_detection_schema(ds, classes, chosen, f"{data} {split}")
              for split, ds in splits.items()}
    note = f"boxes read as {chosen} ({'auto' if bbox_format == 'auto' else '--bbox-format'})"
    return splits, f"Hugging Face {kind}: {len(classes)} classes", [note]


# -----------------------------------------------------------------------------
# Loading: --data -> datasets in the one schema, split by split.

def find_annotations(path, bbox_format):
    """Which labelling tool's layout `path` (a file or a folder) is in, read; None for data that
    datasets reads itself."""
    if path.is_file():
        if path.suffix in (".yaml", ".yml"):
            return read_yolo(path, path.parent)
        if path.suffix == ".json":  # COCO's annotations/ folder sits beside its image folders
            return read_coco([path], path.parent.parent if path.parent.name == "annotations" else
                             path.parent, bbox_format)
        return None
    if saved_by_datasets(path):
        return None
    yamls = sorted([*path.glob("*.yaml"), *path.glob("*.yml")], key=lambda p: p.stem != "data")
    if yamls:
        return read_yolo(yamls[0], path)
    jsons = sorted([*path.glob("*.json"), *path.glob("*/*.json")])
    if any(p.name.startswith("instances_") for p in jsons):  # COCO's own: not captions_, keypoints_
        jsons = [p for p in jsons if p.name.startswith("instances_")]
    if jsons:
        return read_coco(jsons, path, bbox_format)
    xmls = sorted(path.rglob("*.xml"))
    if xmls:
        return read_voc(xmls, path)
    names = names_file(path)
    return read_yolo(names, path) if names else None


VALIDATION_FRACTION = 0.15           # carved from train when a dataset has no validation split


@lru_cache(maxsize=None)
def read_dataset(data, bbox_format, path):
    """--data (a folder or file in any layout above, or a hub name) -> {split: Dataset}, said in one
    line; a missing validation split is a seeded share of train. Read once per process and path."""
    annotations = find_annotations(path, bbox_format) if path.exists() else None
    if annotations:
        splits = annotations_to_splits(annotations, data)
        layout = f"{annotations.layout}: {len(annotations.classes)} classes"
        notes = annotations.notes
    else:
        splits, layout, notes = read_hugging_face(data, path, bbox_format)
    carved = "validation" not in splits and len(splits.get("train", [])) > 1
    if carved:
        carve = splits["train"].train_test_split(VALIDATION_FRACTION, seed=SPLIT_SEED)
        splits["train"], splits["validation"] = carve["train"], carve["test"]
    order = ["train", "validation", "test"]
    splits = dict(sorted(splits.items(), key=lambda s: order.index(s[0]) if s[0] in order else 3))
    counts = ", ".join(f"{split} {len(ds)}" + (f" (a seeded {VALIDATION_FRACTION:.0%} of train)"
                                               if carved and split == "validation" else "")
                       for split, ds in splits.items())
    console.print(f"{layout}; images: {counts}" + "".join(f"; {note}" for note in notes),
                  soft_wrap=True, markup=False)
    return splits


def load_split(data, split, bbox_format="auto", labels=True):
    """--data's split (train, validation or val, test) -> a datasets.Dataset in the one schema,
    checked: it exists, has images, and has boxes unless labels=False (LTD takes any images)."""
    if bbox_format not in ("auto", "xyxy", "xywh"):  # refused whatever the data
        raise UserError(f"--bbox-format must be auto, xyxy or xywh, not {bbox_format!r}")
    split = SPLIT_WORDS.get(split, split)
    if data == "synthetic":
        if split not in SYNTHETIC_SPLITS:
            raise UserError(f"synthetic has no split {split!r}; it has: "
                            f"{', '.join(SYNTHETIC_SPLITS)}")
        return synthetic_split(split)
    splits = read_dataset(data, bbox_format, Path(data).expanduser().resolve())
    if split not in splits:
        raise UserError(f"{data!r} has no split {split!r}; it has: {', '.join(splits)}")
    if len(splits[split]) == 0:
        raise UserError(f"split {split!r} of {data!r} is empty")
    if labels and "objects" not in splits[split].features:
        raise UserError(f"{data}: images but no boxes; looked for {LAYOUTS}")
    return splits[split]


# -----------------------------------------------------------------------------
# Safe training: nothing is lost. fit runs train_step epoch after epoch, validates, and writes
# best.pt and last.pt atomically; last.pt holds the optimizer, the place in the epoch and the
# random state, so --resume goes on exactly. A NaN step is skipped, Ctrl-C stops at a step's end,
# and under torchrun every process takes the same decisions. bf16 autocast where the hardware has
# bf16.

NONFINITE_LIMIT = 5  # steps in a row with a NaN or inf loss before training gives up
WORKERS_ON_CPU = 0  # loader processes when training on a CPU (measured: docs/scale.md)
# under torchrun, how long a process waits for the others: one machine's first process may be
# preparing a large dataset while the rest wait at a barrier (NCCL's default is 10 minutes)
PROCESS_TIMEOUT = datetime.timedelta(hours=2)
WORKERS_ON_GPU = 8  # at most, with a GPU: the cores but one
WORKERS_HELP = f"{WORKERS_ON_CPU} on a CPU; with a GPU the cores but one, at most {WORKERS_ON_GPU}"


def pick_device(name):
    """--device: auto (the GPU when torch sees one), cpu, cuda or cuda:N (or a torch.device)."""
    name = str(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, not {name!r}")
    if kind == "cuda" and int(index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}, but torch sees {torch.cuda.device_count()} GPUs here; "
                        "use --device cpu")
    return torch.device(name)


def write_atomically(path, write):
    """temp file + rename: a crash or a full disk mid-write never leaves a half-written best.pt,
    last.pt or model.onnx; the previous one stays as it was."""
    tmp = path.with_suffix(".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        kept = "the previous one is intact" if path.exists() else "nothing was written"
        raise UserError(f"cannot write {path} ({e.strerror or e}); {kept}") from None


def save_picture(image, path):
    """A PIL image -> path, in the format its suffix names. Pillow writes a picture in one call and
    misses a short write (a full disk): it is encoded in memory, then written by Python, which
    does not, atomically like a checkpoint."""
    encoded = io.BytesIO()
    image.save(encoded, PIL.Image.registered_extensions()[path.suffix.lower()])
    write_atomically(path, lambda tmp: tmp.write_bytes(encoded.getvalue()))


def save_checkpoint(path, checkpoint):
    write_atomically(path, lambda tmp: torch.save(checkpoint, tmp))


def max_over_processes(value):
    """Under torchrun: the largest `value` among the processes, so that all take the same
    branch."""
    if not dist.is_initialized():
        return value
    value = torch.tensor(float(value))
    dist.all_reduce(value, dist.ReduceOp.MAX)
    return value.item()


@dataclass
class RunState:
    """The place in a training run that last.pt records, so that --resume goes on exactly: the
    epoch, the shuffle's state when it began (None under torchrun), the step in it, its sums."""
    epoch: int
    order: torch.Tensor | None
    step: int = 0
    sums: dict = field(default_factory=dict)  # loss part -> sum over the images seen
    seen: int = 0
    collisions: int = 0
    skipped: int = 0
    bad_in_a_row: int = 0  # non-finite steps in a row, across epochs

    def count(self, parts, lost, learnt, images):
        """A train_step's result: its losses summed, or a skipped step counted (NONFINITE_LIMIT
        in a row stop the run)."""
        self.step += 1
        if not learnt:
            self.skipped, self.bad_in_a_row = self.skipped + 1, self.bad_in_a_row + 1
            if self.bad_in_a_row >= NONFINITE_LIMIT:
                raise FloatingPointError(f"the loss was NaN or inf for {NONFINITE_LIMIT} steps in "
                                         "a row")
            return
        self.bad_in_a_row, self.seen = 0, self.seen + images
        self.collisions += lost
        for name, value in parts.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.item() * images

    def losses(self):
        return {name: value / max(self.seen, 1) for name, value in self.sums.items()}


class Budget:
    """How much of the planned run is done, 0 to 1: by wall time with --time, else by steps."""

    def __init__(self, cfg, steps_per_epoch, done_steps=0, elapsed_s=0.0):
        self.minutes, self.total_steps = cfg.time, cfg.epochs * steps_per_epoch
        self.start, self.steps = time.time() - elapsed_s, done_steps

    def progress(self):
        if not self.minutes:
            return self.steps / self.total_steps
        # under torchrun every process must stop at the same step: the slowest clock decides
        return max_over_processes(min((time.time() - self.start) / (self.minutes * 60), 1.0))


class StopOnCtrlC:
    """While entered, Ctrl-C asks for a stop at the end of the current step (of training: last.pt
    then holds a state that --resume continues exactly; or a video's frame: its picture and its
    line both written); a second Ctrl-C stops at once."""

    def __init__(self, step="step"):
        self.step = step

    def __enter__(self):
        self.requested, self.previous = False, None
        # Python lets only the main thread handle signals
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self.request)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def request(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        console.print(f"Ctrl-C: stopping at the end of this {self.step} (press again to stop at "
                      "once)")


def append_row(path, row):
    """One row of a csv file under its header (written first if the file is new); a column the
    row lacks (an epoch that was not validated) stays empty."""
    new = not path.exists()
    fields = list(row) if new else path.read_text().splitlines()[0].split(",")
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerow(row)


def log_epoch(run_dir, state, elapsed, scalars, start=None):
    """A finished epoch: one row of results.csv (with where the run started, if said), one line on
    the console."""
    losses = {n: round(v, 5) for n, v in state.losses().items()}
    row = {"epoch": state.epoch, "elapsed_s": round(elapsed, 1), **losses,
           "collisions": state.collisions, "skipped_steps": state.skipped, **scalars,
           **({"start": start} if start else {})}
    append_row(run_dir / "results.csv", row)
    lost, skipped = state.collisions, state.skipped
    console.print(f"epoch {state.epoch}: " + (" ".join(f"{n} {v:.3f}" for n, v in scalars.items())
                                               or "not validated (--val-every)")
                  + (f" | {lost} boxes lost to shared cells" if lost else "")
                  + (f" | {skipped} steps skipped: loss NaN or inf" if skipped else ""))


def out_of_patience(cfg, best, epoch):
    """--patience N: the N validations before `epoch` found no better model. (Under torchrun only
    rank 0 validates: its answer is everyone's; the others may hold a resumed run's old `best`.)"""
    main = not dist.is_initialized() or dist.get_rank() == 0
    waited = (epoch - 1 - best["epoch"]) // cfg.val_every if best and main else 0
    return bool(max_over_processes(cfg.patience and waited >= cfg.patience))


def train_epoch(model, loader, optimizer, compute_loss, cfg, bf16, state, budget, ctrl_c, title):
    """train_step over `loader` (the epoch from state.step on), under a progress bar -> whether
    Ctrl-C (in any process) asked for a stop. Ends early when the planned run is done."""
    model.train()  # validation left it in eval mode
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    start, seen = time.time(), state.seen
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(title, total=state.step + len(loader), completed=state.step, info="")
        for images, targets in loader:
            lr = learning_rate(cfg, budget.progress())
            state.count(*train_step(model, optimizer, images, targets, compute_loss, lr, bf16),
                        images=len(targets))
            budget.steps += 1
            losses = " ".join(f"{n} {v:.3f}" for n, v in state.losses().items())
            speed = (state.seen - seen) / (time.time() - start)
            bar.update(task, advance=1, info=f"{losses} | {speed:.1f} img/s")
            if budget.progress() >= 1:
                return False
            if max_over_processes(ctrl_c.requested):
                return True
    return False


def fit(model, data, batches, compute_loss, validate, cfg, bf16, run_dir, meta, best_metric,
        workers, resume=None):
    """Train `model` on `data` in `batches` (a BatchSampler of a seeded RandomSampler, or of a
    DistributedSampler under torchrun) with train_step, loaded by `workers` processes (None:
    default_workers; a resumed epoch is cut exactly as before, from the shuffle's saved state);
    after each epoch `validate(model)`. Writes last.pt (with what --resume needs), best.pt (highest
    `best_metric`) and results.csv to run_dir; returns the best metrics. `resume`: a last.pt's
    "resume" entry, to go on with that run. Under torchrun `model` is in DistributedDataParallel;
    every process validates (its share), rank 0 writes."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    inner = getattr(model, "module", model)  # the model inside DistributedDataParallel
    device = next(inner.parameters()).device
    workers = default_workers(device) if workers is None else workers
    main = not dist.is_initialized() or dist.get_rank() == 0
    sampler = batches.sampler
    distributed = isinstance(sampler, DistributedSampler)  # it shuffles by seed and epoch itself
    shuffle_state = (lambda: None) if distributed else sampler.generator.get_state
    state, budget, best, shown = RunState(1, shuffle_state()), Budget(cfg, len(batches)), None, ""
    if resume:
        optimizer.load_state_dict(resume["optimizer"])
        state, best = RunState(**resume["run"]), resume["best"]
        # a --time budget goes on where it stopped
        budget = Budget(cfg, len(batches), resume["steps"], resume["elapsed_s"])
        torch.set_rng_state(resume["rng"])
        console.print(f"resuming {run_dir} at epoch {state.epoch}, step {state.step} of "
                      f"{len(batches)}")

    def checkpoint(metrics, resumable=True):
        saved = {**meta, "model": inner.state_dict(), "config": asdict(cfg),
                 "epoch": state.epoch - 1, "metrics": metrics}  # the last finished epoch
        # best.pt is for using the model; last.pt is for going on with training
        if resumable:
            saved["resume"] = {"optimizer": optimizer.state_dict(), "run": asdict(state),
                               "best": best, "steps": budget.steps, "rng": torch.get_rng_state(),
                               "elapsed_s": time.time() - budget.start}
        return saved

    command = f"odscratch {'pretrain' if meta['kind'] == 'ltd' else 'train'} --resume"
    command = f"{command} {run_dir}/last.pt"

    def what_is_saved():
        if not (run_dir / "last.pt").exists():
            return "no epoch had finished, so nothing was saved"
        return f"{run_dir}/last.pt holds the last finished epoch; continue from it with: {command}"

    stalled = False  # --patience ran out
    try:
        with StopOnCtrlC() as ctrl_c:
            while budget.progress() < 1:
                stalled = out_of_patience(cfg, best, state.epoch)
                if stalled:
                    break
                if distributed:  # a new shuffle each epoch, the same in every process
                    sampler.set_epoch(state.epoch)
                else:  # drawn afresh from the epoch's start state
                    sampler.generator.set_state(state.order)
                epoch_batches = list(batches)  # this epoch's batches of dataset indices
                data.epoch = state.epoch  # its augmentation
                loader = DataLoader(data, batch_sampler=epoch_batches[state.step:],
                                    num_workers=workers, collate_fn=collate,
                                    pin_memory=device.type == "cuda")
                stopped = train_epoch(model, loader, optimizer, compute_loss, cfg, bf16, state,
                                      budget, ctrl_c, f"epoch {state.epoch}{shown}")
                if stopped:
                    if main:
                        save_checkpoint(run_dir / "last.pt", checkpoint(best))
                    raise UserError(f"stopped in epoch {state.epoch} at step {state.step} "
                                    f"of {len(epoch_batches)}; continue exactly from there with: "
                                    f"{command}")
                finished = state
                state = RunState(finished.epoch + 1, shuffle_state(),
                                 bad_in_a_row=finished.bad_in_a_row)
                # after epoch 1, every --val-every-th and the last (budget.progress: every process)
                last = budget.progress() >= 1
                if finished.epoch == 1 or finished.epoch % cfg.val_every == 0 or last:
                    metrics = validate(inner)  # under torchrun: every process predicts a share
                else:
                    metrics = None
                if not main:
                    continue
                if metrics is None:
                    log_epoch(run_dir, finished, time.time() - budget.start, {}, meta.get("start"))
                    save_checkpoint(run_dir / "last.pt", checkpoint(best))
                    continue
                scalars = {n: round(v, 5) for n, v in metrics.items() if isinstance(v, float)}
                log_epoch(run_dir, finished, time.time() - budget.start, scalars,
                          meta.get("start"))
                shown = " | val " + " ".join(f"{n} {v:.2f}" for n, v in scalars.items())
                if best is None or metrics[best_metric] > best[best_metric]:
                    best = {**metrics, "epoch": finished.epoch}
                    save_checkpoint(run_dir / "best.pt", checkpoint(metrics, resumable=False))
                save_checkpoint(run_dir / "last.pt", checkpoint(metrics))
    except KeyboardInterrupt:
        interrupted = f"interrupted at once in epoch {state.epoch}"
        raise UserError(f"{interrupted}; {what_is_saved()}") from None
    except FloatingPointError as e:
        raise UserError(f"{e} in epoch {state.epoch}: stopped (try a lower --lr, or check the "
                        f"data's boxes); {what_is_saved()}") from None
    if stalled and main:
        name = {"map": "mAP50-95"}.get(best_metric, best_metric)
        console.print(f"stopped after epoch {state.epoch - 1}: no better validation {name} in "
                      f"{cfg.patience} epochs (--patience); the best is epoch {best['epoch']}")
    return best


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)


def new_run_dir(command, name):
    """runs/<command>/<name>, or <name>2, <name>3, ... : an earlier run is never overwritten."""
    for i in range(1, 10_000):
        path = Path("runs") / command / (name if i == 1 else f"{name}{i}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise UserError(f"runs/{command}/ has too many runs named {name!r}; pass --name")


def check_grid(cfg):
    if cfg.stride not in BACKBONE_CHANNELS:
        raise UserError(f"--stride must be one of {sorted(BACKBONE_CHANNELS)}, not {cfg.stride}")
    if cfg.img_size % cfg.stride:
        raise UserError(f"--img-size {cfg.img_size} is not a multiple of --stride {cfg.stride}")
    if cfg.assign_radius < 0.5:
        raise UserError("--assign-radius must be at least 0.5 (the cell a box's centre falls "
                        f"in), not {cfg.assign_radius}")
    if cfg.dfl_bins and cfg.dfl_bins < 4:
        raise UserError(f"--dfl-bins must be 0 (boxes as 4 numbers) or at least 4, not "
                        f"{cfg.dfl_bins}")


# what a checkpoint written before each option trained with
BEFORE_THEIR_OPTION = {"assign_radius": 0.5, "iou_targets": False, "dfl_bins": 0}
CHECKPOINT_KINDS = {
    "detector": "a detector (`odscratch train` writes it)",
    "ltd": "a whole LTD network (`odscratch pretrain`'s best.pt / last.pt)",
    "backbone": "a pretrained backbone (`odscratch pretrain` writes it as backbone.pt)"}


def read_checkpoint(path, kind, resumable=False):
    """Any file -> the checkpoint dict, if it is an odscratch checkpoint of `kind` (with the state
    that --resume needs, if resumable); else one clear error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint file not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not an odscratch checkpoint ({type(e).__name__})") from None
    found = checkpoint.get("kind") if isinstance(checkpoint, dict) else None
    if found not in CHECKPOINT_KINDS:
        raise UserError(f"{path} is not an odscratch checkpoint; expected {CHECKPOINT_KINDS[kind]}")
    if found != kind:
        raise UserError(f"{path} holds {CHECKPOINT_KINDS[found]}, but this needs "
                        f"{CHECKPOINT_KINDS[kind]}")
    if resumable and "resume" not in checkpoint:
        raise UserError(f"{path} holds no training state (a best.pt?): resume from the run's "
                        "last.pt")
    if "config" in checkpoint:  # settings added since, as checkpoints before them trained
        checkpoint["config"] = {**BEFORE_THEIR_OPTION, **checkpoint["config"]}
    return checkpoint


def check_same_classes(model_classes, data_classes, path, data):
    if model_classes != data_classes:
        raise UserError(f"{path} was trained on the classes {model_classes}, but {data} has "
                        f"{data_classes}")


def load_backbone(path, stride):
    """backbone.pt -> the ResNet-18 weights for a detector with this stride."""
    checkpoint = read_checkpoint(path, "backbone")
    if checkpoint["stride"] != stride:
        was = checkpoint["stride"]
        raise UserError(f"{path} was pretrained with --stride {was}, but this run uses --stride "
                        f"{stride}: pass --stride {was}, or pretrain with --stride {stride}")
    return checkpoint["backbone"]


def load_start(path, stride):
    """A detector's checkpoint to fine-tune from (`train --weights`), refused in one line when it
    is not a detector or was trained on another grid."""
    checkpoint = read_checkpoint(path, "detector")
    if checkpoint["config"]["stride"] != stride:
        was = checkpoint["config"]["stride"]
        raise UserError(f"{path} was trained with --stride {was}, but this run uses --stride "
                        f"{stride}: pass --stride {was} to fine-tune it")
    return checkpoint


def keep_shared_classes(model, checkpoint, classes):
    """A new detector takes a trained one's weights: all of them for the same class names; else all
    but the head's class rows, where the names both have are kept (matched by name, not by index)
    and the others keep their fresh start. -> the class names kept."""
    state, old = dict(checkpoint["model"]), checkpoint["classes"]
    shared = [name for name in classes if name in old]
    if old != classes:
        # the head's rows: the box's 4, one per class, background's last
        box = model.head.out_features - len(classes) - 1  # 4, or 4 edges x --dfl-bins

        def rows(names):
            return [*range(box), *(box + names.index(name) for name in shared), box + len(names)]

        for key in ("head.weight", "head.bias"):
            fresh = model.state_dict()[key].clone()
            fresh[rows(classes)] = state[key][rows(old)]
            state[key] = fresh
    model.load_state_dict(state)
    return shared


def default_workers(device):
    """--workers' default: processes that decode and augment the next batches while the model
    trains. A GPU needs them to keep busy; on a CPU they take cores from the model."""
    return min(cpu_cores() - 1, WORKERS_ON_GPU) if device.type == "cuda" else WORKERS_ON_CPU


def seeded_batches(data, cfg, processes=1):
    """Batches of dataset indices in an order that --seed fixes (under torchrun, each process's
    share of the shuffle)."""
    if len(data) < cfg.batch:
        raise UserError(f"the train split has {len(data)} images, fewer than --batch {cfg.batch}")
    if processes > 1:
        sampler = DistributedSampler(data, seed=cfg.seed, drop_last=True)
    else:
        generator = torch.Generator().manual_seed(cfg.seed)
        sampler = RandomSampler(data, generator=generator)
    return torch.utils.data.BatchSampler(sampler, cfg.batch // processes, drop_last=True)


@contextlib.contextmanager
def first_process_of_each_machine_first():
    """Under torchrun: each machine's first process converts and prepares the data (datasets'
    cache and the prepared images are per machine) while the others wait; then they read it.
    The first ones reach the barrier even when the data is refused, so the others fail alike."""
    first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if dist.is_initialized() and not first:
        dist.barrier()
    try:
        yield
    finally:
        if dist.is_initialized() and first:
            dist.barrier()


def read_on_rank_zero(read):
    """Under torchrun: rank 0 alone calls read() (only its machine has the run's files) and sends
    what it read, or the error it met, to every process."""
    if not dist.is_initialized():
        return read()
    sent = [None]
    if dist.get_rank() == 0:
        try:
            sent[0] = read()
        except UserError as e:
            sent[0] = e
    dist.broadcast_object_list(sent, src=0)
    if isinstance(sent[0], UserError):
        raise sent[0]
    return sent[0]


def load_best(model, run_dir, device):
    best = torch.load(run_dir / "best.pt", map_location=device, weights_only=True)
    model.load_state_dict(best["model"])


def start_run(cfg, resume, kind):
    """What train and pretrain do first: the last.pt to go on with, if any (its settings then
    replace cfg), the grid checked, the seed set, the device, bf16 or not, and under torchrun this
    process's rank and the number of processes."""
    checkpoint = read_on_rank_zero(lambda: read_checkpoint(resume, kind, resumable=True)
                                   if resume else None)
    cfg = RunConfig(**checkpoint["config"]) if checkpoint else cfg
    check_grid(cfg)
    seed_everything(cfg.seed)
    device, rank, processes = pick_device(cfg.device), 0, 1
    # torchrun: one process per GPU (or per share of the CPU); --batch is shared out
    if dist.is_initialized():
        rank, processes = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        if cfg.batch % processes:
            raise UserError(f"--batch {cfg.batch} does not split evenly over {processes} "
                            "processes")
    return checkpoint, cfg, device, use_bf16(device, cfg.fp32), rank, processes


def train_detector(cfg, name, backbone=None, resume=None, weights=None, workers=None):
    """Train a detector in runs/train/<name>, from random weights, a pretrained backbone, or a
    trained detector's weights (fine-tuning: a new run); or, with resume = a last.pt, go on with
    that run exactly where it stopped, in its folder, with its settings and weights (cfg, backbone
    and weights are then ignored)."""
    checkpoint, cfg, device, bf16, rank, processes = start_run(cfg, resume, "detector")
    if checkpoint and "conf" not in (checkpoint["resume"]["best"] or {"conf": None}):
        raise UserError(f"{resume} was written by an older odscratch, whose runs this one "
                        f"cannot go on with: fine-tune its model instead (--weights "
                        f"{Path(resume).parent}/best.pt)")
    backbone, weights = (None, None) if checkpoint else (backbone, weights)
    # a wrong backbone or detector file fails before any work
    pretrained = load_backbone(backbone, cfg.stride) if backbone else None
    start = load_start(weights, cfg.stride) if weights else None
    if start:  # fine-tuning keeps the trained model's kind of boxes
        cfg = replace(cfg, dfl_bins=start["config"]["dfl_bins"])
    with first_process_of_each_machine_first():
        train_ds = load_split(cfg.data, "train", cfg.bbox_format)
        classes = class_names(train_ds)
        train_data = CheckedDataset(train_ds, cfg.img_size, train=True,
                                    name=f"{cfg.data} train", seed=cfg.seed)
        val_data = CheckedDataset(load_split(cfg.data, "validation", cfg.bbox_format),
                                  cfg.img_size, train=False, name=f"{cfg.data} validation")
    # rank 0 writes
    run_dir = Path(resume).parent if resume else new_run_dir("train", name) if rank == 0 else None
    where = f"{device}{f' x {processes} processes' if processes > 1 else ''}"
    console.print(f"training on {cfg.data}: {len(train_data)} train / {len(val_data)} validation "
                  f"images, classes {classes}, {where}, {'bf16' if bf16 else 'float32'} -> "
                  f"{run_dir}")
    batches = seeded_batches(train_data, cfg, processes)
    model = GridDetector(len(classes), cfg.stride, cfg.assign_radius, cfg.dfl_bins)
    if pretrained:
        model.backbone.load_state_dict(pretrained)
        console.print(f"backbone from {backbone}")
    if start:
        shared = keep_shared_classes(model, start, classes)
        kept = ("all its weights" if shared == classes == start["classes"] else
                f"its weights but the head's class rows, kept by name for {shared or 'none'}")
        console.print(f"fine-tuning from {weights}: {kept}", soft_wrap=True)
    if checkpoint:
        check_same_classes(checkpoint["classes"], classes, resume, cfg.data)
        model.load_state_dict(checkpoint["model"])
    model = model.to(device, memory_format=MEMORY_FORMAT)
    if processes > 1 and device.type == "cuda":
        # BatchNorm's statistics over the whole batch, not each GPU's few images
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if processes > 1:  # gradients are averaged across processes after each backward pass
        ids = [device] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def loss(outputs, targets):
        return detection_loss(*outputs, targets, cfg)

    # where the run started, kept in best.pt, last.pt and results.csv
    origin = (f"weights {weights}" if weights else f"backbone {backbone}" if backbone else
              "random init")
    meta = {"kind": "detector", "classes": classes,
            "start": checkpoint.get("start", "random init") if checkpoint else origin}
    def validate(model):
        """Each process predicts its share of the validation images; rank 0 scores them all."""
        for buffer in model.buffers() if processes > 1 else []:  # BatchNorm's statistics: rank 0's
            dist.broadcast(buffer, src=0)
        share = list(range(rank, len(val_data), processes))
        found = predict(model_network(model, bf16), val_data, cfg.batch, EVAL_CONF, NMS_IOU, share)
        if processes > 1:
            shares = [None] * processes
            dist.all_gather_object(shares, found)
            found = [None] * len(val_data)
            for r, part in enumerate(shares):
                found[r::processes] = part
        if rank == 0:
            return with_confidence(evaluate(found, val_data.targets, len(classes)))

    best = fit(model, train_data, batches, loss, validate, cfg, bf16, run_dir, meta, "map",
               workers, resume=checkpoint and checkpoint["resume"])
    if rank == 0:  # the pictures show the best epoch's model
        inner = getattr(model, "module", model)
        load_best(inner, run_dir, device)
        draw_validation_pictures(inner, val_data, classes, best, run_dir, bf16, cfg.batch)
    return run_dir, best, classes


def pretrain_backbone(cfg, name, mask_crop, resume=None, workers=None):
    """LTD pretraining in runs/pretrain/<name>: detection's loss and fit on LTDDataset's pairs;
    resume = a last.pt goes on with that run (as in train_detector)."""
    checkpoint, cfg, device, bf16, _, _ = start_run(cfg, resume, "ltd")
    mask_crop = checkpoint["mask_crop"] if checkpoint else mask_crop
    train_data, val_data = (LTDDataset(ltd_images(load_split(cfg.data, split, labels=False),
                                                  f"{cfg.data} {split}", cfg.img_size),
                                       cfg.img_size, mask_crop, seed)
                            for split, seed in [("train", cfg.seed),
                                                ("validation", LTD_HELD_OUT_SEED)])
    run_dir = Path(resume).parent if resume else new_run_dir("pretrain", name)
    console.print(f"LTD pretraining on {cfg.data}: {len(train_data)} train / {len(val_data)} "
                  f"held-out images{', crop hole greyed out' if mask_crop else ''}, {device}, "
                  f"{'bf16' if bf16 else 'float32'} -> {run_dir}")
    batches = seeded_batches(train_data, cfg)
    model = LTDNet(cfg.stride).to(device, memory_format=MEMORY_FORMAT)
    if checkpoint:
        model.load_state_dict(checkpoint["model"])

    def loss(outputs, targets):
        # LTD's loss as docs/ltd.md measured it: its detector's radius, one-hot targets
        return detection_loss(*outputs, targets, replace(
            cfg, assign_radius=model.detector.radius, iou_targets=False))

    best = fit(model, train_data, batches, loss,
               lambda m: validate_ltd(m, val_data, cfg.batch, bf16), cfg, bf16, run_dir,
               {"kind": "ltd", "mask_crop": mask_crop}, "iou",
               workers, resume=checkpoint and checkpoint["resume"])
    load_best(model, run_dir, device)
    save_checkpoint(run_dir / "backbone.pt", {
        "kind": "backbone", "stride": cfg.stride, "mask_crop": mask_crop, "config": asdict(cfg),
        "metrics": best, "backbone": model.detector.backbone.state_dict()})
    draw_ltd_samples(model, val_data, cfg.batch, bf16, run_dir / "ltd_samples.jpg")
    return run_dir, best


# -----------------------------------------------------------------------------
# Choosing the confidence: a model ships with one threshold. Training and `eval` pick the one with
# the best F1 on the validation split (at IoU 0.5, averaged over the classes, as Ultralytics picks
# it); best.pt keeps it, and detect and Detector use it unless told another. The confusion matrix
# at that threshold shows which classes the model mixes up, which objects it misses, and what it
# finds where there is nothing.


DETECT_CONF = 0.25  # a user's default: few, sure boxes


def f1_by_confidence(curves):
    """evaluate's pr_by_confidence -> F1 [K', 101] at each of CONFIDENCES, for the K' classes with
    ground truth."""
    curves = [curve for curve in curves if curve]
    precision, recall = (np.array([c[i] for c in curves]).reshape(-1, len(CONFIDENCES))
                         for i in (0, 1))
    return 2 * precision * recall / np.maximum(precision + recall, 1e-9)


def with_confidence(metrics):
    """evaluate's metrics + conf: the threshold whose F1, averaged over the classes, is highest
    (0.25 when nothing is found), that F1, and each class's precision and recall there (-1 for a
    class without ground truth)."""
    f1 = f1_by_confidence(metrics["pr_by_confidence"])
    mean_f1 = f1.mean(0) if len(f1) else np.zeros(len(CONFIDENCES))
    # of equal F1s the highest threshold: fewer chance boxes on new images
    best = len(mean_f1) - 1 - int(mean_f1[::-1].argmax()) if mean_f1.max() > 0 else None
    at = lambda values: -1.0 if best is None or not values else values[best]
    curves = metrics["pr_by_confidence"]
    # 0 would keep every cell: evaluation saw the detections above EVAL_CONF
    conf = DETECT_CONF if best is None else max(round(float(CONFIDENCES[best]), 2), EVAL_CONF)
    return {**metrics, "conf": conf, "f1": at(mean_f1.tolist()),
            "precision_per_class": [at(curve and curve[0]) for curve in curves],
            "recall_per_class": [at(curve and curve[1]) for curve in curves]}


def confusion_matrix(found, targets, num_classes, conf):
    """Detections scoring at least conf against the true boxes, at IoU 0.5 -> counts [K+1, K+1]:
    row = the true class, column = the predicted one; row K counts detections of nothing
    (background), column K true boxes no detection found. Each true box takes the free detection,
    of any class, that overlaps it most."""
    matrix = np.zeros((num_classes + 1, num_classes + 1), int)
    for pred, true in zip(found, targets):
        keep = pred["scores"] >= conf
        labels, true_labels = pred["labels"][keep].tolist(), true["labels"].tolist()
        ious = box_iou(true["boxes"], pred["boxes"][keep])  # [G, D]
        pairs = sorted(zip(*torch.nonzero(ious >= IOU_THRESHOLDS[0], as_tuple=True)),
                       key=lambda pair: -ious[pair].item())
        matched_true, matched_pred = set(), set()
        for g, d in ((int(g), int(d)) for g, d in pairs):
            if g not in matched_true and d not in matched_pred:
                matched_true.add(g), matched_pred.add(d)
                matrix[true_labels[g], labels[d]] += 1
        for g in set(range(len(true_labels))) - matched_true:
            matrix[true_labels[g], num_classes] += 1
        for d in set(range(len(labels))) - matched_pred:
            matrix[num_classes, labels[d]] += 1
    return matrix


# -----------------------------------------------------------------------------
# Pictures: what a learner and a user look at before any number. Detections with the true boxes,
# the objectness grid (how sure each cell is that it holds an object), loss and mAP curves,
# precision-recall and F1 curves, the confusion matrix. Pillow alone draws them.

BOX_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231",
               "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]
TILE = 256          # pixels per image side in a grid of pictures
PICTURE_IMAGES = 8  # validation images in val_pred.jpg and objectness.jpg


def draw_detections(image, found, classes, true_boxes=()):
    """Predicted boxes, coloured by class with a score tag; true boxes (if given) in thin white.
    (torchvision's draw_bounding_boxes fills a tag's background only from 0.23 on.)"""
    image = image.convert("RGB")
    draw = PIL.ImageDraw.Draw(image)
    for box in true_boxes:
        draw.rectangle(list(box), outline="white", width=1)
    boxes, scores, labels = (found[k].tolist() for k in ("boxes", "scores", "labels"))
    for box, score, label in zip(boxes, scores, labels):
        colour = BOX_COLOURS[label % len(BOX_COLOURS)]
        draw.rectangle(box, outline=colour, width=2)
        tag = f"{classes[label]} {score:.2f}"
        tag_box = draw.textbbox((box[0] + 2, box[1] + 1), tag)
        # a solid tag stays readable on any background
        draw.rectangle(tag_box, fill=colour)
        draw.text(tag_box[:2], tag, fill="white")
    return image


def objectness_grid(scores):
    """score_cells' class probabilities [B, h*w, K] -> objectness [B, h, w]: 1 - p(background)
    per cell."""
    side = math.isqrt(scores.shape[1])  # images are square, so is the grid
    return scores.sum(-1).reshape(-1, side, side)


def draw_objectness(image, objectness):
    """The image under a heat map, one square per cell: dark = background, yellow = an object."""
    heat = objectness.float().clamp(0, 1).numpy()                       # [h, w]
    red, green = np.clip(2 * heat, 0, 1), np.clip(2 * heat - 1, 0, 1)
    colours = np.stack([red, green, np.zeros_like(heat)], -1)
    overlay = PIL.Image.fromarray((colours * 255).astype(np.uint8))
    overlay = overlay.resize(image.size, PIL.Image.NEAREST)
    return PIL.Image.blend(image.convert("RGB"), overlay, 0.55)


EDGE_CELLS = 4      # detections per image whose edge distributions edges.jpg draws
EDGE_PEAK = 0.15    # of a tile's side: how tall a distance of probability 1 is drawn
EDGE_SHOWN = 0.05   # distances less likely than this are not drawn


def draw_edge_distributions(image, boxes, scores, edges):
    """One image's cells, as score_cells sees them (boxes [h*w, 4] xyxy relative, scores [h*w, K])
    with their edges' logits [h*w, 4, n] -> a tile showing, for the EDGE_CELLS surest detections,
    each cell's centre (a dot), its box, and across each edge that edge's distribution over the
    distances from the centre: a narrow peak is an edge the model is sure of, a wide or double one
    an edge it hesitates over."""
    # the image dimmed, so that the lines stand out
    image = PIL.Image.blend(image.convert("RGB").resize((TILE, TILE)),
                            PIL.Image.new("RGB", (TILE, TILE)), 0.5)
    draw = PIL.ImageDraw.Draw(image)
    best, labels = scores.max(-1)
    kept = batched_nms(boxes, best, labels, NMS_IOU)[:EDGE_CELLS]
    grid, n = math.isqrt(len(best)), edges.shape[-1]
    distances = edge_distances(n, "cpu") * TILE  # the same in x and y: the tile is square
    centres = cell_centres(grid, grid, "cpu") / grid * TILE
    for cell in kept[best[kept] > DETECT_CONF].tolist():
        colour = BOX_COLOURS[labels[cell] % len(BOX_COLOURS)]
        x1, y1, x2, y2 = (boxes[cell] * TILE).tolist()
        cx, cy = centres[cell].tolist()
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=1)
        draw.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill=colour)
        middle = ((x1 + x2) / 2, (y1 + y2) / 2)
        # left, top, right, bottom: where each distance puts the edge, and its probability's height
        for side, p in enumerate(edges[cell].float().softmax(-1)):
            likely = (p >= EDGE_SHOWN).nonzero()[:, 0]  # and a distance either side: a peak
            shown = torch.arange(max(likely[0] - 1, 0), min(likely[-1] + 2, n))
            along = [cx, cy][side % 2] + (-1 if side < 2 else 1) * distances[shown]
            across = middle[1 - side % 2] - p[shown] * EDGE_PEAK * TILE
            points = zip(along, across) if side % 2 == 0 else zip(across, along)
            draw.line([(float(u), float(v)) for u, v in points], fill=colour, width=2)
    return image


def tile_images(images, columns=4):
    """Pictures -> one grid of TILE x TILE tiles, white where the last row is short."""
    tiles = [v2.functional.pil_to_tensor(image.resize((TILE, TILE))) for image in images]
    return v2.functional.to_pil_image(make_grid(tiles, nrow=columns, padding=0, pad_value=255))


def plot_lines(title, lines, x, y_range=None, size=(320, 220)):
    """One chart: {label: [y per x]} as coloured lines, the axis range written at the corners."""
    image = PIL.Image.new("RGB", size, "white")
    draw = PIL.ImageDraw.Draw(image)
    left, top, right, bottom = 40, 22, size[0] - 10, size[1] - 22
    values = [v for ys in lines.values() for v in ys]
    low, high = y_range or (min(values), max(values))
    high = high if high > low else low + 1
    draw.rectangle((left, top, right, bottom), outline="grey")
    draw.text((left, 4), title, fill="black")
    draw.text((2, top), f"{high:.2f}", fill="grey")
    draw.text((2, bottom - 10), f"{low:.2f}", fill="grey")
    draw.text((left, bottom + 4), f"{x[0]:g}", fill="grey")
    draw.text((right - 24, bottom + 4), f"{x[-1]:g}", fill="grey")
    for i, (label, ys) in enumerate(lines.items()):
        colour = BOX_COLOURS[i % len(BOX_COLOURS)]
        span = (x[-1] - x[0]) or 1
        points = [(left + (right - left) * (xi - x[0]) / span,
                   bottom - (bottom - top) * (y - low) / (high - low)) for xi, y in zip(x, ys)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        else:  # one epoch: a dot
            px, py = points[0]
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colour)
        if len(lines) > 1:
            draw.text((right - 110, top + 4 + 12 * i), label, fill=colour)
    return image


def plot_results(results_csv, path):
    """results.csv -> results.png: each loss part and the validation mAPs, per epoch."""
    with open(results_csv) as f:
        rows = list(csv.DictReader(f))
    epochs = [int(row["epoch"]) for row in rows]
    charts = [plot_lines(name, {name: [float(row[name]) for row in rows]}, epochs)
              for name in ["loss", "cls", "box", "giou"]]
    validated = [row for row in rows if row["map"]]  # --val-every leaves epochs out
    charts += [plot_lines(f"validation {name}", {name: [float(row[key]) for row in validated]},
                          [int(row["epoch"]) for row in validated], (0, 1))
               for name, key in [("mAP50", "map50"), ("mAP50-95", "map")]]
    tiles = [v2.functional.pil_to_tensor(chart) for chart in charts]
    save_picture(v2.functional.to_pil_image(make_grid(tiles, nrow=3, padding=0)), path)


def plot_pr_curves(metrics, classes, path):
    """pr_curve.png: precision against recall at IoU 0.5, one line per class, AP50 in the legend."""
    lines = {f"{name} {ap:.3f}": curve for name, ap, curve in
             zip(classes, metrics["ap50_per_class"], metrics["pr50_per_class"]) if curve}
    chart = plot_lines("precision vs recall, IoU 0.5", lines, RECALL_POINTS.tolist(), (0, 1),
                       size=(480, 360))
    save_picture(chart, path)


def plot_f1_curves(metrics, classes, path):
    """f1_curve.png: F1 against the confidence threshold, one line per class and their mean."""
    f1 = f1_by_confidence(metrics["pr_by_confidence"])
    named = [name for name, curve in zip(classes, metrics["pr_by_confidence"]) if curve]
    lines = {name: curve.tolist() for name, curve in zip(named, f1)}
    if len(f1):
        lines[f"all {metrics['f1']:.2f} at {metrics['conf']:.2f}"] = f1.mean(0).tolist()
    save_picture(plot_lines("F1 vs confidence, IoU 0.5", lines, CONFIDENCES.tolist(), (0, 1),
                            size=(480, 360)), path)


CELL = 48  # pixels per cell of the confusion matrix


def draw_confusion_matrix(matrix, classes, conf, path):
    """confusion_matrix.png: the counts, and each row divided by its sum (where the true boxes of a
    class went), side by side; darker is more."""
    names = [*classes, "background"]
    side, margin = len(names) * CELL, 96
    shares = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    panels = []
    for title, values, fmt in [("counts", matrix, "{:d}"), ("row-normalised", shares, "{:.2f}")]:
        panel = PIL.Image.new("RGB", (margin + side + 8, margin + side + 8), "white")
        draw = PIL.ImageDraw.Draw(panel)
        draw.text((4, 4), f"{title}, confidence {conf:.2f}, IoU 0.5", fill="black")
        draw.text((4, 20), "rows: true class; columns: predicted", fill="grey")
        for i, name in enumerate(names):
            draw.text((4, margin + i * CELL + CELL // 2 - 6), name[:14], fill="black")
            draw.text((margin + i * CELL + 2, margin - 16), name[:7], fill="black")
        darkness = values / max(values.max(), 1e-9)
        for (i, j), value in np.ndenumerate(values):
            level = int(255 * (1 - 0.85 * darkness[i, j]))
            x, y = margin + j * CELL, margin + i * CELL
            draw.rectangle((x, y, x + CELL, y + CELL), fill=(level, level, 255), outline="grey")
            draw.text((x + 6, y + CELL // 2 - 6), fmt.format(value),
                      fill="black" if level > 140 else "white")
        panels.append(v2.functional.pil_to_tensor(panel))
    save_picture(v2.functional.to_pil_image(make_grid(panels, nrow=2, padding=0)), path)


def draw_confidence_pictures(found, data, metrics, classes, folder):
    """confusion_matrix.png at the chosen confidence, and f1_curve.png, in folder."""
    matrix = confusion_matrix(found, data.targets, len(classes), metrics["conf"])
    draw_confusion_matrix(matrix, classes, metrics["conf"], folder / "confusion_matrix.png")
    plot_f1_curves(metrics, classes, folder / "f1_curve.png")


@torch.no_grad()
def draw_validation_pictures(model, data, classes, metrics, run_dir, bf16, batch):
    """After training: val_pred.jpg, objectness.jpg, edges.jpg, pr_curve.png, results.png,
    f1_curve.png and confusion_matrix.png in run_dir."""
    draw_confidence_pictures(predict(model_network(model, bf16), data, batch, EVAL_CONF, NMS_IOU),
                             data, metrics, classes, run_dir)
    model.eval()
    n = min(PICTURE_IMAGES, len(data))
    images, _ = collate([data[i] for i in range(n)])
    outputs = run_model(model, images, bf16)
    boxes, scores = score_cells(*outputs[:2])
    originals = [upright(open_image(data.ds[i]["image"])) for i in range(n)]
    found = select_detections(boxes, scores, data.sizes[:n], DETECT_CONF, NMS_IOU)
    pictures = [draw_detections(image, f, classes, data.targets[i]["boxes"].tolist())
                for i, (image, f) in enumerate(zip(originals, found))]
    save_picture(tile_images(pictures), run_dir / "val_pred.jpg")
    grids = objectness_grid(scores.cpu())
    pictures = [draw_objectness(image, grid) for image, grid in zip(originals, grids)]
    save_picture(tile_images(pictures), run_dir / "objectness.jpg")
    if outputs[2] is not None:  # boxes as edge distributions (--dfl-bins)
        pictures = [draw_edge_distributions(image, *cells) for image, *cells in
                    zip(originals, boxes.cpu(), scores.cpu(), outputs[2].cpu())]
        save_picture(tile_images(pictures), run_dir / "edges.jpg")
    plot_pr_curves(metrics, classes, run_dir / "pr_curve.png")
    plot_results(run_dir / "results.csv", run_dir / "results.png")


LTD_SAMPLES = 8        # pairs drawn in ltd_samples.jpg


def draw_ltd_samples(model, data, batch, bf16, path):
    """A grid of held-out R images with S's true box (green) and the predicted one (red), S beside
    each with the IoU under it."""
    n = min(LTD_SAMPLES, len(data))
    predicted, true = locate_crops(model, Subset(data, range(n)), batch, bf16)
    pairs = [data[i][0] for i in range(n)]  # the same pairs locate_crops saw
    size, pad = data.img_size, 8
    tile = (size + LTD_CROP_SIZE + 2 * pad, max(size, LTD_CROP_SIZE + 16) + pad)
    grid = PIL.Image.new("RGB", (2 * tile[0], (n + 1) // 2 * tile[1]), "white")
    for i, ((R, S), p, t) in enumerate(zip(pairs, predicted, true)):
        x, y = i % 2 * tile[0], i // 2 * tile[1]
        image = v2.functional.to_pil_image(R)
        draw = PIL.ImageDraw.Draw(image)
        draw.rectangle(t.tolist(), outline="lime", width=2)
        draw.rectangle(p.tolist(), outline="red", width=2)
        grid.paste(image, (x, y))
        grid.paste(v2.functional.to_pil_image(S.clamp(0, 1)), (x + size + pad, y))
        iou = box_iou(p[None], t[None]).item()
        under_S = (x + size + pad, y + LTD_CROP_SIZE + 4)
        PIL.ImageDraw.Draw(grid).text(under_S, f"IoU {iou:.2f}", fill="black")
    save_picture(grid, path)


# -----------------------------------------------------------------------------
# Shipping: a trained model as a Python object (`Detector`, which `detect` uses too), as an ONNX
# file (`export`) that onnxruntime or another runtime can run, in float32 or int8 (`export --int8`),
# and how fast and how accurate each one is (`bench`). First what it reads: checkpoints and images
# here, then videos, cameras and streams, then photos larger than the model's input.


def inference_transform(img_size):
    """A PIL image -> what the network sees: [3, img_size, img_size] floats in [0, 1]."""
    return v2.Compose([resize_transform(img_size), v2.ToDtype(torch.float32, scale=True)])


def fold_batchnorm(model):
    """An inference copy of `model`: after training, a BatchNorm is a fixed per-channel scale and
    shift, so it folds into the weights of the convolution before it, and the network has half the
    layers to run."""
    model = copy.deepcopy(model).eval()
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (name, conv), (bn_name, bn) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(parent, name, torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn))
                setattr(parent, bn_name, nn.Identity())
    return model


def load_detector(path, device):
    """A best.pt -> the model for inference (BatchNorm folded), its RunConfig, class names."""
    checkpoint = read_checkpoint(path, "detector")
    cfg = RunConfig(**checkpoint["config"])
    model = GridDetector(len(checkpoint["classes"]), cfg.stride, cfg.assign_radius, cfg.dfl_bins)
    model.load_state_dict(checkpoint["model"])
    return fold_batchnorm(model).to(device, memory_format=MEMORY_FORMAT), cfg, checkpoint["classes"]


def stored_confidence(path):
    """The confidence threshold a best.pt was shipped with (the best F1 on its validation split);
    None for a model trained before odscratch chose one."""
    return read_checkpoint(path, "detector")["metrics"].get("conf")


def load_model_split(cfg, data, split):
    """A split of the model's own data, read with the box format it was trained with, or of other
    `data` (whose box format is its own: detected)."""
    own = data in (None, cfg.data)
    return load_split(data or cfg.data, split, cfg.bbox_format if own else "auto")


def read_image(path):
    try:
        return upright(PIL.Image.open(path))
    except FileNotFoundError:
        raise UserError(f"image not found: {path}") from None
    except (OSError, PIL.Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None


def image_from_pixels(pixels):
    """A frame from your own code -> a PIL image: a numpy array H x W x 3 of uint8 in RGB order
    (OpenCV's frames are BGR: pass frame[..., ::-1]), or a tensor 3 x H x W, uint8 or floats in
    [0, 1] (as torchvision reads images)."""
    if isinstance(pixels, torch.Tensor):
        if pixels.ndim != 3 or pixels.shape[0] != 3:
            raise UserError(f"an image tensor must be 3 x H x W; got {tuple(pixels.shape)}")
        if pixels.is_floating_point():
            pixels = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)
        pixels = pixels.permute(1, 2, 0).cpu().numpy()  # [H, W, 3]
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise UserError(f"an image array must be H x W x 3 uint8 (RGB); got shape "
                        f"{pixels.shape}, {pixels.dtype}")
    return PIL.Image.fromarray(np.ascontiguousarray(pixels))


def as_image(item):
    """What Detector takes, one image: a path, a PIL image, a numpy array or a tensor."""
    if isinstance(item, (str, Path)):
        return read_image(item)
    if isinstance(item, (np.ndarray, torch.Tensor)):
        return image_from_pixels(item)
    return upright(item)


# -----------------------------------------------------------------------------
# Video: files, cameras and streams, decoded and written by PyAV (FFmpeg's Python bindings, what
# torchvision reads video with). Measured against OpenCV (docs/shipping.md): the same decoding
# cost, and only PyAV's wheels write H.264, the video every player and browser plays.

VIDEO_SUFFIXES = {".mp4", ".m4v", ".avi", ".mov", ".mkv", ".webm"}
VIDEO_MISSING = "videos, cameras and streams need the video extra: pip install 'odscratch[video]'"
STREAM_TIMEOUT = 10.0  # seconds a camera or stream may stay silent before it counts as stopped
# a camera index -> FFmpeg's camera input on this system (Windows names its cameras instead)
CAMERAS = {"linux": ("v4l2", "/dev/video{}"), "darwin": ("avfoundation", "{}")}
FRAMES_AHEAD = 4  # frames decoded while the model works on the current one


def import_av():
    try:
        import av
    except ImportError:
        raise UserError(VIDEO_MISSING) from None
    return av


def is_camera_or_stream(source):
    return str(source).isdigit() or "://" in str(source)


class Video:
    """An open video file, camera or stream: its frame rate, its frame count (None for a live
    camera or stream, which has no end) and its frames, decoded by PyAV."""

    def __init__(self, source):
        av = import_av()
        self.source = source = str(source)
        if not is_camera_or_stream(source) and not Path(source).is_file():
            raise UserError(f"video not found: {source}")
        if source.isdigit() and sys.platform not in CAMERAS:
            raise UserError(f"camera {source}: on this system give the camera's name as FFmpeg "
                            "knows it (Windows: video=NAME), or a stream URL")
        try:
            if source.isdigit():
                input_format, device = CAMERAS[sys.platform]
                self.container = av.open(device.format(source), format=input_format,
                                         timeout=STREAM_TIMEOUT)
            else:
                self.container = av.open(source, timeout=STREAM_TIMEOUT)
        except av.FFmpegError as e:
            raise UserError(f"cannot open video {source}: {e.strerror}") from None
        streams = self.container.streams.video
        if not streams or streams[0].codec_context is None:
            self.container.close()
            raise UserError(f"cannot read video {source}: " + ("no video in it" if not streams
                            else "no decoder for its codec in this FFmpeg"))
        self.stream = streams[0]
        self.live = self.container.duration is None
        # a camera may not say its rate: 30 frames a second is what most record
        self.rate = self.stream.average_rate or self.stream.guessed_rate or Fraction(30)
        self.frames = None if self.live else self.stream.frames or round(
            self.container.duration / 1e6 * self.rate)
        if not self.live:  # FFmpeg decodes a file's frames on its own threads too
            self.stream.thread_type = "AUTO"

    def read(self, vid_stride=1):
        """(frame index, seconds, PIL image) of every vid_stride-th frame; closes the video."""
        av = import_av()
        index = -1
        try:
            with self.container:
                for index, frame in enumerate(self.container.decode(self.stream)):
                    if index % vid_stride == 0:
                        seconds = frame.time if frame.time is not None else index / self.rate
                        yield index, float(seconds), frame.to_image()
        except av.FFmpegError as e:
            raise UserError(f"{self.source} stopped after frame {index}: {e.strerror}") from None


def read_ahead(frames, live):
    """Iterate `frames` on a thread, FRAMES_AHEAD ahead of the caller, so that decoding overlaps
    the model. From a live camera or stream the oldest waiting frame is dropped when the model
    falls behind, so that results stay live; from a file every frame is kept."""
    waiting, stop, end = queue.Queue(FRAMES_AHEAD), threading.Event(), object()

    def put(item):
        while not stop.is_set():
            try:
                return waiting.put(item, timeout=0.1)
            except queue.Full:
                if live and item is not end:
                    with contextlib.suppress(queue.Empty):
                        waiting.get_nowait()

    def read():
        try:
            for item in frames:
                if stop.is_set():
                    break
                put(item)
            put(end)
        except Exception as e:  # the caller raises it
            put(e)
        finally:
            frames.close()

    threading.Thread(target=read, daemon=True).start()
    try:
        while (item := waiting.get()) is not end:
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        stop.set()


class VideoWriter:
    """Frames -> an H.264 .mp4 that ordinary players play; close() (also on Ctrl-C) finishes it."""

    def __init__(self, path, width, height, rate):
        av = import_av()
        self.container = av.open(str(path), "w")
        self.stream = self.container.add_stream("libx264", rate=rate,
                                                options={"preset": "veryfast"})
        # H.264's colour planes are half size: even sides (a frame is scaled to them)
        self.stream.width, self.stream.height = width - width % 2, height - height % 2
        self.stream.pix_fmt = "yuv420p"
        self.av, self.written, self.rate = av, 0, Fraction(rate)

    def write(self, image):
        frame = self.av.VideoFrame.from_image(image)
        frame.pts, frame.time_base = self.written, 1 / self.rate  # frame n at n / rate seconds
        self.container.mux(self.stream.encode(frame))
        self.written += 1

    def close(self):
        self.container.mux(self.stream.encode())  # the frames the encoder still holds
        self.container.close()


# -----------------------------------------------------------------------------
# Large photos: tiles of the model's input size, at the photo's own scale

DETECT_BATCH = 16  # images (or tiles) per forward pass in `detect`
TILE_OVERLAP = 0.25  # of a tile's side: an object up to this wide lies whole in some tile
TILE_EDGE = 2  # pixels: a box this close to a tile's inner edge is cut by it


def tile_corners(width, height, side):
    """Top-left corners of side x side tiles covering a width x height image, overlapping by
    TILE_OVERLAP of a side; the last row and column end at the image's far edges."""
    step = side - round(side * TILE_OVERLAP)

    def starts(length):
        last = max(length - side, 0)
        return sorted({*range(0, last + 1, step), last})

    return [(x, y) for y in starts(height) for x in starts(width)]


def uncut_by_tile(boxes, x, y, side, width, height):
    """boxes [N, 4] in a tile's pixels -> [N] bool: does the box keep clear of the tile's inner
    edges (those inside the image)? One that touches one is cut, and found whole elsewhere."""
    clear = torch.ones(len(boxes), dtype=torch.bool)
    if x > 0:
        clear &= boxes[:, 0] > TILE_EDGE
    if y > 0:
        clear &= boxes[:, 1] > TILE_EDGE
    if x + side < width:
        clear &= boxes[:, 2] < side - TILE_EDGE
    if y + side < height:
        clear &= boxes[:, 3] < side - TILE_EDGE
    return clear


# -----------------------------------------------------------------------------
# ONNX and int8: the model as one file other runtimes run, then `Detector`, which runs a best.pt or
# that file on images, frames, videos and tiles, and `bench`, which times each runtime.

class ScoredCells(nn.Module):
    """What `export` writes: GridDetector + score_cells, so an ONNX user gets boxes and class scores
    per cell, [B, h*w, 4] (x1, y1, x2, y2 relative to the image) and [B, h*w, K]; threshold + NMS
    are theirs."""

    def __init__(self, detector):
        super().__init__()
        self.detector = detector

    def forward(self, images):  # [B, 3, img_size, img_size] in [0, 1]
        return score_cells(*self.detector(images)[:2])


ONNX_MISSING = "this needs the onnx extra: pip install 'odscratch[onnx]'"


def onnx_installed():
    # torch.onnx's exporter is built on onnxscript; onnxruntime runs what it writes
    return all(importlib.util.find_spec(name) for name in ("onnxscript", "onnxruntime"))


def export_onnx(weights, path, img_size=None):
    """best.pt -> one self-contained model.onnx for any batch size, class names and img_size in its
    metadata."""
    model, cfg, classes = load_detector(weights, torch.device("cpu"))
    img_size = img_size or cfg.img_size
    check_grid(RunConfig(img_size=img_size, stride=cfg.stride))
    # a batch of 2: a batch of 1 would be fixed into the graph
    example = torch.rand(2, 3, img_size, img_size)
    model = ScoredCells(model.float().to(memory_format=torch.contiguous_format)).eval()
    program = torch.onnx.export(model, (example,),
                                input_names=["images"], output_names=["boxes", "scores"],
                                dynamic_shapes={"images": {0: "batch"}}, dynamo=True, verbose=False)
    conf = stored_confidence(weights)
    program.model.metadata_props.update({"classes": json.dumps(classes), "img_size": str(img_size),
                                         "stride": str(cfg.stride),
                                         **({"conf": str(conf)} if conf is not None else {})})
    write_atomically(path, lambda tmp: program.save(tmp, external_data=False))
    return path


CALIBRATION_IMAGES = 200  # training images whose activations set the int8 ranges


def calibration_images(cfg, data, img_size):
    """CALIBRATION_IMAGES training images, drawn with the model's seed, of the model's own data
    (or of `data`), resized as the model sees them: what quantize_onnx calibrates on."""
    train = load_model_split(cfg, data, "train")
    sample = train.shuffle(seed=cfg.seed).select(range(min(CALIBRATION_IMAGES, len(train))))
    return CheckedDataset(sample, img_size, train=False, name="calibration images")


def quantize_onnx(path, int8_path, calibration):
    """model.onnx -> model_int8.onnx: onnxruntime's static int8 quantisation (QDQ, per-channel
    int8 weights in 7 bits, uint8 activations; the head and what follows it stay float), calibrated
    on a DetectionDataset's images. Why each choice: docs/shipping.md, Ship on a CPU."""
    import onnx
    from onnxruntime import quantization as q

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # shapes inferred and the graph tidied, as onnxruntime's quantiser asks
        q.quant_pre_process(str(path), str(prepared))
        nodes = onnx.load(prepared).graph.node
        head = next(i for i, node in enumerate(nodes) if node.op_type == "MatMul")  # linear head

        class Calibration(q.CalibrationDataReader):
            def __init__(self):
                self.images = (calibration[i][0][None].numpy() for i in range(len(calibration)))

            def get_next(self):  # one image at a time, None when done
                image = next(self.images, None)
                return None if image is None else {"images": image}

        write_atomically(int8_path, lambda out: q.quantize_static(
            prepared, out, Calibration(), quant_format=q.QuantFormat.QDQ, per_channel=True,
            activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8, reduce_range=True,
            nodes_to_exclude=[node.name for node in nodes[head:]]))
    return int8_path


def onnx_network(path):
    """model.onnx -> (a network for Detector, run by onnxruntime on the CPU with as many threads as
    PyTorch has; class names; img_size; its confidence threshold, if it has one)."""
    try:
        import onnxruntime  # only here: everything else runs without the onnx extra
    except ImportError:
        raise UserError(ONNX_MISSING) from None
    if not Path(path).is_file():
        raise UserError(f"model file not found: {path}")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    # its threads sleep between calls instead of spinning: on few cores a video's decoding thread
    # needs those cycles (measured on 2 cores: video end to end 127 -> 145 frames/s)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = onnxruntime.InferenceSession(str(path), options,
                                               providers=["CPUExecutionProvider"])
    except Exception as e:
        raise UserError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0]}") from None
    metadata = session.get_modelmeta().custom_metadata_map
    if "classes" not in metadata:
        raise UserError(f"{path} has no class names in its metadata: "
                        "export it with `odscratch export`")

    def network(images):
        boxes, scores = session.run(["boxes", "scores"], {"images": images.numpy()})
        return torch.from_numpy(boxes), torch.from_numpy(scores)

    conf = float(metadata["conf"]) if "conf" in metadata else None
    return network, json.loads(metadata["classes"]), int(metadata["img_size"]), conf


ONE_THREAD = {"calls": 0, "threads": None, "lock": threading.Lock()}


@contextlib.contextmanager
def pytorch_on_one_thread():
    """PyTorch on one thread while onnxruntime computes: its idle threads wait for work spinning
    on the cores onnxruntime uses (measured on BCCD at 320 px, 2 threads: 20 ms an image with
    both at 2 threads, 14 ms so). Calls from several Python threads share one saved count."""
    with ONE_THREAD["lock"]:
        if ONE_THREAD["calls"] == 0:
            ONE_THREAD["threads"] = torch.get_num_threads()
            torch.set_num_threads(1)
        ONE_THREAD["calls"] += 1
    try:
        yield
    finally:
        with ONE_THREAD["lock"]:
            ONE_THREAD["calls"] -= 1
            if ONE_THREAD["calls"] == 0:
                torch.set_num_threads(ONE_THREAD["threads"])


class Detector:
    """A trained model, ready to use (a best.pt, or a model.onnx that `export` wrote):

        detector = Detector.load("runs/train/exp/best.pt")
        for found in detector(["a.jpg", "b.jpg"]):  # paths, PIL images, arrays, or just one
            print(found["names"], found["boxes"], found["scores"])  # boxes: xyxy pixels
        for found in detector.stream("clip.mp4"):  # or a camera (0), a stream URL, frames
            print(found["frame"], found["names"], found["boxes"])

    `network` maps a batch [B, 3, img_size, img_size] in [0, 1] to score_cells' output: PyTorch
    (bf16 where the hardware has it, unless fp32=True) or onnxruntime (model.onnx, model_int8.onnx).
    select_detections does the rest, the same for all.
    """

    def __init__(self, network, classes, img_size, conf=None, onnxruntime=False):
        self.network, self.classes, self.img_size = network, classes, img_size
        # the model's own confidence threshold (the best F1 on its validation split), if it has one
        self.stored_conf = conf
        self.transform = inference_transform(img_size)
        # where PyTorch resizes and runs NMS around onnxruntime's network, it steps aside
        self.threads = pytorch_on_one_thread if onnxruntime else contextlib.nullcontext

    @classmethod
    def load(cls, path, device="auto", fp32=False):
        if Path(path).suffix == ".onnx":
            return cls(*onnx_network(path), onnxruntime=True)
        device = pick_device(device)
        model, cfg, classes = load_detector(path, device)
        return cls(model_network(model, use_bf16(device, fp32)), classes, cfg.img_size,
                   stored_confidence(path))

    @property
    def conf(self):
        """The confidence threshold used when a call gives none: the model's own, else 0.25."""
        return DETECT_CONF if self.stored_conf is None else self.stored_conf

    @torch.no_grad()
    def __call__(self, images, conf=None, iou=NMS_IOU, max_det=MAX_DETECTIONS, classes=None,
                 tile=False):
        """Images -> per image {boxes [N, 4] xyxy pixels, scores [N], labels [N], names [N],
        objectness [h, w]: each cell's 1 - p(background), the grid behind the boxes}. conf: None
        for self.conf; classes: the names or indices to keep (None: all); tile: also look at
        img_size tiles of an image larger than that, at its own scale (small objects)."""
        keep = None if classes is None else class_indices([str(c) for c in classes], self.classes)
        conf = self.conf if conf is None else conf
        with self.threads():
            images = [as_image(i) for i in (images if isinstance(images, (list, tuple))
                                            else [images])]
            found = self.detect_resized(images, conf, iou, max_det, keep)
            if tile:
                found = [self.with_tiles(image, whole, conf, iou, max_det, keep)
                         for image, whole in zip(images, found)]
        return found

    def detect_resized(self, images, conf, iou, max_det, keep):
        """PIL images, each resized to img_size -> their detections (see __call__)."""
        batch = torch.stack([self.transform(image) for image in images])  # [B, 3, S, S]
        boxes, scores = self.network(batch)                    # [B, h*w, 4], [B, h*w, K]
        sizes = [(image.height, image.width) for image in images]
        wanted = scores
        if keep is not None:  # before NMS and max_det: a cell whose best class is another goes
            best = scores.argmax(-1, keepdim=True)  # [B, h*w, 1]
            wanted = scores * torch.isin(best, torch.tensor(keep, device=best.device))
        found = select_detections(boxes, wanted, sizes, conf, iou, max_det)
        return [{**f, "names": [self.classes[label] for label in f["labels"].tolist()],
                 "objectness": grid} for f, grid in zip(found, objectness_grid(scores.cpu()))]

    def with_tiles(self, image, whole, conf, iou, max_det, keep):
        """One image's detections (`whole`, from the resized image) joined by those in its
        img_size tiles: a tile's box cut by the tile's inner edge is dropped (whole in a
        neighbour if it is at most TILE_OVERLAP of a tile wide; larger ones come from the
        resized image), then per-class NMS over all of them."""
        side = self.img_size
        if image.width <= side and image.height <= side:
            return whole
        corners = tile_corners(image.width, image.height, side)
        parts = [whole]
        for start in range(0, len(corners), DETECT_BATCH):
            chunk = corners[start:start + DETECT_BATCH]
            tiles = [image.crop((x, y, x + side, y + side)) for x, y in chunk]  # black past edges
            for (x, y), found in zip(chunk, self.detect_resized(tiles, conf, iou, max_det, keep)):
                clear = uncut_by_tile(found["boxes"], x, y, side, image.width, image.height)
                shifted = found["boxes"][clear] + torch.tensor([x, y, x, y])
                parts.append({"boxes": clip_boxes_to_image(shifted, (image.height, image.width)),
                              "scores": found["scores"][clear], "labels": found["labels"][clear]})
        boxes, scores, labels = (torch.cat([p[k] for p in parts]) for k in
                                 ("boxes", "scores", "labels"))
        kept = batched_nms(boxes, scores, labels, iou)[:max_det]
        return {**whole, "boxes": boxes[kept], "scores": scores[kept], "labels": labels[kept],
                "names": [self.classes[label] for label in labels[kept].tolist()]}

    def stream(self, source, vid_stride=1, **options):
        """A video file, camera index (0), stream URL (rtsp://, http://) or any iterable of images
        -> one result per frame, as it comes: the call's result (options: its conf, iou,
        max_det, classes, tile) with the frame's index, its time in seconds (None for your own
        images) and the image. Frames are decoded on a thread, ahead of the model."""
        if isinstance(source, (str, Path, int)):
            source = Video(source)
        if isinstance(source, Video):
            frames, live = source.read(vid_stride), source.live
        else:
            frames = ((i, None, image) for i, image in enumerate(source) if i % vid_stride == 0)
            live = False
        for index, seconds, image in read_ahead(frames, live):
            found, = self(image, **options)
            yield {**found, "frame": index, "time": seconds, "image": image}

    def evaluate(self, data, batch):
        """A DetectionDataset (resized to img_size) -> COCO mAP with the F1-best confidence
        (with_confidence), and the detections behind it; whichever runtime runs the network."""
        with self.threads():
            found = predict(self.network, data, batch, EVAL_CONF, NMS_IOU)
        return with_confidence(evaluate(found, data.targets, len(self.classes))), found


BENCH_BATCH = 16  # images per call for bench's throughput


def cpu_kind():
    """What this CPU offers the runtimes: its name, vector width, int8 dot products (VNNI, in
    AVX-512 or AVX2's own), bf16 and AMX; as torch detects them (older torch: not said)."""
    has = getattr(torch.cpu, "get_capabilities", dict)()
    if not has:
        return "CPU features unknown to this torch"
    width = "AVX-512" if has.get("avx512_f") else "AVX2" if has.get("avx2") else "no AVX2"
    extras = {"VNNI": ["avx512_vnni", "avx_vnni"], "bf16": ["avx512_bf16"], "AMX": ["amx_tile"]}
    offers = [name for name, keys in extras.items() if any(has.get(key) for key in keys)]
    return f"{has.get('cpu_name', 'CPU')}: " + " + ".join([width, *offers])


def seconds_per_call(run, calls):
    start = time.perf_counter()
    for _ in range(calls):
        run()
    return (time.perf_counter() - start) / calls


def bench_detectors(detectors, image, batch, rounds, calls):
    """{name: Detector} -> {name: (ms per image alone [rounds], images/s in batches [rounds])}: a
    Detector call, from the decoded image to the boxes. Rounds take turns across detectors, so a
    busy machine slows all of them alike."""
    for detector in detectors.values():  # warm-up: first calls allocate memory and pick kernels
        detector(image), detector([image] * batch)
    timings = {name: ([], []) for name in detectors}
    for _ in range(rounds):
        for name, detector in detectors.items():
            timings[name][0].append(1000 * seconds_per_call(lambda: detector(image), calls))
            many = seconds_per_call(lambda: detector([image] * batch), max(2, calls // 4))
            timings[name][1].append(batch / many)
    return timings


# -----------------------------------------------------------------------------
# Command line: data, pretrain, train, eval, detect, export, bench. Every command runs offline with
# no arguments.

DATA_HELP = ("'synthetic' (built in); a dataset folder or file: YOLO (data.yaml), COCO (.json), "
             "Pascal VOC (.xml) or Hugging Face (parquet, imagefolder); or a Hugging Face hub name")
# The options several commands share, declared once; their defaults are RunConfig's
Data = Annotated[str, typer.Option(help=DATA_HELP)]
BboxFormat = Annotated[str, typer.Option(
    help="how Hugging Face data stores boxes: xyxy, xywh, or auto (xyxy unless only xywh fits "
         "the images; YOLO, COCO and VOC data say it themselves)")]
Stride = Annotated[int, typer.Option(
    help="pixels per grid cell: 8, 16 or 32; pretrain and train with the same")]
AssignRadius = Annotated[float, typer.Option(
    help="a box trains the cells within this many cells of its centre; 0.5: only the cell its "
         "centre falls in")]
DflBins = Annotated[int, typer.Option(
    help="each box edge as a distribution over this many distances (tighter boxes); 0: a box is "
         "4 numbers (cx, cy, w, h), as models before it")]
IouTargets = Annotated[bool, typer.Option(
    help="a cell's class target is its box's IoU with the truth, so that confidence ranks tight "
         "boxes first")]
TimeBudget = Annotated[float, typer.Option("--time", help="minutes; overrides --epochs")]
Seed = Annotated[int, typer.Option(help="fixes init, data order and augmentation (LTD: the crops)")]
Resume = Annotated[str, typer.Option(
    help="a last.pt: go on with that run exactly where it stopped (its own settings)")]
Weights = Annotated[str, typer.Option(help="a best.pt; default: the newest under runs/train/")]
Name = Annotated[str, typer.Option(help="the run's folder name, under runs/<command>/")]
Fp32 = Annotated[bool, typer.Option("--fp32", help="float32 even where the hardware has bf16")]
Device = Annotated[str, typer.Option(help="auto, cpu or cuda")]
Workers = Annotated[int, typer.Option(min=0, help="processes that load and augment the next "
                                      "batches while the model trains (0: in the training "
                                      "process); default: " + WORKERS_HELP)]

app = typer.Typer(add_completion=False, no_args_is_help=False, pretty_exceptions_enable=False,
                  help="odscratch: a small object detector you can read, train on a CPU, and ship.")
show_tracebacks = False  # odscratch --debug COMMAND


@app.callback()
def main(debug: bool = typer.Option(False, "--debug",
                                    help="show the traceback behind an error message")):
    global show_tracebacks
    show_tracebacks = debug


@contextlib.contextmanager
def user_errors():
    """Bad input, a failing disk, Ctrl-C: one line that says what happened and what to do, no
    traceback."""
    try:
        yield
    except (UserError, OSError, KeyboardInterrupt) as e:
        if show_tracebacks:
            raise
        console.print(f"[red]error:[/red] {escape(str(e)) or 'interrupted'}", soft_wrap=True)
        raise typer.Exit(130 if isinstance(e, KeyboardInterrupt) else 1) from None


@contextlib.contextmanager
def torchrun_processes():
    """Under torchrun (it sets WORLD_SIZE and the rest) the processes join one group, gloo for CPU
    tensors and nccl for GPU ones, and only rank 0 prints."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        yield
        return
    dist.init_process_group(timeout=PROCESS_TIMEOUT)
    if torch.cuda.is_available():  # each process its own GPU, also for NCCL's own tensors
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    console.quiet = dist.get_rank() != 0
    try:
        yield
    finally:
        dist.destroy_process_group()


def newest_weights():
    found = sorted(Path("runs/train").glob("*/best.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise UserError("no trained model in runs/train/: run `odscratch train` first, or pass "
                        "--weights")
    return found[-1]


def metrics_table(title, metrics, classes):
    """AP per class, and precision and recall at the confidence with_confidence chose."""
    table = Table(title=title)
    for column in ["class", "AP50", "AP50-95", "precision", "recall"]:
        table.add_column(column, justify="right" if column != "class" else "left")
    fmt = lambda v: "-" if v < 0 else f"{v:.3f}"
    mean = lambda values: np.mean([v for v in values if v >= 0] or [-1.0])
    precision, recall = metrics["precision_per_class"], metrics["recall_per_class"]
    table.add_row("all", fmt(metrics["map50"]), fmt(metrics["map"]), fmt(mean(precision)),
                  fmt(mean(recall)), style="bold")
    for row in zip(classes, metrics["ap50_per_class"], metrics["ap_per_class"], precision, recall):
        table.add_row(row[0], *map(fmt, row[1:]))
    table.caption = (f"mAP75 {fmt(metrics['map75'])}   mAP90 {fmt(metrics['map90'])}\nprecision "
                     f"and recall at confidence {metrics['conf']:.2f}, the best F1 "
                     f"({fmt(metrics['f1'])}, classes averaged, IoU 0.5)")
    return table


@app.command("lesson")
def lesson_command(epochs: int = Config.epochs, seed: Seed = Config.seed, fp32: Fp32 = False):
    """The lesson: Part 1's training loop on the built-in shapes, on the CPU, printing as it goes
    and the validation mAP50 last; writes no file."""
    with user_errors():
        lesson(Config(epochs=epochs, seed=seed, fp32=fp32))


def options_config(options):
    """A command's options (its locals()) -> RunConfig: each field from the option of its name
    (--time's is time_budget); options that are not settings (--name, --resume, ...) left out."""
    options = {**options, "time": options.get("time_budget", RunConfig.time)}
    return RunConfig(**{f.name: options[f.name] for f in fields(RunConfig) if f.name in options})


LTD_BATCH = 16  # pretrain's --batch: LTD was measured at 16 (docs/ltd.md), detection at 8


@app.command()
def pretrain(
    data: str = typer.Option(RunConfig.data, help=DATA_HELP + "; or a plain folder of images"),
    img_size: int = typer.Option(RunConfig.img_size, help="R is resized to img_size x img_size"),
    stride: Stride = RunConfig.stride,
    epochs: int = RunConfig.epochs,
    time_budget: TimeBudget = RunConfig.time,
    batch: int = LTD_BATCH,
    lr: float = RunConfig.lr,
    seed: Seed = RunConfig.seed,
    mask_crop: bool = typer.Option(False, "--mask-crop",
                                   help="grey out S's hole in R (to measure what that changes)"),
    resume: Resume = None,
    fp32: Fp32 = False,
    device: Device = RunConfig.device,
    workers: Workers = None,
    name: Name = "exp",
):
    """LTD self-supervised pretraining; writes runs/pretrain/<name>/{backbone.pt,
    ltd_samples.jpg,results.csv}."""
    with user_errors():
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise UserError("pretrain runs in one process: start it without torchrun")
        cfg = options_config(locals())
        run_dir, best = pretrain_backbone(cfg, name, mask_crop, resume, workers)
        console.print(f"held-out crops: mean IoU {best['iou']:.3f}, {best['hit50']:.1%} with IoU "
                      f">= 0.5 -> {run_dir / 'backbone.pt'}; see {run_dir / 'ltd_samples.jpg'}")


@app.command()
def train(
    data: Data = RunConfig.data,
    bbox_format: BboxFormat = RunConfig.bbox_format,
    img_size: int = typer.Option(RunConfig.img_size, help="train and detect at img_size x "
                                 "img_size"),
    stride: Stride = RunConfig.stride,
    assign_radius: AssignRadius = RunConfig.assign_radius,
    dfl_bins: DflBins = RunConfig.dfl_bins,
    iou_targets: IouTargets = RunConfig.iou_targets,
    epochs: int = RunConfig.epochs,
    time_budget: TimeBudget = RunConfig.time,
    batch: int = RunConfig.batch,
    lr: float = RunConfig.lr,
    seed: Seed = RunConfig.seed,
    patience: int = typer.Option(RunConfig.patience, help="stop after this many validations "
                                 "without a better mAP50-95; 0: never"),
    val_every: int = typer.Option(RunConfig.val_every, min=1, help="validate after epoch 1, every "
                                  "Nth and the last (long runs, large validation splits)"),
    weights: str = typer.Option(None, help="fine-tune: start from a trained detector's best.pt "
                                "(a new run; the classes both have keep their weights)"),
    backbone: str = typer.Option(None, help="start from a backbone.pt of `odscratch pretrain`"),
    resume: Resume = None,
    fp32: Fp32 = False,
    device: Device = RunConfig.device,
    workers: Workers = None,
    name: Name = "exp",
):
    """Train a detector; writes runs/train/<name>/{best.pt,last.pt,results.csv}. Also under
    torchrun."""
    with user_errors(), torchrun_processes():
        if sum(bool(x) for x in (weights, backbone, resume)) > 1:
            raise UserError("--weights (fine-tune a detector), --backbone (start from a "
                            "pretrained backbone) and --resume (go on with a run) exclude each "
                            "other: pass one")
        cfg = options_config(locals())
        run_dir, best, classes = train_detector(cfg, name, backbone, resume, weights, workers)
        if best:  # under torchrun, rank 0's
            has_edges = (run_dir / "edges.jpg").exists()
            title = f"best validation epoch: {best['epoch']} ({run_dir / 'best.pt'})"
            console.print(metrics_table(title, best, classes))
            console.print(f"pictures: {run_dir}/results.png (losses, mAP per epoch), val_pred.jpg "
                          "(predicted and true boxes), pr_curve.png, objectness.jpg (per-cell "
                          f"objectness), {'edges.jpg (how sure each box edge is), ' * has_edges}"
                          "f1_curve.png and confusion_matrix.png (at the confidence best.pt keeps "
                          "for detect)", soft_wrap=True)


def scored_split(weights, cfg, classes, data, split):
    """The split `eval` and `bench` score a model on: of its own data, or of other data with its
    classes."""
    ds = load_model_split(cfg, data, split)
    check_same_classes(classes, class_names(ds), weights, data or cfg.data)
    name = f"{data or cfg.data} {SPLIT_WORDS.get(split, split)}"
    return CheckedDataset(ds, cfg.img_size, train=False, name=name)


@app.command("eval")
def evaluate_command(
    weights: Weights = None,
    data: str = typer.Option(None, help="default: the data the model was trained on"),
    split: str = typer.Option("test", help="train, validation (or val, valid) or test"),
    batch: int = typer.Option(RunConfig.batch),
    fp32: Fp32 = False,
    device: Device = RunConfig.device,
    name: Name = "exp",
):
    """COCO mAP of a trained model on a split, overall and per class; precision and recall at the
    best F1's confidence; writes runs/eval/<name>/{confusion_matrix.png,f1_curve.png}."""
    with user_errors():
        device = pick_device(device)
        weights = Path(weights) if weights else newest_weights()
        model, cfg, classes = load_detector(weights, device)
        dataset = scored_split(weights, cfg, classes, data, split)
        detector = Detector(model_network(model, use_bf16(device, fp32)), classes, cfg.img_size)
        metrics, found = detector.evaluate(dataset, batch)
        run_dir = new_run_dir("eval", name)
        draw_confidence_pictures(found, dataset, metrics, classes, run_dir)
        title = f"{weights} on {dataset.name} ({len(dataset)} images)"
        console.print(metrics_table(title, metrics, classes))
        console.print(f"pictures: {run_dir}/confusion_matrix.png, f1_curve.png", soft_wrap=True)


SIZE_BINS = [0.02, 0.05, 0.1, 0.25, 0.5]  # box side (the square root of its area) over the image's
COLLISION_TOLERANCE = 0.01  # `data` suggests the coarsest stride that loses fewer boxes than this


def collisions_per_stride(data, img_size, radius):
    """A DetectionDataset -> {stride: share of its boxes that the assignment at `radius` loses to
    collisions}: the design's limit, measured on the user's own data (`odscratch data` says it)."""
    lost = {stride: 0 for stride in BACKBONE_CHANNELS}
    for target, (height, width) in zip(data.targets, data.sizes):
        size = torch.tensor([width, height, width, height])
        boxes = box_convert(target["boxes"] / size, "xyxy", "cxcywh")
        for stride in lost:
            grid = img_size // stride
            _, _, n = assign_boxes_to_cells(boxes, target["labels"], grid, grid, -1, radius)
            lost[stride] += n
    total = sum(len(t["boxes"]) for t in data.targets)
    return {stride: n / max(total, 1) for stride, n in lost.items()}


def box_sides(data):
    """A DetectionDataset -> each box's side (square root of its area) over its image's, [N]."""
    return torch.cat([(box_convert(t["boxes"], "xyxy", "cxcywh")[:, 2:].prod(1) / (h * w)).sqrt()
                      for t, (h, w) in zip(data.targets, data.sizes)])


def print_table(title, columns, rows):
    table = Table(*columns, title=title)
    for row in rows:
        table.add_row(*map(str, row))
    console.print(table)


@app.command("data")
def data_command(
    data: Data = RunConfig.data,
    bbox_format: BboxFormat = RunConfig.bbox_format,
    img_size: int = typer.Option(RunConfig.img_size, help="the --img-size you would train at"),
    assign_radius: AssignRadius = RunConfig.assign_radius,
):
    """A dataset before training: its layout, splits, classes, box sizes, and which --stride."""
    with user_errors():
        splits, missing = {}, []
        for split in ["train", "validation", "test"]:
            try:
                ds = load_split(data, split, bbox_format)
            except UserError as e:
                if "has no split" not in str(e):
                    raise
                missing.append(e)
                continue
            splits[split] = CheckedDataset(ds, img_size, train=False, name=f"{data} {split}")
        if not splits:
            raise missing[0]
        # the grid is chosen for the split training learns from (or, without one, the first)
        learn = "train" if "train" in splits else next(iter(splits))
        classes = class_names(splits[learn].ds)
        rows = []
        for split, d in splits.items():
            counts = [len(t["boxes"]) for t in d.targets]
            labels = torch.cat([t["labels"] for t in d.targets])
            per_class = [(labels == k).sum().item() for k in range(len(classes))]
            rows.append([split, len(d), sum(counts), f"{np.mean(counts):.1f} / {max(counts)}",
                         counts.count(0), *per_class])
        print_table(f"{data}: images and boxes per split and class", ["split", "images", "boxes",
                    "boxes per image, mean / max", "images with no box", *classes], rows)
        bins = list(zip([0, *SIZE_BINS], [*SIZE_BINS, math.inf]))
        print_table("box side / image side (side = square root of the area)",
                    ["split", *(f"{a:.0%}-{b:.0%}" if b < math.inf else f">= {a:.0%}"
                                for a, b in bins)],
                    ([split, *(f"{((sides >= a) & (sides < b)).float().mean():.1%}"
                               for a, b in bins)]
                     for split, sides in ((split, box_sides(d)) for split, d in splits.items())))
        sides = box_sides(splits[learn]) * img_size  # in pixels at --img-size
        lost = collisions_per_stride(splits[learn], img_size, assign_radius)
        print_table(f"--assign-radius {assign_radius:g} at --img-size {img_size}, {learn} split",
                    ["--stride", "grid", "boxes smaller than a cell", "boxes lost to collisions"],
                    ([stride, f"{img_size // stride} x {img_size // stride}",
                      f"{(sides < stride).float().mean():.1%}", f"{share:.2%}"]
                     for stride, share in lost.items()))
        good = [stride for stride, share in lost.items() if share < COLLISION_TOLERANCE]
        tolerance = f"{COLLISION_TOLERANCE:.0%}"
        console.print(f"pick --stride {max(good)}: the coarsest grid (fastest, widest view per "
                      f"cell) that loses under {tolerance} of the boxes" if good else
                      f"every stride loses {tolerance} or more of the boxes: train with --stride "
                      "8 and a larger --img-size", soft_wrap=True)


def source_files(source, skipped):
    """One of detect's sources -> the images and videos it names (paths; a camera index or a URL
    as given), counting the files of a folder or glob that are neither in `skipped`."""
    if is_camera_or_stream(source):
        return [source]
    path = Path(source)
    if path.is_file() and path.suffix.lower() == ".txt":
        # a list, a source per line (relative to the list's folder), as Ultralytics reads one
        lines = [line.strip() for line in path.read_text().splitlines()]
        return [file for line in lines if line and not line.startswith("#")
                for file in source_files(line if is_camera_or_stream(line)
                                         else str(path.parent / line), skipped)]
    if path.is_file():  # named by the user: a video by its suffix, else an image
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file())
    elif any(c in source for c in "*?["):
        found = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
    else:
        raise UserError(f"image, video or folder not found: {source}")
    media = [p for p in found if p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES]
    skipped.append(len(found) - len(media))
    return media


def is_video(source):
    """A video file, camera index or stream URL (a str); an image path or a built-in PIL image
    is not."""
    if isinstance(source, Path):
        return source.suffix.lower() in VIDEO_SUFFIXES
    return isinstance(source, str)


def detect_inputs(sources):
    """Images, videos, cameras, streams, folders, globs and .txt lists -> [(name, source)] and how
    many files were skipped as neither image nor video; no source: a few built-in synthetic test
    images, as [(name, PIL image)]."""
    if not sources:
        ds = synthetic_split("test")
        return [(f"synthetic_test_{i}.jpg", ds[i]["image"]) for i in range(4)], 0
    skipped = []
    files = [file for source in sources for file in source_files(source, skipped)]
    if not files:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) or videos "
                        f"({', '.join(sorted(VIDEO_SUFFIXES))}) in {' '.join(sources)}")
    # a camera is named camera<N>, a stream after the last part of its URL
    paths = [file if isinstance(file, Path) else Path(f"camera{file}.mp4") if file.isdigit()
             else Path(Path(urlparse(file).path).stem or "stream").with_suffix(".mp4")
             for file in files]
    return list(zip(output_names(paths), files)), sum(skipped)


def output_names(paths):
    """A file name per image for detect's outputs, each stem once: two folders' img.jpg, or img.jpg
    beside img.png, would write over each other's picture and labels, so later ones get _2, _3..."""
    names, taken = [], set()
    for path in paths:
        stem, n = path.stem, 1
        while stem.lower() in taken:
            n += 1
            stem = f"{path.stem}_{n}"
        taken.add(stem.lower())
        names.append(stem + path.suffix)
    return names


def coco_image_ids(names):
    """COCO's own file names are their ids (000000000139.jpg -> 139); other images are numbered
    1, 2, ..."""
    stems = [Path(n).stem for n in names]
    if all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        return [int(s) for s in stems]
    return list(range(1, len(names) + 1))


def coco_annotations(found, image_id, first_id):
    """One image's detections as COCO annotations with their scores (bbox: x, y, width, height;
    category ids from 1), numbered from first_id: pre-labels a labelling tool imports."""
    boxes = box_convert(found["boxes"], "xyxy", "xywh").tolist()
    return [{"id": first_id + i, "image_id": image_id, "category_id": label + 1,
             "bbox": [round(v, 2) for v in box], "area": round(box[2] * box[3], 2), "iscrowd": 0,
             "score": round(score, 5)}
            for i, (box, score, label) in enumerate(zip(boxes, found["scores"].tolist(),
                                                        found["labels"].tolist()))]


def yolo_labels(found, width, height, scores):
    """One image's detections as a YOLO label file: `class cx cy w h` per line, relative to the
    image, and each box's score after it if `scores`."""
    size = torch.tensor([width, height, width, height])
    boxes = box_convert(found["boxes"], "xyxy", "cxcywh") / size
    return "".join(f"{label} " + " ".join(f"{v:.6f}" for v in box)
                   + (f" {score:.5f}" if scores else "") + "\n"
                   for box, label, score in zip(boxes.tolist(), found["labels"].tolist(),
                                                found["scores"].tolist()))


def class_indices(wanted, classes):
    """--classes (names or indices, repeated or separated by commas) -> the class indices."""
    indices = []
    for item in (part.strip() for entry in wanted for part in entry.split(",") if part.strip()):
        if item in classes:
            indices.append(classes.index(item))
        elif item.isdigit() and int(item) < len(classes):
            indices.append(int(item))
        else:
            raise UserError(f"--classes {item}: the model's classes are {classes} (names, or "
                            f"indices 0 to {len(classes) - 1})")
    if not indices:
        raise UserError(f"--classes names no class: give names or indices of {classes}")
    return indices



def read_inputs(inputs, ids, unreadable):
    """A batch of detect's inputs -> [(file name, source, PIL image, image id)]; an image PIL
    cannot read is left out, its error added to `unreadable`."""
    batch = []
    for (file_name, source), image_id in zip(inputs, ids):
        try:
            image = read_image(source) if isinstance(source, Path) else source
            batch.append((file_name, source, image, image_id))
        except UserError as e:
            unreadable.append(str(e))
    return batch


def write_prelabels(run_dir, classes, images, annotations, save_txt, json_output):
    """The labels detect wrote, as datasets labelling tools import (and --data reads): a YOLO
    dataset (images/, labels/, data.yaml, classes.txt) and a COCO annotation file
    (annotations.json, its file names under images/)."""
    if save_txt:
        (run_dir / "classes.txt").write_text("".join(f"{name}\n" for name in classes))
        spec = {"train": "images", "nc": len(classes), "names": classes}
        (run_dir / "data.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    if json_output:
        categories = [{"id": k + 1, "name": name, "supercategory": ""}
                      for k, name in enumerate(classes)]
        coco = {"images": images, "annotations": annotations, "categories": categories}
        (run_dir / "annotations.json").write_text(json.dumps(coco))


def detect_video(detector, file_name, source, run_dir, vid_stride, options):
    """Detections on every vid_stride-th frame of a video, camera or stream, written as they come:
    <name>.mp4 with the boxes drawn (at the source's frame rate / vid_stride, so it lasts as long)
    and <name>.jsonl, a line per frame. Ctrl-C or a source that stops ends it, both kept whole.
    -> (frames, objects, how it ended if not at the source's end)."""
    video = Video(source)
    stem = Path(file_name).stem
    total = video.frames and -(-video.frames // vid_stride)
    columns = [TextColumn(f"{file_name}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[fps]:.1f} frames/s"), TimeElapsedColumn()]
    writer, frames, objects, stopped, last = None, 0, 0, None, -1
    started = time.perf_counter()
    with (run_dir / f"{stem}.jsonl").open("w") as lines, Progress(*columns, console=console,
                                                                   transient=True) as progress:
        task = progress.add_task("", total=total, fps=0.0)
        try:
            with StopOnCtrlC("frame") as ctrl_c:
                for found in detector.stream(video, vid_stride, **options):
                    image = found["image"]
                    if writer is None:
                        writer = VideoWriter(run_dir / f"{stem}.mp4", image.width, image.height,
                                             video.rate / vid_stride)
                    writer.write(draw_detections(image, found, detector.classes))
                    boxes = [{"class": name, "score": round(score, 4),
                              "box": [round(v, 1) for v in box]}
                             for name, score, box in zip(found["names"], found["scores"].tolist(),
                                                         found["boxes"].tolist())]
                    line = {"frame": found["frame"], "time": round(found["time"], 3),
                            "boxes": boxes}
                    lines.write(json.dumps(line) + "\n")
                    frames, objects, last = frames + 1, objects + len(boxes), found["frame"]
                    progress.update(task, advance=1,
                                    fps=frames / (time.perf_counter() - started))
                    if ctrl_c.requested:
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            stopped = "stopped by Ctrl-C"
        except UserError as e:  # a stream that stops, a frame that cannot be decoded
            stopped = str(e)
        finally:
            if writer is not None:
                writer.close()
    if not stopped and video.frames and last + 1 < video.frames - vid_stride:
        stopped = (f"only {last + 1} of the {video.frames} frames its header counts could be read: "
                   "the file is cut short or damaged")
    return frames, objects, stopped


@app.command()
def detect(
    sources: list[str] = typer.Argument(None, help="images, videos, folders, globs, a camera (0), "
                                        "a stream URL or a .txt list of these; none: built-in "
                                        "images"),
    weights: str = typer.Option(None, help="a best.pt or model.onnx; default: the newest best.pt"),
    conf: float = typer.Option(None, help="minimum score; default: the model's own (the best F1 "
                               f"on its validation split), else {DETECT_CONF}"),
    iou: float = typer.Option(NMS_IOU, help="NMS IoU threshold"),
    max_det: int = typer.Option(MAX_DETECTIONS, help="at most this many boxes per image"),
    classes: list[str] = typer.Option(None, "--classes", help="keep only these classes: names or "
                                      "indices (--classes cat --classes 2, or cat,2)"),
    tile: bool = typer.Option(False, "--tile", help="large photos: also detect in overlapping "
                              "tiles of the model's input size, for small objects"),
    vid_stride: int = typer.Option(1, "--vid-stride", min=1, help="videos: every Nth frame"),
    json_output: bool = typer.Option(False, "--json", help="write annotations.json: COCO "
                                     "pre-labels, with images/"),
    save_txt: bool = typer.Option(False, "--save-txt", help="write a YOLO dataset of pre-labels: "
                                  "images/, labels/, data.yaml, classes.txt"),
    save_conf: bool = typer.Option(False, "--save-conf", help="add each box's score to the YOLO "
                                   "labels (implies --save-txt)"),
    show_grid: bool = typer.Option(False, "--show-grid", help="also <image>_grid.jpg: objectness"),
    fp32: Fp32 = False,
    device: Device = RunConfig.device,
    name: Name = "exp",
):
    """Detect objects in images and videos; prints a table, writes annotated images and videos (a
    .jsonl of detections beside each video) to runs/detect/<name>/."""
    with user_errors():
        detector = Detector.load(weights or newest_weights(), device, fp32)
        keep = class_indices(classes, detector.classes) if classes else None
        inputs, skipped = detect_inputs(sources)
        videos = [(file_name, source) for file_name, source in inputs if is_video(source)]
        inputs = [(file_name, source) for file_name, source in inputs if not is_video(source)]
        if videos:
            import_av()  # before anything is written
        run_dir = new_run_dir("detect", name)
        save_txt = save_txt or save_conf
        prelabels = save_txt or json_output
        for folder in ["images"] * prelabels + ["labels"] * save_txt:
            (run_dir / folder).mkdir(exist_ok=True)
        if conf is None:
            own = detector.stored_conf is not None
            console.print(f"confidence {detector.conf:.2f}: " + ("the model's own, the best F1 on "
                          "its validation split" if own else "the default") + " (--conf sets "
                          "another)")
        ids = coco_image_ids([file_name for file_name, _ in inputs])
        table = Table("image", "class", "score", "box (x1, y1, x2, y2)")
        images_json, annotations, unreadable = [], [], []
        for start in range(0, len(inputs), DETECT_BATCH):
            end = start + DETECT_BATCH
            batch = read_inputs(inputs[start:end], ids[start:end], unreadable)
            if not batch:
                continue
            names, sources_, images, image_ids = zip(*batch)
            found_all = detector(list(images), conf, iou, max_det, keep, tile)
            for file_name, source, image, image_id, found in zip(names, sources_, images,
                                                                image_ids, found_all):
                stem = Path(file_name).stem
                save_picture(draw_detections(image, found, detector.classes),
                             run_dir / f"{stem}.jpg")
                if show_grid:
                    grid = draw_objectness(image, found["objectness"])
                    save_picture(grid, run_dir / f"{stem}_grid.jpg")
                for box, score, label in zip(found["boxes"].tolist(), found["scores"].tolist(),
                                             found["names"]):
                    xyxy = ", ".join(f"{v:.0f}" for v in box)
                    table.add_row(file_name, label, f"{score:.2f}", xyxy)
                annotations += coco_annotations(found, image_id, len(annotations) + 1)
                images_json.append({"id": image_id, "file_name": f"images/{file_name}",
                                    "width": image.width, "height": image.height})
                # the image as it came (a photo keeps its EXIF), beside its pre-labels
                if prelabels and isinstance(source, Path):
                    shutil.copy2(source, run_dir / "images" / file_name)
                elif prelabels:
                    save_picture(image, run_dir / "images" / file_name)
                if save_txt:
                    labels = yolo_labels(found, image.width, image.height, save_conf)
                    (run_dir / "labels" / f"{stem}.txt").write_text(labels)
        if inputs:
            console.print(table)
            write_prelabels(run_dir, detector.classes, images_json, annotations, save_txt,
                            json_output)
        options = {"conf": conf, "iou": iou, "max_det": max_det, "classes": keep, "tile": tile}
        for file_name, source in videos:
            try:
                frames, objects, stopped = detect_video(detector, file_name, source, run_dir,
                                                        vid_stride, options)
            except UserError as e:  # cannot be opened: the next source
                unreadable.append(str(e))
                continue
            stem = Path(file_name).stem
            written = f"{run_dir / stem}.mp4, {stem}.jsonl" if frames else f"{run_dir}"
            console.print(f"{source}: {objects} objects in {frames} frames -> {written}"
                          + (f" ({stopped})" if stopped else ""), soft_wrap=True)
            if stopped == "stopped by Ctrl-C":
                break
        if unreadable and len(unreadable) == len(inputs) + len(videos):
            more = f" (and {len(unreadable) - 1} more unreadable)" if len(unreadable) > 1 else ""
            raise UserError(unreadable[0] + more)
        notes = [f"{skipped} files neither image nor video skipped"] * bool(skipped) + [
            f"skipped {len(unreadable)} unreadable: {'; '.join(unreadable[:3])}"] * bool(unreadable)
        if inputs:
            console.print(f"{len(annotations)} objects in {len(images_json)} images -> {run_dir}"
                          + "".join(f" ({note})" for note in notes), soft_wrap=True)
        elif notes:
            console.print("; ".join(notes), soft_wrap=True)


@app.command()
def export(
    weights: Weights = None,
    img_size: int = typer.Option(None, help="default: the size the model was trained at"),
    name: Name = "exp",
    int8: bool = typer.Option(False, "--int8", help="also model_int8.onnx: int8 weights and "
                              f"activations, calibrated on {CALIBRATION_IMAGES} training images"),
    data: str = typer.Option(None, help="--int8 calibrates on this; default: the model's own data"),
):
    """Write the model as ONNX (boxes and class scores per cell; threshold + NMS after it) to
    runs/export/<name>/."""
    with user_errors():
        weights = Path(weights) if weights else newest_weights()
        if not onnx_installed():
            raise UserError(ONNX_MISSING)
        if int8:  # the calibration images first: a wrong --data stops before anything is written
            _, cfg, _ = load_detector(weights, torch.device("cpu"))
            calibration = calibration_images(cfg, data, img_size or cfg.img_size)
        path = export_onnx(weights, new_run_dir("export", name) / "model.onnx", img_size)
        paths = [path]
        if int8:
            paths.append(quantize_onnx(path, path.with_name("model_int8.onnx"), calibration))
        for p in paths:
            console.print(f"{weights} -> {p} ({p.stat().st_size / 2**20:.1f} MiB); "
                          f"try it: odscratch detect --weights {p}")


def left_out_if_missing(what, load):
    """load(), or None with one line saying why `what` is left out (its data is missing)."""
    try:
        return load()
    except UserError as e:
        console.print(f"{what} left out: {e} (--data names other data)", markup=False)
        return None


@app.command()
def bench(
    weights: Weights = None,
    image: str = typer.Option(None, help="the image to time; default: a built-in test image"),
    batch: int = typer.Option(BENCH_BATCH, help="images per call for the throughput column"),
    rounds: int = typer.Option(5, help="timings repeated this many times: median and range"),
    calls: int = typer.Option(20, help="single-image calls per round"),
    threads: int = typer.Option(None, help="CPU threads for every runtime; default: PyTorch's"),
    data: str = typer.Option(None, help="scored on, int8 calibrated on; default: the model's own"),
    split: str = typer.Option("test", help="the split each runtime's mAP is measured on"),
    device: Device = RunConfig.device,
):
    """Speed and mAP of the model in each runtime: PyTorch float32 and bf16, onnxruntime float32
    and int8."""
    with user_errors():
        weights = Path(weights) if weights else newest_weights()
        if threads:
            torch.set_num_threads(threads)
        threads = torch.get_num_threads()
        device = pick_device(device)
        sample = read_image(image) if image else synthetic_split("test")[0]["image"]
        _, cfg, classes = load_detector(weights, torch.device("cpu"))
        detectors = {"PyTorch float32": Detector.load(weights, device, fp32=True)}
        if use_bf16(device, fp32=False):
            detectors["PyTorch bf16"] = Detector.load(weights, device)
        # without the data the table still has the times; what is missing is said in one line
        scored = left_out_if_missing("mAP",
                                     lambda: scored_split(weights, cfg, classes, data, split))
        with tempfile.TemporaryDirectory() as tmp:
            if onnx_installed():
                path = export_onnx(weights, Path(tmp) / "model.onnx")
                detectors["onnxruntime float32"] = Detector.load(path)
                calibration = left_out_if_missing(
                    "int8", lambda: calibration_images(cfg, data, cfg.img_size))
                if calibration is not None:
                    int8 = quantize_onnx(path, Path(tmp) / "model_int8.onnx", calibration)
                    detectors["onnxruntime int8"] = Detector.load(int8)
            else:
                console.print(f"onnxruntime left out: {ONNX_MISSING}", markup=False)
            timings = bench_detectors(detectors, sample, batch, rounds, calls)
            metrics = ({name: d.evaluate(scored, batch)[0] for name, d in detectors.items()}
                       if scored is not None else {})
        where = f"cpu ({cpu_kind()})" if device.type == "cpu" else str(device)
        table = Table(title=f"{weights}: {cfg.img_size} px, {where}, {threads} threads, "
                            f"median (min-max) of {rounds} rounds",
                      caption="time: a Detector call, image to boxes" +
                              (f"; mAP: {scored.name}, {len(scored)} images" if metrics else ""))
        columns = ["runtime", "1 image, ms", f"batch of {batch}, images/s", "mAP50", "mAP50-95"]
        for column in columns:
            table.add_column(column, justify="left" if column == "runtime" else "right")
        spread = lambda v: f"{np.median(v):.1f} ({min(v):.1f}-{max(v):.1f})"
        for name, (latency, throughput) in timings.items():
            scores = [f"{metrics[name][k]:.3f}" if metrics else "-" for k in ["map50", "map"]]
            table.add_row(name, spread(latency), spread(throughput), *scores)
        console.print(table)


if __name__ == "__main__":
    app()
