"""Benchmark: the orthogonal map W = exp(A) (A skew) forward and forward+backward, ours vs peers.

Run (CPU, 2 threads; ~2-3 minutes with the defaults)::

    python benchmarks/orthogonal_expm.py                  # n = 64, 256, 1024
    python benchmarks/orthogonal_expm.py --sizes 64 256   # quicker
    python benchmarks/orthogonal_expm.py --no-memory      # skip the peak-memory subprocesses
    python benchmarks/orthogonal_expm.py --device cuda --sizes 64 256 1024 4096   # on a GPU

What is timed, per size n (all float32, on an n×n weight; every method sees the same skew
A = tril(X, -1) - tril(X, -1)ᵀ with X ~ N(0, 1/n) entries, i.e. spectral radius ≈ 2: a generic
rotation; ``--scale c`` multiplies A by c, e.g. to see the regime with squarings):

* ``expm (bare)`` / ``matrix_exp (bare)``: ``manifoldparam.linalg.expm.expm(A)`` vs
  ``torch.linalg.matrix_exp(A)`` on the skew matrix itself (independent of any wiring).
* ``map: expm`` / ``map: matrix_exp``: the torch-style orthogonal map from an n×n parameter P,
  ``A = tril(P, -1) - tril(P, -1)ᵀ; W = exp(A)``, with each exponential.
* ``torch orthogonal(matrix_exp|cayley)``: ``torch.nn.utils.parametrizations.orthogonal`` on an
  ``nn.Linear(n, n)``, ``orthogonal_map=...`` (trivialization on, base = the initial weight).
* ``geotorch orthogonal(expm)``: ``geotorch.orthogonal(nn.Linear(n, n), "weight")``.
* ``manifoldparam orthogonal (default, expm)``: ``manifoldparam.orthogonal(nn.Linear(n, n))``
  (base product, ``expm``, and one Newton–Schulz step: at ρ(A) ≈ 2 the exponential is Padé,
  where the default applies it).

"fwd" computes the weight with autograd recording (the forward half of a training step);
"fwd+bwd" adds ``(W * G).sum().backward()`` for a fixed random G. Rounds are interleaved
across methods in one process; the tables report medians. Peak memory ("peak MB") is the
growth of the resident set (VmHWM - VmRSS before, after resetting VmHWM through
/proc/self/clear_refs) during one fwd+bwd after a warm-up, measured in a child process with
``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensor memory goes back to the OS and the
resident set tracks live memory: it counts every byte the step makes resident (tensors,
saved activations, LAPACK/BLAS workspace), not only the torch allocator's view.

On a GPU (``--device cuda``) every timestamp is taken after ``torch.cuda.synchronize()``, a row
adds the exponential's sync-free mode (a fixed number of masked squarings, no host read: what
``manifoldparam.orthogonal`` uses while a CUDA graph is captured), and "peak MB" is
``torch.cuda.max_memory_allocated()`` during one fwd+bwd minus the memory allocated before it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

warnings.filterwarnings("ignore", category=DeprecationWarning)
torch.set_num_threads(2)

from _timing import now  # noqa: E402

from manifoldparam.linalg._scheme import _forward  # noqa: E402
from manifoldparam.linalg.expm import SYNC_FREE_SQUARINGS, expm  # noqa: E402

REF = "torch orthogonal(matrix_exp)"


SCALE = 1.0  # --scale: multiplies A (spectral radius ≈ 2·SCALE)
DEVICE = torch.device("cpu")  # --device


def _skew_param(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, n, generator=g) * (SCALE * n**-0.5)).to(DEVICE)


def _skew(p: torch.Tensor) -> torch.Tensor:
    a = p.tril(-1)
    return a - a.mT


def _methods(n: int, peers: bool) -> dict[str, Callable[[], torch.Tensor]]:
    """name -> function returning the weight (with autograd recording)."""
    p0 = _skew_param(n)
    out: dict[str, Callable[[], torch.Tensor]] = {}
    a_bare = _skew(p0).requires_grad_()
    out["expm (bare)"] = lambda: expm(a_bare)
    out["matrix_exp (bare)"] = lambda: torch.linalg.matrix_exp(a_bare)
    p_ours = p0.clone().requires_grad_()
    p_torch = p0.clone().requires_grad_()
    out["map: expm"] = lambda: expm(_skew(p_ours))
    if DEVICE.type != "cpu":  # what manifoldparam.orthogonal does while a CUDA graph captures
        k = SYNC_FREE_SQUARINGS
        name = f"map: expm, max_squarings={k} (no sync)"
        out[name] = lambda: expm(_skew(p_ours), max_squarings=k)
    out["map: matrix_exp"] = lambda: torch.linalg.matrix_exp(_skew(p_torch))
    if not peers:
        return out
    from torch.nn.utils.parametrizations import orthogonal as torch_orthogonal

    for mp in ("matrix_exp", "cayley"):
        lin = torch_orthogonal(nn.Linear(n, n, bias=False, device=DEVICE), orthogonal_map=mp)
        with torch.no_grad():
            lin.parametrizations.weight.original.copy_(p0)
        out[f"torch orthogonal({mp})"] = lambda lin=lin: lin.weight
    try:
        import geotorch

        lin = nn.Linear(n, n, bias=False, device=DEVICE)
        geotorch.orthogonal(lin, "weight")
        with torch.no_grad():
            lin.parametrizations.weight.original.copy_(p0)
        out["geotorch orthogonal(expm)"] = lambda lin=lin: lin.weight
    except Exception as e:  # pragma: no cover - optional peer
        print(f"# geotorch skipped: {e!r}", file=sys.stderr)
    try:
        import importlib

        # (``manifoldparam.hard.orthogonal`` the attribute may be the function, not the module)
        mo = importlib.import_module("manifoldparam.hard.orthogonal")

        lin = mo.orthogonal(nn.Linear(n, n, bias=False, device=DEVICE))
        orig = lin.parametrizations.weight.original
        p = lin.parametrizations.weight[0]
        with torch.no_grad():
            # The same A: coordinates = strictly-lower entries of p0 (flat index i*n + j).
            orig.copy_(p0.reshape(-1)[p.index])
        out["manifoldparam orthogonal (default, expm)"] = lambda lin=lin: lin.weight
    except Exception as e:  # pragma: no cover - depends on the tree
        print(f"# manifoldparam.orthogonal skipped: {e!r}", file=sys.stderr)
    return out


def _grad_target(n: int) -> torch.Tensor:
    return torch.randn(n, n, generator=torch.Generator().manual_seed(1)).to(DEVICE)


def _fwd_bwd(make: Callable[[], torch.Tensor], g: torch.Tensor) -> None:
    w = make()
    (w * g).sum().backward()


def _timings(n: int, rounds: int, peers: bool) -> dict[str, tuple[float, float]]:
    methods = _methods(n, peers)
    g = _grad_target(n)
    fwd: dict[str, list[float]] = {k: [] for k in methods}
    fb: dict[str, list[float]] = {k: [] for k in methods}
    for r in range(rounds + 1):  # round 0 is a warm-up
        for name, make in methods.items():
            t0 = now(DEVICE)
            w = make()
            t1 = now(DEVICE)
            del w
            _fwd_bwd(make, g)
            t2 = now(DEVICE)
            if r:
                fwd[name].append(t1 - t0)
                fb[name].append(t2 - t1)
    return {k: (statistics.median(fwd[k]) * 1e3, statistics.median(fb[k]) * 1e3) for k in methods}


# ----------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int:
    m = re.search(rf"{field}:\s+(\d+) kB", open("/proc/self/status").read())
    return int(m.group(1)) if m else -1


def _memory_child(n: int, peers: bool) -> None:
    import gc

    methods = _methods(n, peers)
    g = _grad_target(n)
    res = {}
    for name, make in methods.items():
        _fwd_bwd(make, g)  # warm-up (one-time buffers)
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kb("VmRSS")
        _fwd_bwd(make, g)
        res[name] = (_status_kb("VmHWM") - base) / 1024
    print(json.dumps(res))


def _memory_cuda(n: int, peers: bool) -> dict[str, float]:
    methods = _methods(n, peers)
    g = _grad_target(n)
    res = {}
    for name, make in methods.items():
        _fwd_bwd(make, g)  # warm-up
        torch.cuda.synchronize(DEVICE)
        base = torch.cuda.memory_allocated(DEVICE)
        torch.cuda.reset_peak_memory_stats(DEVICE)
        _fwd_bwd(make, g)
        torch.cuda.synchronize(DEVICE)
        res[name] = (torch.cuda.max_memory_allocated(DEVICE) - base) / 2**20
    return res


def _memory(n: int, peers: bool) -> dict[str, float]:
    if DEVICE.type == "cuda":
        return _memory_cuda(n, peers)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--memory-child", str(n), "--scale", str(SCALE)]
    cmd += [] if peers else ["--no-peers"]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])
    except Exception as e:  # pragma: no cover
        print(f"# memory measurement failed for n={n}: {e!r}", file=sys.stderr)
        return {}


# ----------------------------------------------------------------------------- main
def _default_rounds(n: int) -> int:
    if DEVICE.type != "cpu":
        return 50 if n <= 1024 else 10
    return 30 if n <= 64 else 10 if n <= 256 else 3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--rounds", type=int, default=None, help="rounds per size (default 30/10/3)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-peers", action="store_true", help="only the bare/map rows")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply A (default 1: ρ(A) ≈ 2)")
    ap.add_argument("--device", default="cpu", help="e.g. cuda (default cpu)")
    ap.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    global SCALE, DEVICE
    SCALE = args.scale
    DEVICE = torch.device(args.device)
    peers = not args.no_peers
    if args.memory_child is not None:
        _memory_child(args.memory_child, peers)
        return

    where = (
        torch.cuda.get_device_name(DEVICE)
        if DEVICE.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"# torch {torch.__version__}, {where}, float32, A = skew, N(0, {SCALE:g}²/n) entries")
    t_start = time.perf_counter()
    for n in args.sizes:
        a = _skew(_skew_param(n))
        rho = torch.linalg.eigvals(a.double()).abs().max().item()
        _, _, (m, s, _) = _forward(a, None)
        rounds = args.rounds or _default_rounds(n)
        res = _timings(n, rounds, peers)
        mem = {} if args.no_memory else _memory(n, peers)
        ref = res.get(REF, res["map: matrix_exp"])
        method = "Taylor T8" if m == 8 else f"Padé m={m}"
        print(
            f"\n## n = {n}  (‖A‖₁ = {a.abs().sum(0).max().item():.1f}, ρ(A) = {rho:.2f}; "
            f"expm uses {method}, s={s}; {rounds} rounds, medians)\n"
        )
        print("| method | fwd ms | fwd+bwd ms | fwd+bwd / " + REF + " | peak MB |")
        print("|---|---:|---:|---:|---:|")
        for name, (f, fb) in res.items():
            mb = f"{mem[name]:.1f}" if name in mem else "-"
            print(f"| {name} | {f:.2f} | {fb:.2f} | {fb / ref[1]:.2f}x | {mb} |")
        ours, theirs = res["map: expm"], res["map: matrix_exp"]
        print(
            f"\nmap: expm / map: matrix_exp: fwd {ours[0] / theirs[0]:.2f}x, "
            f"fwd+bwd {ours[1] / theirs[1]:.2f}x"
        )
        sys.stdout.flush()
    print(f"\n# total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
