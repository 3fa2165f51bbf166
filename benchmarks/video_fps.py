"""Video on a CPU: frames per second of odscratch's int8 model on a 640 x 480 video, end to end,
against the model's own latency and against YOLO11n, in one run on one machine.

  1. A 640 x 480 H.264 video (--frames frames at 30 per second) is written from the test split of
     --data: each image held for 10 frames while the view pans across it, as a camera over a
     microscope slide would see it;
  2. the odscratch model (--weights, a best.pt) is exported to int8 as `export --int8` does;
  3. each round, in turn:
     - "model latency": `Detector` on one frame already decoded, image to boxes, each frame once
       (median per call);
     - "Detector.stream": every frame from the file to the boxes, decoding on its thread;
     - "detect, video written": the same plus boxes drawn and the annotated H.264 video and
       JSON lines written (what `odscratch detect clip.mp4` does, less its start-up);
     - the same three for YOLO11n as Ultralytics runs it: `predict` on a decoded frame,
       `predict(video, stream=True)`, and `predict(video, stream=True, save=True)`, float32.
Then the median over --rounds of each, and end-to-end frames per second as a share of
1 / (the model's latency).

YOLO11n is the network of `yolo11n.yaml` (nothing downloaded) with the data's class count and
untrained weights unless --yolo names a trained best.pt: its speed is its architecture's, and an
untrained YOLO11n finds few boxes, which spares its NMS.

    pip install -e ".[onnx,video,compare]"
    odscratch train --data BCCD_Dataset --img-size 320 --time 5 --name bccd320
    python benchmarks/video_fps.py --data BCCD_Dataset --weights runs/train/bccd320/best.pt
    python benchmarks/video_fps.py --data BCCD_Dataset --weights ... --clip clip.mp4
    python benchmarks/as_avx2_cpu.py benchmarks/video_fps.py --data BCCD_Dataset --weights ... \
        --clip clip.mp4 --no-writing
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import odscratch as ods

WIDTH, HEIGHT, RATE, HOLD, PAN = 640, 480, 30, 10, 4  # pixels, frames/s, frames per image, px


def write_clip(data, path, frames):
    """The test split's images, held HOLD frames each while the view pans PAN px a frame."""
    test = ods.load_split(data, "test").cast_column("image", ods.datasets.Image(decode=False))
    writer = ods.VideoWriter(path, WIDTH, HEIGHT, RATE)
    for n in range(frames):
        image = ods.open_image(test[(n // HOLD) % len(test)]["image"]).convert("RGB")
        image = image.resize((WIDTH + HOLD * PAN, HEIGHT + HOLD * PAN))
        shift = (n % HOLD) * PAN
        writer.write(image.crop((shift, shift, shift + WIDTH, shift + HEIGHT)))
    writer.close()


def int8_detector(weights, data, folder):
    _, cfg, _ = ods.load_detector(weights, torch.device("cpu"))
    path = ods.export_onnx(weights, folder / "model.onnx")
    calibration = ods.calibration_images(cfg, data, cfg.img_size)
    return ods.Detector.load(ods.quantize_onnx(path, folder / "model_int8.onnx", calibration)), cfg


def yolo_model(weights, num_classes, folder):
    """Ultralytics' YOLO: a trained best.pt, or yolo11n.yaml's network for num_classes classes."""
    import yaml
    from ultralytics import YOLO
    from ultralytics.nn.tasks import yaml_model_load
    if weights:
        return YOLO(weights)
    spec = {**yaml_model_load("yolo11n.yaml"), "nc": num_classes}
    (folder / "yolo11n.yaml").write_text(yaml.safe_dump(spec))
    return YOLO(str(folder / "yolo11n.yaml"))


def per_call_ms(call, frames):
    times = []
    for frame in frames:
        start = time.perf_counter()
        call(frame)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def frames_per_second(run):
    start = time.perf_counter()
    frames = run()
    return frames / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="BCCD_Dataset")
    parser.add_argument("--weights", required=True, help="odscratch best.pt")
    parser.add_argument("--yolo", help="a trained YOLO best.pt (default: yolo11n.yaml, untrained)")
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clip", help="read this video, written first if it is not there")
    parser.add_argument("--no-writing", action="store_true",
                        help="leave out 'video written too' (for as_avx2_cpu.py: it cannot hold "
                        "x264, the H.264 encoder, to AVX2; write --clip in a run without it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        clip = Path(args.clip) if args.clip else folder / "clip.mp4"
        (folder / "out").mkdir()
        if not clip.is_file():
            write_clip(args.data, clip, args.frames)
        detector, cfg = int8_detector(args.weights, args.data, folder)
        frames = [image for _, _, image in ods.Video(clip).read()]
        arrays = [np.asarray(image) for image in frames]
        yolo = yolo_model(args.yolo, len(detector.classes), folder)
        options = {"imgsz": cfg.img_size, "device": "cpu", "verbose": False}

        def yolo_stream(save):
            return sum(1 for _ in yolo.predict(str(clip), stream=True, save=save,
                                               project=str(folder), name="yolo", exist_ok=True,
                                               **options))

        def ods_detect():
            frames, _, stopped = ods.detect_video(detector, "clip.mp4", clip, folder / "out", 1,
                                                  {"conf": None})
            assert stopped is None, stopped
            return frames

        tools = {
            "odscratch int8": {
                "model latency": lambda: per_call_ms(detector, frames),
                "stream": lambda: frames_per_second(
                    lambda: sum(1 for _ in detector.stream(clip))),
                "video written": lambda: frames_per_second(ods_detect)},
            "YOLO11n float32": {
                "model latency": lambda: per_call_ms(lambda a: yolo.predict(a, **options), arrays),
                "stream": lambda: frames_per_second(lambda: yolo_stream(False)),
                "video written": lambda: frames_per_second(lambda: yolo_stream(True))},
        }
        if args.no_writing:
            for measures in tools.values():
                del measures["video written"]
        for measures in tools.values():  # warm-up: memory, kernels, Ultralytics' set-up
            measures["model latency"]()
        torch.set_num_threads(args.threads)  # Ultralytics' first predict sets the CPU count - 1
        results = {(tool, what): [] for tool, measures in tools.items() for what in measures}
        for round_ in range(args.rounds):
            for tool, measures in tools.items():
                for what, measure in measures.items():
                    results[tool, what].append(measure())
            assert torch.get_num_threads() == args.threads
            print(f"round {round_ + 1}: " + ", ".join(
                f"{tool} {what} {values[-1]:.1f}" for (tool, what), values in results.items()))
    print(f"\n{ods.cpu_kind()}, {args.threads} threads; {len(frames)} frames of {WIDTH} x "
          f"{HEIGHT} H.264 at {cfg.img_size} px; median of {args.rounds} rounds (min-max)")
    print("| model | latency, decoded frame | 1 / latency | Detector.stream / predict(stream) "
          "| share of 1 / latency | video written too |\n|---|---|---|---|---|---|")
    for tool in tools:
        latency, stream = results[tool, "model latency"], results[tool, "stream"]
        written = results.get((tool, "video written"))
        ms = statistics.median(latency)
        share = [fps * v / 1000 for fps, v in zip(stream, latency)]
        print(f"| {tool} | {ms:.2f} ms ({min(latency):.2f}-{max(latency):.2f}) | "
              f"{1000 / ms:.0f} frames/s | {statistics.median(stream):.0f} frames/s "
              f"({min(stream):.0f}-{max(stream):.0f}) | {statistics.median(share):.0%} | "
              + (f"{statistics.median(written):.0f} frames/s ({min(written):.0f}-"
                 f"{max(written):.0f}) |" if written else "not measured |"))
    ours, theirs = (statistics.median(results[tool, "stream"]) for tool in tools)
    print(f"\nodscratch int8 / YOLO11n, end-to-end frames per second: {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
