"""Which library reads video for odscratch: PyAV (FFmpeg's Python bindings) or OpenCV
(opencv-python-headless), measured on the same H.264 file, on this CPU.

A 640 x 480 H.264 clip of moving shapes (--frames frames at 30 per second) is written with PyAV;
then each round, in turn, each reader decodes every frame to an RGB numpy array (what a detector
takes), and the wall time and the process's CPU time per frame are taken. PyAV is measured with
FFmpeg's decoder on one thread and on its own threads ("AUTO", what odscratch uses for files).
It also says which of the two can write H.264, the video ordinary players and browsers play.

    pip install av opencv-python-headless
    python benchmarks/video_decoders.py
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

WIDTH, HEIGHT, RATE = 640, 480, 30


def write_clip(path, frames):
    """Shapes moving over a gradient, H.264 at 30 frames a second: what a camera writes."""
    import av
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=RATE)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        y, x = np.mgrid[:HEIGHT, :WIDTH]
        for n in range(frames):
            image = np.stack([x * 255 // WIDTH, y * 255 // HEIGHT, (x + y + n) % 256], -1)
            image = image.astype(np.uint8)
            image[100 + n % 200:180 + n % 200, 50 + 2 * n % 500:130 + 2 * n % 500] = 255
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def pyav(path, threaded):
    import av
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if threaded:
            stream.thread_type = "AUTO"
        else:
            stream.codec_context.thread_count = 1
        return sum(1 for frame in container.decode(stream) if frame.to_ndarray(format="rgb24")
                   is not None)


def opencv(path):
    import cv2
    video, frames = cv2.VideoCapture(str(path)), 0
    while True:
        ok, frame = video.read()
        if not ok:
            return frames
        cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        frames += 1


def writes_h264(library):
    """Can this library write an H.264 .mp4?"""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "out.mp4"
        if library == "PyAV":
            try:
                write_clip(path, 2)
                return True
            except Exception:
                return False
        import cv2
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"avc1"), RATE,
                                 (WIDTH, HEIGHT))
        ok = writer.isOpened()
        writer.release()
        return ok


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import av
    import cv2
    readers = {"PyAV, 1 thread": lambda p: pyav(p, False),
               "PyAV, FFmpeg's threads (AUTO)": lambda p: pyav(p, True),
               "OpenCV": opencv}
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "clip.mp4"
        write_clip(clip, args.frames)
        wall, cpu = {name: [] for name in readers}, {name: [] for name in readers}
        for _ in range(args.rounds):
            for name, read in readers.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                assert read(clip) == args.frames
                wall[name].append(1000 * (time.perf_counter() - start) / args.frames)
                cpu[name].append(1000 * (time.process_time() - start_cpu) / args.frames)
    print(f"PyAV {av.__version__}, OpenCV {cv2.__version__}; {args.frames} frames of "
          f"{WIDTH} x {HEIGHT} H.264 to RGB arrays; median of {args.rounds} rounds")
    print("| reader | wall ms / frame | CPU ms / frame | writes H.264 |\n|---|---|---|---|")
    for name in readers:
        library = name.split(",")[0]
        print(f"| {name} | {statistics.median(wall[name]):.2f} | "
              f"{statistics.median(cpu[name]):.2f} | {'yes' if writes_h264(library) else 'no'} |")


if __name__ == "__main__":
    main()
