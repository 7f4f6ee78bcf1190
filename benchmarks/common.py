"""Shared helpers of the growdense benchmarks: timing, machine description, tables, JSON.

Timing rule (every benchmark): the sides being compared run interleaved in one process
(A, B, B, A, A, B, ...: the order alternates every round, so neither side always runs
second), after warm-up, and each side's figure is the median of its samples. On a
loaded machine both sides see the same load, so their ratio holds even when the
absolute times drift. On CUDA each sample is timed with CUDA events.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ---- machine ---------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> Optional[list[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info(device: str) -> dict:
    """What the numbers were measured on: CPU, threads, load, torch, growdense, GPU."""
    import growdense

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": load_average(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "growdense": growdense.__version__,
        "growdense_cuda_built": growdense.cuda_built(),
        "device": device,
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda_runtime"] = torch.version.cuda
        info["allow_tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        info["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    return info


def setup(threads: Optional[int], device: str) -> dict:
    """Set the CPU thread count (``None``: all logical CPUs), print and return machine info."""
    if threads is None:
        threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: no CUDA device is available here")
    info = machine_info(device)
    print(
        f"# {info['cpu']} ({info['logical_cpus']} logical CPUs), torch.set_num_threads({info['torch_threads']}), "
        f"load average {info['load_average_start']}; torch {info['torch']}, growdense {info['growdense']}"
        + (f"; GPU {info['gpu']}" if "gpu" in info else ""),
        flush=True,
    )
    return info


def finish(info: dict) -> None:
    info["load_average_end"] = load_average()


# ---- timing ------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    device: str = "cpu",
    warmup: int = 3,
    reps: int = 20,
    inner: int = 1,
    max_seconds: Optional[float] = None,
) -> dict[str, list[float]]:
    """Samples (seconds per call) of each function, the functions run interleaved.

    Each round runs every function once, in an order that reverses every round. A
    sample is the time of ``inner`` back-to-back calls divided by ``inner`` (wall clock
    on the CPU, CUDA events on a GPU). ``warmup`` rounds are run and discarded first.
    ``max_seconds`` stops after the round in which the measured time passes it (but
    never before 5 rounds), so a slow configuration cannot stall a run.
    """
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    cuda = device.startswith("cuda")
    for _ in range(warmup):
        for name in names:
            for _ in range(inner):
                fns[name]()
    sync(device)
    started = time.perf_counter()
    for r in range(reps):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            fn = fns[name]
            if cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                for _ in range(inner):
                    fn()
                end.record()
                end.synchronize()
                samples[name].append(begin.elapsed_time(end) / 1e3 / inner)
            else:
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                samples[name].append((time.perf_counter() - t0) / inner)
        if max_seconds is not None and r >= 4 and time.perf_counter() - started > max_seconds:
            break
    return samples


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def spread(xs: Sequence[float]) -> float:
    """Interquartile range relative to the median (a noise indicator)."""
    if len(xs) < 4:
        return float("nan")
    q = statistics.quantiles(xs, n=4)
    return (q[2] - q[0]) / statistics.median(xs)


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over rounds of a[i] / b[i]: robust to load that changes between rounds."""
    return statistics.median(x / y for x, y in zip(a, b))


def summarize(samples: dict[str, list[float]]) -> dict[str, dict]:
    return {
        name: {"median_s": median(xs), "iqr_rel": spread(xs), "n": len(xs)} for name, xs in samples.items()
    }


# ---- formatting ----------------------------------------------------------------------
def fmt_time(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def machine_line(info: dict) -> str:
    """One line describing the machine, for the top of a table."""
    parts = [
        f"{info['cpu']}, {info['logical_cpus']} logical CPUs, torch.set_num_threads({info['torch_threads']})",
        f"load average {info.get('load_average_start')} at start, {info.get('load_average_end')} at end",
        f"torch {info['torch']}, growdense {info['growdense']}",
    ]
    if "gpu" in info:
        parts.insert(1, f"GPU {info['gpu']}")
    return "; ".join(parts)


def write_json(name: str, payload: dict, path: Optional[str] = None) -> Path:
    """Write ``payload`` to ``path`` (default: ``benchmarks/results/<name>.json``)."""
    out = Path(path) if path else RESULTS_DIR / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_plain(payload), indent=2, allow_nan=False) + "\n")
    return out


def _plain(value):
    """``value`` with NaN/inf as None and torch objects as strings (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    return value


def report(name: str, args, info: dict, header: Sequence[str], table: Sequence[Sequence[object]],
           notes: Sequence[str], payload: dict, *, after: Sequence[str] = (), tag: str = "") -> Path:
    """The shared ending of a benchmark: the machine line, the notes, the markdown table, the
    lines ``after`` it (goals, verdicts), and the JSON.

    The JSON goes to ``args.json`` or ``benchmarks/results/<name>-<cpu|cuda>[-<tag>][-quick].json``
    and holds ``benchmark``, ``command`` and ``machine`` plus ``payload``. Returns its path.
    """
    print()
    print(f"Machine: {machine_line(info)}.")
    for note in notes:
        print(note)
    print()
    print(markdown_table(header, table))
    if after:
        print()
        for line in after:
            print(line)
    device = "cuda" if str(args.device).startswith("cuda") else "cpu"
    stem = f"{name}-{device}" + (f"-{tag}" if tag else "") + ("-quick" if args.quick else "")
    path = write_json(stem, {"benchmark": name, "command": command_line(), "machine": info, **payload}, args.json)
    print(f"\nwrote {path}")
    return path


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])


def add_common_args(parser, default_device: str = "cpu") -> None:
    parser.add_argument("--device", default=default_device, help="cpu or cuda (default: %(default)s)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch.set_num_threads (default %(default)s: on a shared machine, OpenMP threads that wait at "
        "barriers for a descheduled peer turn microsecond ops into millisecond ones; use the core count on "
        "a quiet machine)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repetitions (a smoke run)")
    parser.add_argument("--json", default=None, help="where to write the JSON (default: benchmarks/results/)")
    parser.add_argument("--seed", type=int, default=0)


# ---- memory ------------------------------------------------------------------------------
class NewBytes:
    """Bytes of new tensor memory that the ops run inside the block return.

    Counts every op output whose storage is not one of its inputs' (views and in-place
    results are not new memory), on any device; on CUDA it also records the growth of
    the caching allocator's ``allocated_bytes`` counter. Memory a C++ kernel allocates
    and frees internally is not seen; what it returns is.

        with NewBytes() as nb:
            work()
        nb.bytes
    """

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.bytes = 0
        self.largest = 0
        self.cuda_allocated = None

    def __enter__(self) -> "NewBytes":
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                inputs = {
                    t.untyped_storage().data_ptr()
                    for t in torch.utils._pytree.tree_leaves((args, kwargs))
                    if isinstance(t, torch.Tensor)
                }
                for t in torch.utils._pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                        n = t.untyped_storage().nbytes()
                        counter.bytes += n
                        counter.largest = max(counter.largest, n)
                return out

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self._cuda_start = torch.cuda.memory_stats()["allocated_bytes.all.allocated"]
        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.cuda_allocated = torch.cuda.memory_stats()["allocated_bytes.all.allocated"] - self._cuda_start
