"""Run a benchmark as on a CPU with AVX2 only (no AVX-512, no VNNI, no bf16) on a CPU that has more.

    python benchmarks/as_avx2_cpu.py benchmarks/ship_on_cpu.py --data BCCD_Dataset --fp32
    python benchmarks/as_avx2_cpu.py --vnni benchmarks/ship_on_cpu.py --data BCCD_Dataset --fp32

--vnni keeps AVX2's own int8 dot product (AVX-VNNI, as in Intel Core from the 12th generation on,
which has no AVX-512); without it, the CPU is one like Intel's Core chips from Haswell to Comet Lake
or AMD's Zen 1 to 3.

Every library picks its kernels by what the CPU says it has. This holds each one to its AVX2
kernels: PyTorch (ATen, oneDNN, MKL), NumPy and glibc by their own switches, and onnxruntime, which
has none, by a copy of its library in which the two jumps into its AVX-VNNI and AVX-512 kernels are
never taken (onnxruntime 1.32.0 for x86-64 Linux; any other build is refused rather than guessed
at); FFmpeg in the wheels that bundle it (PyAV, OpenCV) by its own switch, but not x264, its H.264
encoder, which has none; PyTorch is told the CPU has no bf16, so odscratch trains and runs in
float32 as there. The script can be a file, a command such as `"$(which odscratch)" train`, or
pytest (`as_avx2_cpu.py pytest`); child processes are held too. Then it checks: Linux says, per thread, when AVX-512
registers were last in use (/proc/<pid>/task/<tid>/arch_status), and the run fails if any thread of
the benchmark's process used them after it started (child processes are held by the same switches
but not watched). What it cannot change is the core, its caches and memory: an older AVX2 CPU is
slower at everything, so compare runtimes by their ratios, not by milliseconds.
"""
import importlib.metadata
import importlib.util
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HELD = "AS_AVX2_CPU"  # set in the child process that runs the benchmark
AVX2_ONLY = {
    "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD,-AVX_VNNI",
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
}
ORT_VERSION = "1.32.0"
# Where onnxruntime picks its kernels (MLAS platform setup), two conditional jumps past the blocks
# that install the faster ones become unconditional: (bytes around the jump, offset of its je).
ORT_JUMPS = {
    # cpuid(7, 1); test eax bit 4 (AVX-VNNI); je
    "AVX-VNNI": (bytes.fromhex("b807000000b9010000000fa2a81074"), 14),
    # test bit 16 of cpuid(7).ebx (AVX512F); je; not xcr0; test its AVX-512 state bits
    "AVX-512": (bytes.fromhex("41f7c200000100740e4c89c048f7d0a8e0"), 7),
}


def onnxruntime_held_to_avx2(folder, vnni):
    """A copy of the installed onnxruntime package under folder whose kernels stop at AVX2 (and
    AVX-VNNI if vnni)."""
    version = importlib.metadata.version("onnxruntime")
    if version != ORT_VERSION:
        sys.exit(f"onnxruntime {version}: only {ORT_VERSION}'s library is known to this script")
    installed = Path(importlib.util.find_spec("onnxruntime").submodule_search_locations[0])
    shutil.copytree(installed, folder / "onnxruntime")
    library = next((folder / "onnxruntime" / "capi").glob("onnxruntime_pybind11_state*.so"))
    code = bytearray(library.read_bytes())
    for name, (pattern, je) in ORT_JUMPS.items():
        if vnni and name == "AVX-VNNI":
            continue
        at = code.find(pattern)
        if at < 0 or code.find(pattern, at + 1) >= 0:
            sys.exit(f"the {name} jump is not found exactly once: not the build this script knows")
        code[at + je] = 0xEB  # je -> jmp
    library.write_bytes(code)


# Python runs sitecustomize at start from PYTHONPATH: it tells PyTorch, once imported, that this CPU
# has no bf16 (odscratch's use_bf16 asks it), in the benchmark's process and every child process;
# and every copy of FFmpeg that a wheel bundles (PyAV's, OpenCV's) that the CPU has no AVX-512
# (av_force_cpu_flags, before the wheel loads the library: it then finds it loaded). x264, the
# H.264 encoder, has no such switch: a benchmark held by this script cannot write H.264.
NO_BF16 = """
import ctypes, glob, importlib.abc, importlib.machinery, site, sys

AV_CPU_FLAG_AVX512 = 0x100000 | 0x200000  # AVX-512 and AVX-512 ICL
for libavutil in sorted({path for folder in site.getsitepackages()
                         for path in glob.glob(folder + "/*.libs/libavutil-*.so*")}):
    ffmpeg = ctypes.CDLL(libavutil)
    ffmpeg.av_force_cpu_flags(ffmpeg.av_get_cpu_flags() & ~AV_CPU_FLAG_AVX512)

class NoBf16(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "torch":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.cpu._is_avx512_bf16_supported = lambda: False
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, NoBf16())
"""


def watch_avx512(used, start):
    """Adds to used each thread of this process whose AVX-512 registers were in use after start.
    Polls, so that threads which end before the benchmark does (a runtime's pool) are seen too."""
    while True:
        since_ms = 1000 * (time.monotonic() - start)
        for task in Path("/proc/self/task").iterdir():
            try:
                last = int((task / "arch_status").read_text().split()[1])  # ms ago, -1: never
                if 0 <= last < since_ms:
                    used.add(f"{(task / 'comm').read_text().strip()} ({task.name})")
            except (FileNotFoundError, ProcessLookupError):  # the thread has just ended
                pass
        time.sleep(0.2)


def main():
    if not Path("/proc/self/arch_status").exists():
        sys.exit("needs Linux on an x86-64 CPU with AVX-512 (/proc/self/arch_status)")
    if os.environ.get(HELD):
        used = set()
        threading.Thread(target=watch_avx512, args=(used, time.monotonic()), daemon=True).start()
        sys.argv = sys.argv[1:]
        try:
            if sys.argv[0] == "pytest":
                import pytest
                code = pytest.main(sys.argv[1:])
            else:
                code = 0
                runpy.run_path(sys.argv[0], run_name="__main__")
        except SystemExit as stop:
            code = stop.code
        time.sleep(0.5)  # one more look
        if used:
            sys.exit(f"AVX-512 was used after all, by {', '.join(used)}: the figures do not count")
        print("checked: no thread of this process used AVX-512 registers during the run")
        sys.exit(code)
    vnni = sys.argv[1:2] == ["--vnni"]
    if len(sys.argv) < 2 + vnni:
        sys.exit("usage: python benchmarks/as_avx2_cpu.py [--vnni] SCRIPT [ITS ARGUMENTS]")
    with tempfile.TemporaryDirectory() as folder:
        onnxruntime_held_to_avx2(Path(folder), vnni)
        (Path(folder) / "sitecustomize.py").write_text(NO_BF16)
        path = os.pathsep.join(p for p in (folder, os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, **AVX2_ONLY, HELD: "1", "PYTHONPATH": path}
        if vnni:
            env["ONEDNN_MAX_CPU_ISA"] = "AVX2_VNNI"
        print(f"held to AVX2{' + AVX-VNNI' if vnni else ' (no VNNI)'}: no AVX-512, no bf16 "
              "(PyTorch, oneDNN, MKL, NumPy, glibc, onnxruntime, FFmpeg)", flush=True)
        command = [sys.executable, __file__, *sys.argv[1 + vnni:]]
        sys.exit(subprocess.run(command, env=env, check=False).returncode)


if __name__ == "__main__":
    main()
