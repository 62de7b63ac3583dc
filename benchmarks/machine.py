"""The machine a figure was measured on: CPU, cores, vector extensions and the plain-loop rate.

    .venv/bin/python benchmarks/machine.py            # prints one line, ~15 s

The plain-loop rate is benchmarks/bottleneck.py's plain way: drawn 320x240
JPEGs decoded, resized to 160 px and run through MobileNetV2 1.0 (random
weights: the same arithmetic as ImageNet's) in batches of 32 in one
``tf.function``: the speed of this machine at graftline's main work. Machines
of the same kind differ by 3x in it (AVX-512 or not), so every published time
in the README names it, and speeds are compared only as ratios from one run.
Other benchmarks import ``describe()`` to print the same line.
"""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cpu() -> str:
    """Model name, cores, RAM and the vector extensions that change TensorFlow's speed and last bits."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")),
                 platform.processor())
    flags = set(next((l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("flags")), []))
    vector = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA")
    mem = next((int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines()
                if l.startswith("MemTotal")), 0) if Path("/proc/meminfo").exists() else 0
    return (f"{os.cpu_count()} cores ({model}), {mem / 2**20:.0f} GiB RAM, {' '.join(vector) or 'no AVX2'}"
            + (f", oneDNN capped at {capped}" if capped else ""))


def drawn_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """n 320x240 JPEGs of smooth colour ramps plus noise (what benchmarks/bottleneck.py --draw makes)."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = np.linspace(0, 1, 320)[None, :, None] * rng.integers(40, 255, 3)
        y = np.linspace(0, 1, 240)[:, None, None] * rng.integers(40, 255, 3)
        image = (x + y) / 2 + rng.normal(0, 20, (240, 320, 3))
        buffer = io.BytesIO()
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def plain_loop_rate(seconds: float = 8.0, batch: int = 32, size: int = 160) -> float:
    """Images per second: decode + resize + MobileNetV2 1.0 at ``size`` px, after one warm-up batch."""
    import keras
    import tensorflow as tf

    from components import images

    model = keras.applications.MobileNetV2(input_shape=(size, size, 3), include_top=False, pooling="avg",
                                           weights=None)
    infer = tf.function(lambda b: model(images.decode_batch(b, size) / 127.5 - 1, training=False))
    jpegs = tf.constant(drawn_jpegs(batch))
    infer(jpegs).numpy()
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        infer(jpegs).numpy()
        done += batch
    return done / (time.perf_counter() - started)


def describe() -> str:
    return f"{cpu()}; plain loop {plain_loop_rate():.0f} img/s (decode + MobileNetV2 1.0 @160, batch 32)"


if __name__ == "__main__":
    print(describe())
