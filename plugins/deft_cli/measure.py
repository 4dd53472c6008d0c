"""Time and memory measurements shared by `deft demo --adaptive`, `deft bench` (and `--inference`) and benchmarks/,
the same on CPU and CUDA.

Time: `timed` (seconds per call, the device's queued work included); `interleaved` takes turns between several
things to time, round after round, the order rotating (`rotated`), so machine noise and caches hit them alike.

Memory is what torch's allocator holds, not the process size, so Python, libraries and other models living in the
same process do not blur it:
- CUDA: torch.cuda.max_memory_allocated() during the measured call, minus what was allocated when it started;
- CPU:  the torch profiler's allocation events (profile_memory=True) during the call, summed in time order; its peak.
Either way the peak *increase* during the call is added to the bytes the measured model holds throughout
(parameters, buffers and, in training, the optimizer state): `resident + peak increase`.
"""

from __future__ import annotations

import pathlib
import platform
import random
import statistics
import time

import torch

MEMORY_KIND = {
    "cuda": "torch.cuda.max_memory_allocated during the call (peak increase) + the model's parameters, buffers "
            "and optimizer state",
    "cpu": "peak of torch's CPU allocator during the call (torch.profiler profile_memory events) + the model's "
           "parameters, buffers and optimizer state",
}


def memory_kind(device) -> str:
    return MEMORY_KIND["cuda" if torch.device(device).type == "cuda" else "cpu"]


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device="cpu", calls: int = 1) -> float:
    """Seconds `fn()` takes (the mean over `calls` calls in a row), the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def rotated(items: list, turn: int) -> list:
    """`items` starting at position turn (mod its length): who goes first changes from turn to turn."""
    turn %= len(items)
    return items[turn:] + items[:turn]


def interleaved(timers: dict, rounds: int) -> dict[str, list[float]]:
    """{name: [seconds per round]}: each round calls every timer (a function returning the seconds it measured)
    once, back to back, in rotated order (so none always runs on the caches another left); round 0 is a warm-up
    (lazy inits, allocator, caches) and is dropped."""
    names = list(timers)
    times = {name: [] for name in names}
    for r in range(rounds + 1):
        for name in rotated(names, r):
            seconds = timers[name]()
            if r:
                times[name].append(seconds)
    return times


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform says."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_increase_bytes(fn, device) -> int:
    """The peak of the bytes torch allocates on `device` during `fn()`, above what it held when `fn` started."""
    if torch.device(device).type == "cuda":
        synchronize(device)
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated() - start)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return int(peak)


def resident_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of the model's parameters and buffers, plus the optimizer's state tensors."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors.update({id(t): t for t in state.values() if isinstance(t, torch.Tensor)})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def median(values) -> float:
    return float(statistics.median(values))


def paired_ratio(ours, reference, resamples: int = 2000) -> tuple[float, float, float]:
    """(median over rounds of ours[r] / reference[r], and a bootstrap 95% interval of that median). Each round's
    two times were measured back to back, so load that drifts over a run (other processes, clock changes) hits
    both and cancels in the ratio, where a ratio of two overall medians keeps it."""
    ratios = [a / b for a, b in zip(ours, reference, strict=True)]
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return median(ratios), medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


@torch.inference_mode()
def compare_inference(models: dict, batches: list[dict], device, rounds: int = 5) -> dict:
    """Forward-only runtime and memory of each model on the same `batches` (labels dropped). The models take
    turns within every round (`interleaved`, after a warm-up round), so machine noise hits them alike; runtime =
    median over rounds of the time for all batches; memory = resident bytes + peak increase over the largest
    batch."""
    inputs = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    run = lambda model: [model(**x) for x in inputs]
    for model in models.values():
        model.eval()
    times = interleaved({name: (lambda model=model: timed(lambda: run(model), device)) for name, model in models.items()},
                        rounds)
    largest = max(inputs, key=lambda x: x["input_ids"].numel())
    out = {}
    for name, model in models.items():
        peak = peak_increase_bytes(lambda: model(**largest), device)
        out[name] = {"runtime_s": median(times[name]), "runtime_s_all": [round(t, 5) for t in times[name]],
                     "memory_mb": (resident_bytes(model) + peak) / 2**20,
                     "parameters": sum(p.numel() for p in model.parameters())}
    return out
