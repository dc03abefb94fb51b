"""Benchmark of target-aware attention (`cascade.kernels.target_attention`).

CPU: the decomposed `torch` path against the per-candidate `ref` (the specification) at batch
32, history 200, 1000 candidates, 2 heads x 32 dims (target: torch >= 20x faster). `ref` costs
O(n N^2 d) and is linear in the number of candidates (each candidate is its own sequence), so it
is timed on a subset of candidates and scaled to the full count; the output says so.

GPU (when CUDA is available): the Triton kernel against the torch path, the torch path under
torch.compile, and `scaled_dot_product_attention` over [history ; candidates] with the target
mask given as an explicit boolean mask (softmax only: SDPA has no SiLU attention), at the shapes
above and at history 1000 / 2000 candidates (target: Triton >= 2x faster than the best PyTorch
path). Every GPU timing is CUDA events around one call, warm-up (and autotuning) excluded, L2
flushed before each repeat, median of the repeats. Achieved memory bandwidth = the bytes of
q/k/v (and outputs) each call must move at least once / time, against the device's peak
(from NVML or the device name) and a measured device-to-device copy.

Histories are full length (hist_len = N for every request): the worst case for every path.

    python experiments/bench_attention.py            # the target shapes
    python experiments/bench_attention.py --quick    # small shapes, seconds

Prints a rich table and writes JSON (atomically) to experiments/results/bench_attention.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from cascade.kernels.target_attention import target_aware_attention

RESULTS = Path(__file__).resolve().parent / "results" / "bench_attention.json"

# peak DRAM bandwidth in GB/s by device-name substring, used when NVML cannot tell us
PEAK_GBPS = {
    "H200": 4800,
    "H100 SXM": 3350,
    "H100 NVL": 3900,
    "H100 PCIe": 2000,
    "H100": 3350,
    "GH200": 4000,
    "B200": 8000,
    "A100-SXM4-80GB": 2039,
    "A100 80GB PCIe": 1935,
    "A100": 1555,
    "L40S": 864,
    "L4": 300,
    "A10": 600,
    "T4": 320,
    "RTX 4090": 1008,
    "V100": 900,
}


# ---------------------------------------------------------------------------------------------
# inputs and byte counts
# ---------------------------------------------------------------------------------------------


def make_inputs(B, H, N, n, d, *, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda L: torch.randn(B, H, L, d, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    return {
        "q_c": r(n), "k_c": r(n), "v_c": r(n),
        "q_h": r(N), "k_h": r(N), "v_h": r(N),
        "hist_len": torch.full((B,), N, dtype=torch.int64, device=device),
    }


def min_bytes(shape: dict, mode: str, itemsize: int) -> int:
    """Bytes every implementation must move at least once: inputs read, outputs written."""
    B, H, N, n, d = (shape[k] for k in "BHNnd")
    cand = 4 * B * H * n * d  # q_c, k_c, v_c, out_c
    hist = (4 if mode == "full" else 2) * B * H * N * d  # k_h, v_h (+ q_h, out_h)
    return (cand + hist) * itemsize


def call(inputs: dict, *, impl: str, kind: str, mode: str):
    x = inputs
    q_h = x["q_h"] if mode == "full" else None
    return target_aware_attention(
        x["q_c"], x["k_c"], x["v_c"], x["k_h"], x["v_h"], x["hist_len"], q_h=q_h, kind=kind, impl=impl
    )


def sdpa_fn(inputs: dict, mode: str):
    """SDPA over [history ; candidates] with the target mask as a dense boolean matrix. The
    concatenation and the mask are built once here, outside the timed call (generous to SDPA)."""
    x = inputs
    B, H, N, d = x["k_h"].shape
    n = x["q_c"].shape[2]
    dev = x["q_c"].device
    hl = x["hist_len"]
    k = torch.cat([x["k_h"], x["k_c"]], dim=2)
    v = torch.cat([x["v_h"], x["v_c"]], dim=2)
    pos = torch.arange(N, device=dev)
    valid = pos[None, :] < hl[:, None]  # (B, N)
    cand_keys = torch.cat(  # candidate rows: valid history, then only the diagonal
        [valid[:, None, :].expand(B, n, N), torch.eye(n, dtype=torch.bool, device=dev).expand(B, n, n)], dim=2
    )  # (B, n, N+n)
    if mode == "cached":
        q, mask = x["q_c"], cand_keys[:, None]
    else:
        q = torch.cat([x["q_h"], x["q_c"]], dim=2)
        hist_keys = torch.cat(
            [(pos[None, :] <= pos[:, None])[None] & valid[:, None, :] & valid[:, :, None],
             torch.zeros(B, N, n, dtype=torch.bool, device=dev)], dim=2,
        )  # (B, N, N+n); padded history rows attend to nothing (none here: full histories)
        hist_keys[:, :, 0] |= ~valid  # a row with no key gives NaN in SDPA; give padding one key
        mask = torch.cat([hist_keys, cand_keys], dim=1)[:, None]  # (B, 1, N+n, N+n)
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# ---------------------------------------------------------------------------------------------
# timers
# ---------------------------------------------------------------------------------------------


def time_cpu(fn, *, repeats: int, warmup: int = 1) -> list[float]:
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        out = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def time_gpu(fn, *, repeats: int, warmup: int = 3) -> list[float]:
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")  # larger than any L2
    with torch.no_grad():
        for _ in range(warmup):  # includes Triton autotuning and torch.compile
            fn()
        torch.cuda.synchronize()
        out = []
        for _ in range(repeats):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            out.append(start.elapsed_time(end))
    return out


def gpu_peak_gbps() -> tuple[float | None, str]:
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        clock_mhz = pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM)
        bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(h)
        if clock_mhz and bus_bits:
            return 2 * clock_mhz * 1e6 * bus_bits / 8 / 1e9, "nvml (2 x max memory clock x bus width)"
    except Exception:  # pynvml absent or the query unsupported: fall back to the name table
        pass
    name = torch.cuda.get_device_name()
    for key, gbps in PEAK_GBPS.items():
        if key.lower() in name.lower():
            return float(gbps), f"datasheet value for '{key}'"
    return None, f"unknown device '{name}'"


def measured_copy_gbps() -> float:
    a = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = statistics.median(time_gpu(lambda: b.copy_(a), repeats=10))
    return 2 * a.numel() / (ms * 1e-3) / 1e9


# ---------------------------------------------------------------------------------------------
# the two sections
# ---------------------------------------------------------------------------------------------


def row(device, shape, kind, mode, dtype, impl, times, *, nbytes=None, peak=None, note=""):
    ms = statistics.median(times)
    r = {
        "device": device, "impl": impl, "kind": kind, "mode": mode, "dtype": str(dtype).replace("torch.", ""),
        "shape": dict(shape), "hist_len": "full (= N)", "ms": ms, "ms_repeats": times, "note": note,
    }
    if nbytes is not None:
        r["min_bytes"] = nbytes
        r["gbps"] = nbytes / (ms * 1e-3) / 1e9
        r["frac_peak"] = r["gbps"] / peak if peak else None
    return r


def bench_cpu(
    shape: dict, *, kinds, repeats: int, ref_candidates: int, ref_repeats: int, console: Console
) -> list[dict]:
    rows = []
    B, H, N, n, d = (shape[k] for k in "BHNnd")
    x = make_inputs(B, H, N, n, d, dtype=torch.float32, device="cpu")
    m = min(ref_candidates, n)
    sub = {**x, **{k: x[k][:, :, :m].contiguous() for k in ("q_c", "k_c", "v_c")}}
    for kind in kinds:
        for mode in ("cached", "full"):
            console.log(f"cpu {kind} {mode}: torch")
            t = time_cpu(lambda: call(x, impl="torch", kind=kind, mode=mode), repeats=repeats)
            rows.append(row("cpu", shape, kind, mode, torch.float32, "torch", t))
            console.log(f"cpu {kind} {mode}: ref on {m} of {n} candidates")
            t = time_cpu(lambda: call(sub, impl="ref", kind=kind, mode=mode), repeats=ref_repeats, warmup=0)
            note = f"timed on {m} of {n} candidates, scaled x{n / m:.3g} (ref is linear in n)" if m < n else ""
            rows.append(row("cpu", shape, kind, mode, torch.float32, "ref", [v * n / m for v in t], note=note))
            rows[-1]["ms_measured"] = t
    return rows


def bench_gpu(shapes: list[dict], *, kinds, dtype, repeats: int, console: Console,
              with_compile: bool = True) -> tuple[list[dict], dict]:
    peak, peak_src = gpu_peak_gbps()
    info = {"peak_gbps": peak, "peak_source": peak_src, "copy_gbps": measured_copy_gbps()}
    rows = []
    for shape in shapes:
        B, H, N, n, d = (shape[k] for k in "BHNnd")
        x = make_inputs(B, H, N, n, d, dtype=dtype, device="cuda")
        for kind in kinds:
            for mode in ("cached", "full"):
                nbytes = min_bytes(shape, mode, x["q_c"].element_size())
                with torch.no_grad():  # correctness at this shape before any timing
                    ta = call(x, impl="triton", kind=kind, mode=mode)
                    tb = call(x, impl="torch", kind=kind, mode=mode)
                err = max((a - b).abs().max().item() for a, b in zip(ta, tb) if a is not None)
                fns = {
                    "triton": lambda: call(x, impl="triton", kind=kind, mode=mode),
                    "torch": lambda: call(x, impl="torch", kind=kind, mode=mode),
                }
                if with_compile:
                    # a fresh compiled function per case: no recompile limit, no stale guards
                    compiled = torch.compile(lambda *a, **k: target_aware_attention(*a, **k), dynamic=False)
                    fns["torch.compile"] = lambda: compiled(
                        x["q_c"], x["k_c"], x["v_c"], x["k_h"], x["v_h"], x["hist_len"],
                        q_h=x["q_h"] if mode == "full" else None, kind=kind, impl="torch",
                    )
                if kind == "softmax":
                    fns["sdpa (explicit mask)"] = sdpa_fn(x, mode)
                for impl, fn in fns.items():
                    console.log(f"gpu {shape} {kind} {mode}: {impl}")
                    try:
                        t = time_gpu(fn, repeats=repeats)
                    except Exception as e:  # e.g. out of memory or a compile failure: record it
                        rows.append({"device": "cuda", "impl": impl, "kind": kind, "mode": mode,
                                     "shape": dict(shape), "error": f"{type(e).__name__}: {e}"[:300]})
                        torch.cuda.empty_cache()
                        continue
                    note = f"max |triton - torch| = {err:.2e}" if impl == "triton" else ""
                    if impl.startswith("sdpa"):
                        note = "pre-concatenated inputs, prebuilt mask"
                    rows.append(row("cuda", shape, kind, mode, dtype, impl, t, nbytes=nbytes, peak=peak, note=note))
        del x
        torch.cuda.empty_cache()
    return rows, info


def summarise(rows: list[dict]) -> dict:
    """Speed-ups the issue's targets are stated in."""
    out = {"cpu_torch_vs_ref": [], "gpu_triton_vs_best_pytorch": []}
    ok = [r for r in rows if "ms" in r]
    groups = {}
    for r in ok:
        key = (r["device"], tuple(r["shape"].values()), r["kind"], r["mode"])
        groups.setdefault(key, {})[r["impl"]] = r["ms"]
    for (device, shape, kind, mode), t in groups.items():
        common = {"shape": dict(zip("BHNnd", shape)), "kind": kind, "mode": mode}
        if device == "cpu" and "ref" in t and "torch" in t:
            s = t["ref"] / t["torch"]
            out["cpu_torch_vs_ref"].append({**common, "speedup": s, "target": 20, "met": s >= 20})
        if device == "cuda" and "triton" in t:
            others = {k: v for k, v in t.items() if k != "triton"}
            if others:
                best = min(others, key=others.get)
                s = others[best] / t["triton"]
                out["gpu_triton_vs_best_pytorch"].append(
                    {**common, "best_pytorch": best, "speedup": s, "target": 2, "met": s >= 2}
                )
    return out


