"""Training-step time and peak memory of the context normalization layers, as ratios to native norms.

One training step is the forward of a layer plus the backward of its output
against a fixed random gradient (input gradient and parameter gradients
included). Two cases:

- ``conv``: maps (N, C, H, W) = (64, 64, 32, 32), channel_dim=1, reference nn.BatchNorm2d(64);
- ``tokens``: tokens (N, L, C) = (64, 197, 384), channel_dim=-1, reference nn.LayerNorm(384).

For each case, each K and each layer (ContextNorm, ContextNormX,
AdaptiveContextNorm, MixtureNorm, ModeNorm, and ``loop``: one nn.BatchNorm per
context applied to the boolean-mask sub-batch of that context and scattered
back, the scheme of the authors' public code), the script prints the median
step time and the peak memory as ratios to the native reference measured in
the same run and mode, eager and compiled (torch.compile of the layer, default
mode; the reference is compiled too). Context ids are drawn uniformly in
[0, K) by a seeded torch.Generator.

Timing: every entry (reference and each (layer, K)) is warmed up, then all
entries are run round-robin, one step each per round, in a new random order
every round (in a fixed order, the state a heavy step leaves behind biases the
step after it: ContextNorm at K=1, run right after the K=32 loop, measured
1.5x its real time); the median over rounds is reported. torch.cuda.synchronize
brackets each step on CUDA.

Peak memory, CPU: one step runs under torch.profiler with profile_memory=True.
The profiler's FunctionEvents add every allocation to the memory of each op
that encloses it (and only allocations outside any op appear as "[memory]"
events), so the timeline is read from the raw allocator records instead:
``prof.profiler.kineto_results.events()`` named "[memory]", one per
allocation (positive bytes) or free (negative bytes). Sorted by start time,
their running sum is the memory allocated since the step began; the peak is
its maximum. The input, the output gradient and the layer's parameters exist
before the step and gradients are cleared (set to None) before it, so the
peak counts what the step itself adds: output, saved tensors, temporaries,
input and parameter gradients. Check on nn.BatchNorm2d, conv case (16 MiB
tensors): the peak is 48 MiB = output (16) + input gradient (16) + a 16 MiB
``empty_like`` buffer that aten::native_batch_norm_backward allocates and frees
within a microsecond without writing it. The resident-memory peak is thus
nearer 32 MiB, which is what the compiled BatchNorm2d shows; the ratios
compare allocator peaks throughout.
Peak memory, CUDA: torch.cuda.max_memory_allocated after
reset_peak_memory_stats, minus memory_allocated before the step.

Compiled runs use ``torch.compile(layer, dynamic=False)``: every (layer, K)
gets kernels specialised to its shapes, as a model with fixed shapes gets.
Left to automatic-dynamic, the second K compiled for a layer class would
switch that class to symbolic shapes and the numbers would depend on the
sweep order. For the same reason dynamo's recompile limit is raised: all
instances of a layer class share one code object and so one cache.
MixtureNorm is run eager only (its EM start branches in Python on its
buffers).

CPU timings: glibc returns large freed blocks to the OS, and every fresh
16 MiB buffer then page-faults on first touch, which dominates and scatters
the timings. Unless MALLOC_MMAP_THRESHOLD_ is already set or ``--raw-malloc``
is given, the script re-executes itself with large mmap/trim thresholds.
Other processes on the CPUs stall the intra-op threads at every parallel
region and inflate the timings, unevenly across layers; the script samples
/proc/stat while it sleeps, before the run and after each table, and warns
when other processes kept the CPUs busy.

Examples::

    python benchmarks/bench_norms.py --quick
    python benchmarks/bench_norms.py --no-compile --cases conv
    python benchmarks/bench_norms.py --json outputs/bench.json
    python benchmarks/bench_norms.py --device cuda
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field, fields
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch._dynamo.utils import counters
from torch.autograd import DeviceType

from ctxnorm_hf.norms import AdaptiveContextNorm, ContextNorm, ContextNormX, MixtureNorm, ModeNorm

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "8589934592"}
DEFAULT_KS = (1, 2, 4, 8, 20, 32)
QUICK_KS = (1, 4)
MIB = 2.0**20
RECOMPILE_LIMIT = 64


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """An input shape, its channel dim and the native norm the layers are compared with."""

    name: str
    shape: Tuple[int, ...]
    channel_dim: int
    reference: Callable[[int], nn.Module]
    reference_name: str

    @property
    def channels(self) -> int:
        return self.shape[self.channel_dim]


def make_cases(quick: bool) -> Dict[str, Case]:
    """The benchmark cases, full size or tiny (``quick``) shapes."""
    conv_shape = (8, 16, 8, 8) if quick else (64, 64, 32, 32)
    token_shape = (8, 16, 32) if quick else (64, 197, 384)
    return {
        "conv": Case("conv", conv_shape, 1, nn.BatchNorm2d, "nn.BatchNorm2d"),
        "tokens": Case("tokens", token_shape, -1, nn.LayerNorm, "nn.LayerNorm"),
    }


# --------------------------------------------------------------------------- layers


class PerContextLoop(nn.Module):
    """The authors' scheme: one BatchNorm per context on the boolean-mask sub-batch, scattered back.

    Args:
        norms: K BatchNorm layers, one per context.
        flatten_positions: normalise the (n * L, C) rows of a context's (n, L, C)
            tokens with a BatchNorm1d (tokens case) instead of its sub-batch as is.
    """

    def __init__(self, norms: Sequence[nn.Module], flatten_positions: bool) -> None:
        super().__init__()
        self.norms = nn.ModuleList(norms)
        self.flatten_positions = flatten_positions

    def forward(self, x: torch.Tensor, context_ids: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        for k, norm in enumerate(self.norms):
            mask = context_ids == k
            if not bool(mask.any()):
                continue
            sub = x[mask]
            if self.flatten_positions:
                out[mask] = norm(sub.reshape(-1, sub.shape[-1])).view_as(sub)
            else:
                out[mask] = norm(sub)
        return out


def build_loop(case: Case, k: int) -> nn.Module:
    """K BatchNorm2d (conv) or BatchNorm1d over token rows (tokens), looped over contexts."""
    if case.channel_dim == 1:
        return PerContextLoop([nn.BatchNorm2d(case.channels) for _ in range(k)], flatten_positions=False)
    return PerContextLoop([nn.BatchNorm1d(case.channels) for _ in range(k)], flatten_positions=True)


@dataclass(frozen=True)
class LayerSpec:
    """How to build a layer for a case and K, and how to call it."""

    label: str
    build: Callable[[Case, int], nn.Module]
    takes_ids: bool
    skip_compile: Optional[str] = None  # why compiled runs are skipped, if they are


LAYERS: Dict[str, LayerSpec] = {
    "loop": LayerSpec("loop (BN per context)", build_loop, takes_ids=True),
    "cn": LayerSpec(
        "ContextNorm", lambda case, k: ContextNorm(case.channels, k, channel_dim=case.channel_dim), takes_ids=True
    ),
    "cnx": LayerSpec(
        "ContextNormX", lambda case, k: ContextNormX(case.channels, k, channel_dim=case.channel_dim), takes_ids=True
    ),
    "acn": LayerSpec(
        "AdaptiveContextNorm",
        lambda case, k: AdaptiveContextNorm(case.channels, k, channel_dim=case.channel_dim),
        takes_ids=False,
    ),
    "mixnorm": LayerSpec(
        "MixtureNorm",
        lambda case, k: MixtureNorm(case.channels, k, channel_dim=case.channel_dim),
        takes_ids=False,
        skip_compile="data-dependent Python in its EM start; not required to compile",
    ),
    "modenorm": LayerSpec(
        "ModeNorm", lambda case, k: ModeNorm(case.channels, k, channel_dim=case.channel_dim), takes_ids=False
    ),
}
NATIVE = "native"


# --------------------------------------------------------------------------- measurement


@dataclass
class Entry:
    """One thing timed: the native reference (k None) or a (layer, K), in one mode."""

    case: str
    mode: str
    layer: str
    k: Optional[int]
    step: Optional[Callable[[], None]] = field(default=None, repr=False)
    clear: Optional[Callable[[], None]] = field(default=None, repr=False)
    times_ms: List[float] = field(default_factory=list)
    peak_mib: Optional[float] = None
    first_call_s: Optional[float] = None
    graphs_in_warmup: int = 0
    recompiles_in_timing: int = 0
    error: Optional[str] = None
    note: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.note is None

    @property
    def median_ms(self) -> Optional[float]:
        return statistics.median(self.times_ms) if self.times_ms else None

    def to_json(self) -> Dict[str, object]:
        record: Dict[str, object] = {item.name: getattr(self, item.name) for item in fields(self) if item.repr}
        record["median_ms"] = self.median_ms
        if len(self.times_ms) >= 4:
            quartiles = statistics.quantiles(self.times_ms, n=4)
            record["iqr_ms"] = [quartiles[0], quartiles[2]]
        return record


def compiled_graph_count() -> int:
    """Dynamo graphs compiled so far in this process."""
    return counters["stats"]["unique_graphs"]


def synchronizer(device: torch.device) -> Callable[[], None]:
    """What waits for queued kernels: torch.cuda.synchronize on CUDA, nothing on CPU."""
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def make_step(
    module: nn.Module, runner: Callable[..., torch.Tensor], takes_ids: bool, x: torch.Tensor, ids: torch.Tensor, grad: torch.Tensor
) -> Tuple[Callable[[], None], Callable[[], None]]:
    """(step, clear): one forward + backward of ``runner`` (the module or its compiled wrapper), and a
    reset of the input and parameter gradients to None so that every step allocates them afresh."""

    def step() -> None:
        out = runner(x, ids) if takes_ids else runner(x)
        out.backward(grad)

    def clear() -> None:
        x.grad = None
        module.zero_grad(set_to_none=True)

    return step, clear


def cpu_peak_bytes(step: Callable[[], None]) -> int:
    """Peak of the bytes allocated during ``step`` on CPU, from the profiler's raw allocator records."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True, record_shapes=False) as prof:
        step()
    records = [
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == DeviceType.CPU
    ]
    live = peak = 0
    for _, nbytes in sorted(records, key=lambda record: record[0]):
        live += nbytes
        peak = max(peak, live)
    return peak


