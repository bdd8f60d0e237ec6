"""What the benchmarks share (tools.bench, tools.bench_gpu, tools.gpu_check_decode): timing that
waits for the device, JSON result rows, Llasa-1B's shapes."""

import json
import statistics
import time

import torch


def sync(device: torch.device):
    """Wait for the device's queued work (CUDA); nothing elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fns, device: torch.device, repeats: int) -> list[float]:
    """Median wall seconds of each function in `fns`, called in turn `repeats` times (after the
    caller's warm-up). Interleaving shares any background load fairly between them."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def print_row(name: str, t0: float, **fields) -> None:
    """Print one JSON result line: name, the fields, and the seconds since t0."""
    print(json.dumps({"name": name, **fields, "seconds": round(time.time() - t0, 1)}), flush=True)


# Llasa-1B's shapes (HKUSTAudio/Llasa-1B config.json): what the decode and trainer benchmarks
# build at random.
LLAMA_1B = dict(
    hidden_size=2048,
    num_layers=16,
    num_heads=32,
    num_kv_heads=8,
    intermediate_size=8192,
    vocab=193800,
    tie_word_embeddings=True,
    max_positions=131072,
    rope_scaling=dict(
        rope_type="llama3",
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
)