def print_table(rows: list[dict], console: Console) -> None:
    table = Table(title="target-aware attention (median ms; hist_len = N; shape = B x H x N x n x d)")
    for c in ("device", "shape", "dtype", "kind", "mode", "impl", "ms", "vs torch", "GB/s", "% peak", "note"):
        right = c in ("ms", "vs torch", "GB/s", "% peak")
        table.add_column(c, justify="right" if right else "left", overflow="fold")
    base = {(r["device"], tuple(r["shape"].values()), r["kind"], r["mode"]): r["ms"]
            for r in rows if r.get("impl") == "torch" and "ms" in r}
    for r in rows:
        s = r["shape"]
        shape = "x".join(str(s[k]) for k in "BHNnd")
        if "error" in r:
            table.add_row(r["device"], shape, "", r["kind"], r["mode"], r["impl"], "-", "", "", "", r["error"][:80])
            continue
        b = base.get((r["device"], tuple(s.values()), r["kind"], r["mode"]))
        table.add_row(
            r["device"], shape, r["dtype"], r["kind"], r["mode"], r["impl"],
            f"{r['ms']:.3f}" if r["ms"] < 100 else f"{r['ms']:.0f}",
            f"{b / r['ms']:.2f}x" if b else "",
            f"{r['gbps']:.0f}" if r.get("gbps") is not None else "",
            f"{100 * r['frac_peak']:.1f}" if r.get("frac_peak") else "",
            r.get("note", ""),
        )
    console.print(table)