def cuda_peak_bytes(step: Callable[[], None]) -> int:
    """max_memory_allocated during ``step`` minus memory_allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def short_error(error: BaseException) -> str:
    """The exception's type and first message line, for a table cell."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def prepare(entry: Entry, warmup: int, sync: Callable[[], None], peak: Callable[[Callable[[], None]], int]) -> None:
    """Warm up (compiling on the first call if compiled), then measure the peak memory; record failures."""
    graphs_before = compiled_graph_count()
    try:
        for index in range(warmup):
            entry.clear()
            sync()
            start = time.perf_counter()
            entry.step()
            sync()
            if index == 0:
                entry.first_call_s = time.perf_counter() - start
        entry.clear()
        entry.peak_mib = peak(entry.step) / MIB
        entry.clear()
    except Exception as error:  # a layer that fails is reported in its table cell
        entry.error = short_error(error)
        entry.step = entry.clear = None
    entry.graphs_in_warmup = compiled_graph_count() - graphs_before


def time_round_robin(entries: Sequence[Entry], repeats: int, sync: Callable[[], None], seed: int) -> None:
    """Run every entry once per round and record the step times.

    Each round runs the entries in a fresh random order: in a fixed (or only
    rotated) order every entry would always follow the same one, and the
    state a heavy step leaves behind (caches, allocator) would bias its
    successor's time.
    """
    live = [entry for entry in entries if entry.ok]
    order = random.Random(seed)
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            for entry in order.sample(live, len(live)):
                entry.clear()
                graphs_before = compiled_graph_count()
                sync()
                start = time.perf_counter()
                entry.step()
                sync()
                entry.times_ms.append((time.perf_counter() - start) * 1e3)
                entry.recompiles_in_timing += compiled_graph_count() - graphs_before
    finally:
        gc.enable()
    for entry in live:
        entry.clear()


