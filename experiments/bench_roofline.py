"""Roofline of the funnel (issue 13): each stage's measured time per batch beside its lower bound,
on ml-100k, the Amazon Toys file and a 1M-item synthetic catalogue, at the default budgets.

The funnel (two-tower FAISS `Flat` retrieval, the GESR and two-tower ESRs, the LSR) is fitted
through `cascade.session.fit_funnel` with a few training steps per stage (this measures speed,
not quality) into a checkpoint cache under /tmp, so a rerun skips training. Then, on the first
`--batches` full test batches (`funnel.prepared.test.batches(B)`), after an untimed pass over
the same batches (lazy initialisation, allocator growth and, on a GPU, the Triton kernel's
autotuning for each new shape bucket), each stage is timed as the pipeline calls it
(`cascade.pipeline.Pipeline`):
- retrieval: `retriever.retrieve(batch, k_retrieval)` (user tower, FAISS search, exclude-seen);
- each ESR: `esr.score(batch, retrieved)` plus the pipeline's top-k_esr selection;
- the LSR: `lsr.score(batch, esr_selection)` plus the top-k_final selection, on each ESR's output.
Measured = the median over batches (and, for the LSR, over both ESRs' inputs). The whole
pipeline (`Pipeline.run_batch`) runs on the same batches too: its per-stage times ("pipeline ms")
add the boundary checks the pipeline does around each stage.

The lower bound of a stage, as the issue defines it, is the sum of three terms (no overlap
between them is assumed):
- FLOPs / the fp32 matrix-product rate: FLOPs are counted with
  `torch.utils.flop_counter.FlopCounterMode` on one batch (matrix products only; SDPA on CPU,
  which it cannot see, through a formula of ours). Where it cannot see the work they are
  analytic: FAISS's inner products, 2 * B * n_items * D; and the retrieval user tower, whose
  `nn.TransformerEncoder` takes a fused fast path under no_grad, is counted on the same call with
  gradients enabled (the decomposed path, the same products). The rate is the best of
  `--repeats` timings of a 2048 x 2048 `torch.mm`, in this process;
- bytes / the memory bandwidth: the stage's weights and caches its ops read on one batch (a
  dispatch mode sees every op: a lookup, an embedding or an index by ids, reads the rows it
  returns, at most the whole table; any other op reads the whole tensor, once), plus, for
  retrieval, the FAISS `Flat` scan of n_items x D fp32 vectors (analytic). Activations are not
  counted. The bandwidth is the best of `--repeats` sums of a 512 MB tensor (bytes read / time);
- selections: the stage's top-k timed alone with `torch.topk` on random scores of the same
  shape, best of `--repeats` (retrieval: top-(k + history width, its over-fetch for
  exclude-seen) of n_items scores per request, in row chunks of at most 32M scores as its exact
  fallback does).
The rates are probed before and after each data set; every bound uses the best probe of the
process. Ratio = measured / bound; share = a stage's part of the funnel's time (retrieval + the
ESR + LSR), per ESR variant. Elementwise work (HMA comparisons, masks, softmax) is in no term,
so a ratio far above 1 says where the code, not the machine, sets the time. On a shared
machine, `--threads 1` keeps torch's thread barriers from waiting on other jobs.

On the data sets of `--index-datasets` (default: the 1M-item one) the retrieval stage is also
served by each FAISS index of `--indexes` (index_factory strings; default Flat, HNSW32,
IVF4096,Flat), built over the fitted stage's item vectors and timed on the same batches
through the stage's own `retrieve`, with build time, size and recall@K against Flat
(bench_indexes.py says exactly what is measured).

    python experiments/bench_roofline.py                            # ml-100k, Toys, 1M items
    python experiments/bench_roofline.py --datasets ml100k,toys     # skip the 1M-item catalogue
    python experiments/bench_roofline.py --datasets large --large-data synthetic:medium
    python experiments/bench_roofline.py --datasets large --indexes Flat HNSW32 IVF1024,Flat

Prints a rich table per data set and writes JSON (atomically) with the machine, versions, the
measured GFLOP/s and GB/s, the exact shapes, every term and the index comparison (per data set,
key `indexes`) to experiments/results/bench_roofline.json (or --out). The data sets are read
from ../shared/datasets, or from the folder the environment variable CASCADE_DATASETS names
(`experiments/gpu_check.sh` sets it on a GPU machine). `--device cuda` runs the stages on the
GPU (FAISS stays on the CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from bench_indexes import DEFAULT_INDEXES, compare_indexes, index_table  # beside this script

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results" / "bench_roofline.json"
SHARED = Path(os.environ.get("CASCADE_DATASETS") or ROOT.parent / "shared" / "datasets")
DATASETS = {"ml100k": str(SHARED / "ml-100k"),
            "toys": str(SHARED / "amazon-toys" / "Toys_and_Games.txt"),
            "large": None}  # --large-data
CACHE = "/tmp/cascade-roofline-cache"
TOPK_CHUNK = 1 << 25  # scores per top-k call, as `stages.retrieval.exact_top_k` chunks rows
aten = torch.ops.aten


def brief(stage: str, steps: int) -> dict:
    loop = {"epochs": 1, "max_steps_per_epoch": steps}
    config: dict = {"train": loop, "valid_requests": 256}
    if stage in ("gesr", "lsr"):
        config["pretrain"] = loop  # else their first phases run their own schedules
    return {"stage": stage, "config": config}


# ---- the machine ---------------------------------------------------------------------------------


def clock(fn, sync) -> tuple[float, object]:
    """(milliseconds, result) of one call of `fn`."""
    sync()
    t0 = time.perf_counter_ns()
    out = fn()
    sync()
    return (time.perf_counter_ns() - t0) / 1e6, out


def probe_machine(device: torch.device, sync, repeats: int, n: int = 2048, mb: int = 512) -> dict:
    """fp32 matrix-product rate (best of `repeats` n x n mm) and read bandwidth (best of
    `repeats` sums of an `mb` MB tensor)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.mm(a, b)
    mm_ms = min(clock(lambda: torch.mm(a, b), sync)[0] for _ in range(repeats))
    del a, b
    x = torch.ones((mb << 20) // 4, device=device)
    x.sum()
    sum_ms = min(clock(lambda: x.sum(), sync)[0] for _ in range(repeats))
    return {"matmul_gflops": 2 * n**3 / mm_ms / 1e6, "matmul_n": n,
            "bandwidth_gbs": x.nbytes / sum_ms / 1e6, "bandwidth_mb": mb}


def topk_ms(rows: int, n: int, k: int, device: torch.device, sync, repeats: int) -> float:
    """Best time of `repeats` top-k of `rows` x `n` random scores (in chunks of <= TOPK_CHUNK)."""
    step = max(1, min(rows, TOPK_CHUNK // max(n, 1)))
    s = torch.randn(step, n, device=device)
    chunks = [min(step, rows - lo) for lo in range(0, rows, step)]

    def run():
        for c in chunks:
            torch.topk(s[:c], min(k, n), dim=1, sorted=True)

    run()
    return min(clock(run, sync)[0] for _ in range(repeats))


# ---- what a stage computes and reads -------------------------------------------------------------


def _sdpa_cpu_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    """SDPA's two products, QK^T and AV (q, k, v: shapes (..., L, E), (..., S, E), (..., S, Ev))."""
    b = math.prod(q[:-2])
    return 2 * b * q[-2] * k[-2] * (q[-1] + v[-1])


_SDPA = aten._scaled_dot_product_flash_attention_for_cpu
# FlopCounterMode looks an op up by its overload first (to decide on decomposing), then counts
# by its packet: both keys are needed
FLOP_FORMULAS = {_SDPA: _sdpa_cpu_flops, _SDPA.default: _sdpa_cpu_flops}
LOOKUPS = {aten.embedding.default, aten.index.Tensor, aten.index_select.default}


def _ptr(t: Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # no storage (sparse, meta)
        return None


class BytesRead(TorchDispatchMode):
    """Bytes of `known` tensors (storage pointer -> bytes) the ops of a call read: a lookup reads
    the rows it returns (at most the whole table), any other op the whole tensor, once."""

    def __init__(self, known: dict[int, int]) -> None:
        super().__init__()
        self.known, self.rows, self.whole = known, {}, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if getattr(func, "is_view", False):  # a view reads nothing; its user will
            return out
        for i, t in enumerate(x for x in tree_leaves((args, kwargs)) if isinstance(x, Tensor)):
            p = _ptr(t)
            if p not in self.known:
                continue
            if i == 0 and func in LOOKUPS and isinstance(out, Tensor):
                self.rows[p] = self.rows.get(p, 0) + out.nbytes
            else:
                self.whole[p] = max(self.whole.get(p, 0), min(t.nbytes, self.known[p]))
        return out

    @property
    def total(self) -> int:
        return sum(max(self.whole.get(p, 0), min(self.rows.get(p, 0), self.known[p]))
                   for p in self.whole.keys() | self.rows.keys())


def stage_tensors(stage) -> dict[int, int]:
    """Storage pointer -> bytes of everything a fitted stage holds: its model's parameters,
    buffers and plain tensor attributes, the stage's fitted tensors (`item_vecs_`) and GESR's
    catalogue cache."""
    model = stage.model_
    found = [*model.parameters(), *model.buffers()]
    for m in model.modules():
        found += [v for v in vars(m).values() if isinstance(v, Tensor)]
    found += [v for v in vars(stage).values() if isinstance(v, Tensor)]
    cache = getattr(model, "_cache", None)
    if dataclasses.is_dataclass(cache):
        found += [getattr(cache, f.name) for f in dataclasses.fields(cache)]
    return {p: t.untyped_storage().nbytes() for t in found
            if isinstance(t, Tensor) and (p := _ptr(t)) is not None}


def count(fn, known: dict[int, int]) -> tuple[int, dict[str, int], int]:
    """(FLOPs, FLOPs by op, bytes of `known` read) of one call of `fn`."""
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as fc, BytesRead(known) as br:
        fn()
    by_op = {str(k): int(v) for k, v in fc.get_flop_counts().get("Global", {}).items()}
    return int(fc.get_total_flops()), by_op, br.total


def rank(stage, batch, cand: Tensor, k: int) -> Tensor:
    """What `Pipeline._rank` does: score (padding scored as item 0, then ranked last), top k."""
    pad = cand < 0
    scores = stage.score(batch, cand.clamp_min(0)).float().masked_fill(pad, float("-inf"))
    return torch.gather(cand, 1, torch.topk(scores, k, dim=1, sorted=True).indices)


# ---- one data set --------------------------------------------------------------------------------


def bench_dataset(key: str, spec: str, args, device: torch.device, sync, console: Console) -> dict:
    from cascade.config import RunConfig
    from cascade.session import fit_funnel

    cfg = RunConfig.from_dict({
        "data": spec, "device": str(device), "batch_size": args.batch_size,
        "cache_dir": args.cache_dir, "retrieval": brief("twotower", args.steps),
        "esr": brief("gesr", args.steps), "esr_baseline": brief("twotower", args.steps),
        "lsr": brief("lsr", args.steps),
    })
    t0 = time.perf_counter()
    funnel = fit_funnel(cfg, progress=False, log=lambda m: console.print(f"[dim]{m}[/dim]"))
    fit_s = time.perf_counter() - t0
    ds, test, bud = funnel.prepared.dataset, funnel.prepared.test, funnel.budgets
    ret, esrs, lsr = funnel.retriever, funnel.esrs, funnel.lsr
    B, n_items = args.batch_size, ds.n_items
    batches = [b.to(device) for b, _ in zip(
        (b for b in test.batches(B) if len(b) == B), range(args.batches))]
    if not batches:
        raise SystemExit(f"{key}: fewer than {B} test requests, no full batch to time")
    pipe = funnel.pipeline()

    def funnel_pass(batch, times: dict | None) -> None:
        ms, cand = clock(lambda: ret.retrieve(batch, bud.retrieval), sync)
        if times is not None:
            times["retrieval"].append(ms)
        for label, esr in esrs.items():
            ms, sel = clock(lambda: rank(esr, batch, cand.ids, bud.esr), sync)
            ms_l, _ = clock(lambda: rank(lsr, batch, sel, bud.final), sync)
            if times is not None:
                times[f"esr:{label}"].append(ms)
                times["lsr"].append(ms_l)

    console.print(f"[dim]{key}: warm-up, then {len(batches)} timed batches of {B}[/dim]")
    for batch in batches:  # untimed: lazy initialisation, allocator growth, and on a GPU the
        funnel_pass(batch, None)  # Triton kernel's autotuning for each new shape bucket
    pipe.run_batch(batches[0], n_items=n_items)
    times: dict[str, list[float]] = {"retrieval": [], **{f"esr:{lb}": [] for lb in esrs}, "lsr": []}
    piped: dict[str, list[float]] = {k: [] for k in times}
    for batch in batches:
        funnel_pass(batch, times)
        out = pipe.run_batch(batch, n_items=n_items)
        piped["retrieval"].append(out.retrieval_ns / 1e6)
        for label, v in out.variants.items():
            piped[f"esr:{label}"].append(v.esr_ns / 1e6)
            piped["lsr"].append(v.lsr_ns / 1e6)

    # what each stage computes and reads, on the first batch
    b0 = batches[0]
    with torch.no_grad():
        cand = ret.retrieve(b0, bud.retrieval).ids
        sel = rank(next(iter(esrs.values())), b0, cand, bud.esr)  # the LSR's input
    n_vecs, D = ret.index_.ntotal, ret.index_.d
    over = b0.hist_items.shape[1] if ret.exclude_seen_ else 0
    with torch.enable_grad():  # the decomposed path: no_grad takes a fused fast path (docstring)
        tower_flops, tower_ops, _ = count(lambda: ret.fitted_model().user(b0), {})
    _, _, ret_bytes = count(lambda: ret.retrieve(b0, bud.retrieval), stage_tensors(ret))
    stages = [{
        "stage": "retrieval", "name": f"twotower {ret.config.index if cfg.index is None else cfg.index}",
        "k_in": n_items, "k_out": bud.retrieval, "flops_counted": tower_flops,
        "flops_analytic": 2 * B * n_vecs * D, "flops_by_op": tower_ops,
        "bytes_weights": ret_bytes, "bytes_scan": 4 * n_vecs * D,
        "topk": [B, n_items, min(bud.retrieval + over, n_items)],
    }]
    for label, esr in esrs.items():
        f, ops, by = count(lambda: rank(esr, b0, cand, bud.esr), stage_tensors(esr))
        stages.append({"stage": f"esr:{label}", "name": f"esr {label}", "k_in": bud.retrieval,
                       "k_out": bud.esr, "flops_counted": f, "flops_analytic": 0,
                       "flops_by_op": ops, "bytes_weights": by, "bytes_scan": 0,
                       "topk": [B, bud.retrieval, bud.esr]})
    f, ops, by = count(lambda: rank(lsr, b0, sel, bud.final), stage_tensors(lsr))
    stages.append({"stage": "lsr", "name": "lsr", "k_in": bud.esr, "k_out": bud.final,
                   "flops_counted": f, "flops_analytic": 0, "flops_by_op": ops,
                   "bytes_weights": by, "bytes_scan": 0, "topk": [B, bud.esr, bud.final]})
    for s in stages:
        s["flops"] = s["flops_counted"] + s["flops_analytic"]
        s["bytes"] = s["bytes_weights"] + s["bytes_scan"]
        s["topk_ms"] = topk_ms(*s["topk"], device, sync, args.repeats)
        s["measured_ms_all"] = times[s["stage"]]
        s["measured_ms"] = statistics.median(times[s["stage"]])
        s["pipeline_ms"] = statistics.median(piped[s["stage"]])

    indexes = None
    if key in args.index_datasets and args.indexes:
        indexes = compare_indexes(
            ret, batches, bud.retrieval, args.indexes, lambda fn: clock(fn, sync),
            lambda m: console.print(f"[dim]{m}[/dim]"), nprobe=args.nprobe, ef_search=args.ef_search)

    gesr = esrs.get("gesr")
    hist = torch.cat([b.hist_len for b in batches]).float()
    return {
        "key": key, "spec": spec, "name": ds.name, "n_users": ds.n_users, "n_items": n_items,
        "n_events": ds.n_events, "n_requests": len(test), "exclude_seen": bool(ret.exclude_seen_),
        "fit_seconds": fit_s, "timed_batches": len(batches),
        "shapes": {
            "B": B, "n_items": n_items, "budgets": bud.as_dict(), "retrieval_overfetch": over,
            "D": {"retrieval": D, **{f"esr:{lb}": e.config.dim for lb, e in esrs.items()},
                  "gesr_moa": gesr.config.moa_dim if gesr is not None else None,
                  "lsr": lsr.config.dim},
            "history_len": {"traffic_width": int(b0.hist_items.shape[1]),
                            "mean": float(hist.mean()), "retrieval": ret.fitted_model().width,
                            "gesr": gesr.config.moa.history_len if gesr is not None else None,
                            "lsr": lsr.fitted_model().width},
        },
        "stages_config": {k: v.to_dict() for k, v in funnel.specs.items()},
        "stages": stages,
        "indexes": indexes,
    }


def finish(rec: dict, machine: dict) -> None:
    """Bounds, ratios and shares of `rec`'s stages under the best rates of the process."""
    flops_s = machine["matmul_gflops"] * 1e9
    bytes_s = machine["bandwidth_gbs"] * 1e9
    by = {s["stage"]: s for s in rec["stages"]}
    for s in rec["stages"]:
        s["compute_ms"] = 1e3 * s["flops"] / flops_s
        s["memory_ms"] = 1e3 * s["bytes"] / bytes_s
        s["bound_ms"] = s["compute_ms"] + s["memory_ms"] + s["topk_ms"]
        s["ratio"] = s["measured_ms"] / s["bound_ms"]
        s["share"] = {}
    rec["funnel"] = {}
    for key in (k for k in by if k.startswith("esr:")):
        parts = [by["retrieval"], by[key], by["lsr"]]
        ms = sum(p["measured_ms"] for p in parts)
        rec["funnel"][key[4:]] = {"measured_ms": ms, "bound_ms": sum(p["bound_ms"] for p in parts),
                                  "pipeline_ms": sum(p["pipeline_ms"] for p in parts)}
        for p in parts:
            p["share"][key[4:]] = p["measured_ms"] / ms
    for r in rec["indexes"] or []:
        if "error" not in r:  # the retrieval bound assumes the Flat scan
            r["x_flat_bound"] = r["retrieve_ms"] / by["retrieval"]["bound_ms"]
    f = rec["funnel"]
    if "gesr" in f and "twotower" in f:
        rec["throughput_gesr_vs_twotower"] = f["twotower"]["measured_ms"] / f["gesr"]["measured_ms"]


def print_table(console: Console, rec: dict) -> None:
    sh = rec["shapes"]
    table = Table(title=f"{rec['name']}: {rec['n_items']:,} items, budgets "
                        f"{sh['budgets']['retrieval']} -> {sh['budgets']['esr']} -> "
                        f"{sh['budgets']['final']}, batches of {sh['B']} (median of "
                        f"{rec['timed_batches']}), history {sh['history_len']['traffic_width']}")
    variants = list(rec["funnel"])
    cols = ("stage", "in -> out", "GFLOP", "MB read", "matmul ms", "memory ms", "top-k ms",
            "bound ms", "measured ms", "pipeline ms", "x bound", "share " + " / ".join(variants))
    for c in cols:
        table.add_column(c, justify="left" if c == "stage" else "right")
    for s in rec["stages"]:
        share = " / ".join(f"{s['share'][v]:.0%}" if v in s["share"] else "-" for v in variants)
        table.add_row(s["name"], f"{s['k_in']:,} -> {s['k_out']:,}",
                      f"{s['flops'] / 1e9:.3f}", f"{s['bytes'] / 1e6:.1f}",
                      f"{s['compute_ms']:.2f}", f"{s['memory_ms']:.2f}", f"{s['topk_ms']:.2f}",
                      f"{s['bound_ms']:.2f}", f"{s['measured_ms']:.2f}", f"{s['pipeline_ms']:.2f}",
                      f"{s['ratio']:.1f}", share)
    console.print(table)
    for v, f in rec["funnel"].items():
        console.print(f"  funnel with esr {v}: {f['measured_ms']:.1f} ms per batch measured "
                      f"({f['pipeline_ms']:.1f} through the pipeline), bound {f['bound_ms']:.1f} ms")
    if "throughput_gesr_vs_twotower" in rec:
        console.print(f"  throughput with GESR / with the two-tower ESR: "
                      f"{rec['throughput_gesr_vs_twotower']:.2f}x")
    if rec["indexes"]:
        console.print(index_table(rec))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", default="ml100k,toys,large",
                    help=f"comma-separated subset of {', '.join(DATASETS)}")
    ap.add_argument("--large-data", default="synthetic:large",
                    help="the data set 'large' stands for (default synthetic:large, 1M items)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--batches", type=int, default=5, help="timed full test batches (median)")
    ap.add_argument("--repeats", type=int, default=5, help="timings of each machine probe")
    ap.add_argument("--steps", type=int, default=5, help="training steps per stage (1 epoch)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (FAISS stays on the CPU)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch and FAISS threads (default: as they start, one per core)")
    ap.add_argument("--cache-dir", default=CACHE, help=f"checkpoint cache (default {CACHE})")
    ap.add_argument("--indexes", nargs="*", default=list(DEFAULT_INDEXES), metavar="SPEC",
                    help="FAISS index_factory strings compared on retrieval, space-separated "
                         f"(default: {' '.join(DEFAULT_INDEXES)}; Flat, the reference, always "
                         "runs; none given: no comparison)")
    ap.add_argument("--index-datasets", default="large",
                    help="comma-separated data sets the index comparison runs on (default large)")
    ap.add_argument("--nprobe", type=int, help="IVF lists probed (default: the stage's)")
    ap.add_argument("--ef-search", type=int, help="HNSW efSearch (default: the stage's)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    keys = [k.strip() for k in args.datasets.split(",") if k.strip()]
    unknown = [k for k in keys if k not in DATASETS]
    if unknown or not keys:
        ap.error(f"--datasets: unknown {', '.join(unknown) or '(none given)'}; "
                 f"known: {', '.join(DATASETS)}")
    args.index_datasets = [k.strip() for k in args.index_datasets.split(",") if k.strip()]
    if unknown := [k for k in args.index_datasets if k not in DATASETS]:
        ap.error(f"--index-datasets: unknown {', '.join(unknown)}; known: {', '.join(DATASETS)}")
    for name in ("nprobe", "ef_search"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    from cascade.stages.retrieval import RetrievalConfig, validate_index_spec

    for spec in args.indexes:  # before any training; the stage's dim is the default (brief())
        try:
            validate_index_spec(spec, RetrievalConfig().dim)
        except ValueError as e:
            ap.error(f"--indexes: {e}")

    import faiss

    from cascade.env import capture
    from cascade.session import resolve_device
    from cascade.util.fsio import atomic_write_bytes

    if args.threads is not None:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    console = Console()
    if not console.is_terminal:  # a log file: rich would wrap the table at 80 columns
        console.width = 160
    device = resolve_device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    probes = [probe_machine(device, sync, args.repeats)]
    records = []
    for key in keys:
        spec = DATASETS[key] or args.large_data
        console.print(f"[bold]{key}[/bold]: {spec}")
        records.append(bench_dataset(key, spec, args, device, sync, console))
        probes.append(probe_machine(device, sync, args.repeats))
    machine = {"matmul_gflops": max(p["matmul_gflops"] for p in probes),
               "bandwidth_gbs": max(p["bandwidth_gbs"] for p in probes),
               "probes": probes, "torch_threads": torch.get_num_threads(),
               "faiss_threads": faiss.omp_get_max_threads(), "device": str(device)}
    console.print(f"machine: fp32 matmul {machine['matmul_gflops']:.1f} GFLOP/s, read bandwidth "
                  f"{machine['bandwidth_gbs']:.1f} GB/s (best of {len(probes)} probes); "
                  f"{machine['torch_threads']} torch / {machine['faiss_threads']} FAISS threads")
    for rec in records:
        finish(rec, machine)
        print_table(console, rec)

    record = {
        "benchmark": "bench_roofline",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "env": capture(sys.argv),
        "machine": machine,
        "batch_size": args.batch_size,
        "train_steps": args.steps,
        "bound": "FLOPs / matmul rate + bytes read / bandwidth + top-k alone (see the docstring)",
        "datasets": records,
        "note": ("a lent GPU machine: the stages on its GPU, FAISS on its CPU" if device.type == "cuda"
                 else "a shared 2-core machine: other jobs may have run at the same time"),
    }
    atomic_write_bytes(args.out, json.dumps(record, indent=2).encode())
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