def environment() -> dict:
    try:
        from cascade.env import capture

        env = capture()
    except ImportError:  # the engine's helper is optional here
        import platform

        env = {"python": platform.python_version(), "platform": platform.platform(),
               "versions": {"torch": torch.__version__}, "torch_threads": torch.get_num_threads()}
    try:
        import triton

        env.setdefault("versions", {})["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        env["gpu_name"] = torch.cuda.get_device_name()
    return env


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (seconds), to check the script runs")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="auto: the CPU section always, the GPU section when CUDA is available")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per case (median reported)")
    ap.add_argument("--ref-candidates", type=int, default=None,
                    help="candidates the ref is timed on (scaled linearly to all); default 100 (quick: all)")
    ap.add_argument("--ref-repeats", type=int, default=None, help="timed repeats of the slow ref (default 1; quick: 3)")
    ap.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16", help="GPU dtype")
    ap.add_argument("--kinds", default="silu,softmax")
    ap.add_argument("--no-compile", action="store_true",
                    help="GPU: leave out the torch.compile row (its compiles take minutes)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("TRITON_INTERPRET is set: unset it to benchmark the compiled kernel", file=sys.stderr)
        return 2
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    console = Console(width=None if sys.stdout.isatty() else 160)
    if args.quick:
        cpu_shape = {"B": 4, "H": 2, "N": 50, "n": 100, "d": 32}
        gpu_shapes = [cpu_shape, {"B": 4, "H": 2, "N": 200, "n": 300, "d": 32}]
    else:
        cpu_shape = {"B": 32, "H": 2, "N": 200, "n": 1000, "d": 32}
        gpu_shapes = [cpu_shape, {"B": 32, "H": 2, "N": 1000, "n": 2000, "d": 32}]
    repeats = args.repeats or (3 if args.quick else 5)
    ref_candidates = args.ref_candidates or (cpu_shape["n"] if args.quick else 100)

    rows, gpu_info = [], None
    if args.device in ("auto", "cpu"):
        rows += bench_cpu(cpu_shape, kinds=kinds, repeats=repeats, ref_candidates=ref_candidates,
                          ref_repeats=args.ref_repeats or (3 if args.quick else 1), console=console)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device available", file=sys.stderr)
        return 2
    if args.device in ("auto", "cuda") and torch.cuda.is_available():
        gpu_rows, gpu_info = bench_gpu(
            gpu_shapes, kinds=kinds, dtype=getattr(torch, args.dtype), repeats=max(repeats, 20), console=console,
            with_compile=not args.no_compile,
        )
        rows += gpu_rows
    elif args.device == "auto":
        console.log("no CUDA device: GPU section skipped")

    print_table(rows, console)
    summary = summarise(rows)
    for k, items in summary.items():
        for s in items:
            shp = "x".join(str(v) for v in s["shape"].values())
            extra = f" (best PyTorch: {s['best_pytorch']})" if "best_pytorch" in s else ""
            verdict = f"target {s['target']}x: {'met' if s['met'] else 'NOT met'}"
            if args.quick:
                verdict = f"(quick shapes: the {s['target']}x target is stated for the full shapes)"
            console.print(f"{k} [{shp} {s['kind']} {s['mode']}]: {s['speedup']:.1f}x{extra} {verdict}")
    write_json(args.out, {
        "format": "cascade-bench-attention/1",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "environment": environment(),
        "gpu": gpu_info,
        "shapes": {"cpu": cpu_shape, "gpu": gpu_shapes if gpu_info else None,
                   "layout": "(B, H, L, d); B requests, H heads, N history, n candidates, d head dim"},
        "results": rows,
        "summary": summary,
    })
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