# --------------------------------------------------------------------------- one table


@dataclass(frozen=True)
class Settings:
    device: torch.device
    ks: Tuple[int, ...]
    layers: Tuple[str, ...]
    repeats: int
    warmup: int
    seed: int


def context_ids(k: int, batch: int, seed: int, device: torch.device) -> torch.Tensor:
    """(batch,) ids drawn uniformly in [0, k) by a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, k, (batch,), generator=generator).to(device)


def build_entries(case: Case, mode: str, settings: Settings, x: torch.Tensor, grad: torch.Tensor) -> List[Entry]:
    """The native reference and every (layer, K) of a case in one mode, ready to warm up."""
    native = LayerSpec(case.reference_name, lambda case, k: case.reference(case.channels), takes_ids=False)
    jobs: List[Tuple[str, Optional[int], LayerSpec]] = [(NATIVE, None, native)]
    jobs += [(name, k, LAYERS[name]) for name in settings.layers for k in settings.ks]
    entries = []
    for name, k, spec in jobs:
        entry = Entry(case.name, mode, name, k)
        entries.append(entry)
        if mode == "compiled" and spec.skip_compile:
            entry.note = spec.skip_compile
            continue
        module = spec.build(case, k or 1).to(settings.device).train()
        runner = torch.compile(module, dynamic=False) if mode == "compiled" else module
        ids = context_ids(k or 1, x.shape[0], settings.seed, settings.device)
        entry.step, entry.clear = make_step(module, runner, spec.takes_ids, x, ids, grad)
    return entries


def run_table(case: Case, mode: str, settings: Settings) -> List[Entry]:
    """Measure one case in one mode and print its markdown table."""
    generator = torch.Generator().manual_seed(settings.seed)
    x = torch.randn(case.shape, generator=generator).to(settings.device).requires_grad_()
    grad = torch.randn(case.shape, generator=generator).to(settings.device)
    sync = synchronizer(settings.device)
    peak = cuda_peak_bytes if settings.device.type == "cuda" else cpu_peak_bytes

    started = time.perf_counter()
    entries = build_entries(case, mode, settings, x, grad)
    for entry in entries:
        if entry.note is None:
            prepare(entry, settings.warmup, sync, peak)
            if mode == "compiled":
                status = entry.error or f"first call {entry.first_call_s:.1f} s"
                print(f"  [{case.name}/{mode}] {entry.layer} K={entry.k}: {status}", file=sys.stderr, flush=True)
    prepared = time.perf_counter()
    time_round_robin(entries, settings.repeats, sync, settings.seed)
    print(render_table(case, mode, entries, settings))
    check_quiet("just after this table")
    print(
        f"({len(entries)} entries; warm-up/compile {prepared - started:.1f} s, "
        f"timing {time.perf_counter() - prepared:.1f} s)\n",
        flush=True,
    )
    return entries


def render_table(case: Case, mode: str, entries: Sequence[Entry], settings: Settings) -> str:
    """Markdown: rows = layers, columns = K, cells = time ratio / memory ratio to the native reference."""
    native = next(entry for entry in entries if entry.layer == NATIVE)
    heading = f"### {case.name}: x {tuple(case.shape)}, channel_dim={case.channel_dim}, {mode}"
    if not native.ok:
        return f"{heading}\n\nnative {case.reference_name} failed: {native.error}\n"
    lines = [
        heading,
        "",
        f"native {case.reference_name} ({mode}): {native.median_ms:.3f} ms median over {len(native.times_ms)}, "
        f"peak {native.peak_mib:.3g} MiB. Cells: time ratio / peak-memory ratio to it.",
        "",
        "| layer | " + " | ".join(f"K={k}" for k in settings.ks) + " |",
        "|---|" + "---|" * len(settings.ks),
    ]
    by_key = {(entry.layer, entry.k): entry for entry in entries}
    footnotes = set()
    for name in settings.layers:
        cells = []
        for k in settings.ks:
            entry = by_key[(name, k)]
            cell, marks = format_cell(entry, native)
            footnotes.update(marks)
            cells.append(cell)
        lines.append(f"| {LAYERS[name].label} | " + " | ".join(cells) + " |")
    notes = {
        "†": "† recompiled during the timed rounds (the median may include compilation).",
        "‡": "‡ more than one dynamo graph compiled in warm-up (graph breaks or recompiles).",
        "§": "§ no dynamo graph compiled: torch.compile skipped the whole forward, which ran eager.",
    }
    lines += [""] + [notes[mark] for mark in sorted(footnotes)]
    skipped = sorted({(LAYERS[e.layer].label, e.note) for e in entries if e.note})
    lines += [f"{label}: skipped ({note})." for label, note in skipped]
    return "\n".join(lines).rstrip() + "\n"


def format_cell(entry: Entry, native: Entry) -> Tuple[str, List[str]]:
    """The table cell of an entry and the footnote marks it uses."""
    if entry.note:
        return "skipped", []
    if entry.error:
        return "error: " + entry.error.replace("|", "/")[:90], []
    marks = []
    if entry.recompiles_in_timing:
        marks.append("†")
    if entry.mode == "compiled" and entry.graphs_in_warmup > 1:
        marks.append("‡")
    if entry.mode == "compiled" and entry.graphs_in_warmup == 0:
        marks.append("§")
    cell = f"{entry.median_ms / native.median_ms:.2f} / {entry.peak_mib / native.peak_mib:.2f}"
    return cell + "".join(marks), marks


# --------------------------------------------------------------------------- CLI


def parse_list(text: str, choices: Sequence[str], what: str) -> Tuple[str, ...]:
    """argparse type of --cases / --layers: comma-separated names among ``choices``."""
    items = tuple(item.strip() for item in text.split(",") if item.strip())
    unknown = [item for item in items if item not in choices]
    if unknown or not items:
        raise argparse.ArgumentTypeError(f"unknown {what} {unknown or text!r}; choose from {', '.join(choices)}")
    return items


def parse_ks(text: str) -> Tuple[int, ...]:
    """argparse type of --ks: comma-separated integers >= 1."""
    try:
        ks = tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ks takes comma-separated integers, got {text!r}") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"--ks needs integers >= 1, got {text!r}")
    return ks


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        description="Training-step time and peak memory of CN, CN-X, ACN, MixtureNorm, ModeNorm and a "
        "per-context BatchNorm loop, as ratios to nn.BatchNorm2d (conv maps) / nn.LayerNorm (tokens).",
    )
    parser.add_argument("--cases", type=lambda s: parse_list(s, ("conv", "tokens"), "case"), default=("conv", "tokens"),
                        help="comma-separated cases (default both): conv (64x64x32x32 vs BatchNorm2d), tokens (64x197x384 vs LayerNorm)")
    parser.add_argument("--ks", type=parse_ks, default=None,
                        help=f"comma-separated numbers of contexts (default {','.join(map(str, DEFAULT_KS))}; "
                        f"{','.join(map(str, QUICK_KS))} with --quick)")
    parser.add_argument("--layers", type=lambda s: parse_list(s, tuple(LAYERS), "layer"), default=tuple(LAYERS),
                        help=f"comma-separated layers among {','.join(LAYERS)} (default all)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also measure torch.compile'd layers (default: on, off with --quick)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved timing rounds, median reported (default 30; 2 with --quick)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps per entry before timing; the first compiles (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: tiny shapes, 2 rounds, K in 1,4, eager only unless --compile")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to run (default cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for the run (default: torch's choice); 1 is steadier on a busy machine")
    parser.add_argument("--seed", type=int, default=0, help="seed of inputs, gradients, ids and layer init (default 0)")
    parser.add_argument("--json", metavar="PATH", default=None, help="write all raw numbers to this JSON file")
    parser.add_argument("--raw-malloc", action="store_true",
                        help="do not re-execute with large glibc mmap/trim thresholds (CPU timings get noisy)")
    return parser


def ensure_malloc_settings(raw_malloc: bool) -> None:
    """Re-execute this script with glibc keeping large freed blocks, unless told not to or already set."""
    if raw_malloc or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    settings = " ".join(f"{name}={value}" for name, value in MALLOC_ENV.items())
    print(
        f"re-executing with {settings}: glibc otherwise returns every large freed block to the OS, so each fresh "
        "16 MiB buffer page-faults again, which dominates and scatters CPU timings (--raw-malloc to keep glibc's "
        "defaults)",
        flush=True,
    )
    os.environ.update(MALLOC_ENV)
    os.execv(sys.executable, [sys.executable, *sys.argv])


def _cpu_times() -> Tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat") as handle:
        values = [int(value) for value in handle.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def other_cpu_load(interval_s: float = 0.5) -> Optional[float]:
    """Share of the CPUs busy while this process sleeps for ``interval_s``: the load of other processes.

    None where /proc/stat is not readable (not Linux).
    """
    try:
        busy_before, total_before = _cpu_times()
        time.sleep(interval_s)
        busy_after, total_after = _cpu_times()
    except OSError:
        return None
    return (busy_after - busy_before) / max(total_after - total_before, 1)


def check_quiet(when: str) -> None:
    """Warn when other processes keep the CPUs busy: contended threads wait at every parallel region."""
    load = other_cpu_load()
    if load is not None and load > 0.2:
        print(
            f"warning: other processes kept {load:.0%} of the CPUs busy {when}; the timings are inflated "
            "(layers with many small ops most). Use a quiet machine, or --threads 1 for steadier ratios.\n",
            flush=True,
        )


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Parse the command line, measure every requested case and mode, print the tables."""
    args = build_parser().parse_args(argv)
    ensure_malloc_settings(args.raw_malloc)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    compile_too = (not args.quick) if args.compile is None else args.compile
    settings = Settings(
        device=torch.device(args.device),
        ks=args.ks or (QUICK_KS if args.quick else DEFAULT_KS),
        layers=args.layers,
        repeats=args.repeats or (2 if args.quick else 30),
        warmup=args.warmup or (1 if args.quick else 3),
        seed=args.seed,
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(settings.seed)
    torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    cases = make_cases(args.quick)
    modes = ("eager", "compiled") if compile_too else ("eager",)
    print(
        f"torch {torch.__version__}, device {settings.device}, {torch.get_num_threads()} threads, "
        f"repeats {settings.repeats}, warm-up {settings.warmup}, modes {', '.join(modes)}, "
        f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')}\n",
        flush=True,
    )
    check_quiet("before the run")
    started = time.perf_counter()
    results: List[Entry] = []
    for case_name in args.cases:
        for mode in modes:
            results += run_table(cases[case_name], mode, settings)
    wall_s = time.perf_counter() - started
    print(f"total {wall_s:.1f} s")
    if args.json:
        write_json(args.json, args, settings, cases, results, wall_s)


def write_json(
    path: str, args: argparse.Namespace, settings: Settings, cases: Dict[str, Case], results: Sequence[Entry], wall_s: float
) -> None:
    """Write the run's settings and every entry's raw numbers (step times, peaks, compile facts)."""
    meta = {
        "argv": sys.argv,
        "torch": torch.__version__,
        "device": str(settings.device),
        "threads": torch.get_num_threads(),
        "repeats": settings.repeats,
        "warmup": settings.warmup,
        "seed": settings.seed,
        "ks": list(settings.ks),
        "malloc_env": {name: os.environ.get(name) for name in MALLOC_ENV},
        "cases": {
            name: {"shape": list(case.shape), "channel_dim": case.channel_dim, "reference": case.reference_name}
            for name, case in cases.items()
            if name in args.cases
        },
        "wall_s": wall_s,
    }
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, "w") as handle:
        json.dump({"meta": meta, "results": [entry.to_json() for entry in results]}, handle, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
