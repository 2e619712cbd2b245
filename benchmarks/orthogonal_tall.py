"""Benchmark: tall and wide orthogonal weights (k ≪ n), ours in O(nk²) vs the peers that pad to n×n.

Run (CPU, 2 threads; ~15-25 minutes with the defaults, most of it in the peers' n×n
exponentials at 64x4096)::

    python benchmarks/orthogonal_tall.py                       # everything
    python benchmarks/orthogonal_tall.py --sections speed      # one section (see --help)
    python benchmarks/orthogonal_tall.py --quick               # small shapes, 1 slow round

Sections (all float32, CPU unless ``--device cuda``):

* ``speed``: fwd+bwd of a ``k×n`` weight (``nn.Linear(n, k)``, orthonormal rows) at 64x1024,
  64x4096, 256x8192, 50x30000: the weight computed with autograd recording, then
  ``(W * G).sum().backward()`` for a fixed random G. Methods: ``manifoldparam.orthogonal`` (the
  automatic tall path; and ``tall=False``, the n×n path, where it fits), torch
  ``orthogonal(orthogonal_map="matrix_exp")`` and ``"cayley"``, ``geotorch.orthogonal``, and
  geoopt's QR retraction step (a ``ManifoldParameter`` on ``EuclideanStiefel`` with
  ``RiemannianSGD``: the same backward plus the optimizer step, which is where geoopt keeps the
  constraint). The n×n methods run only where n <= 4096 (at 8192 one fwd+bwd of torch's would
  take tens of minutes here); they get ``--slow-rounds`` rounds, ours and geoopt ``--rounds``,
  interleaved; medians.
* ``growth``: ours at k = 64 and n = 1024 ... 16384: time / n should be flat (linear in n).
* ``register``: ``manifoldparam.orthogonal(nn.Linear(50, 30000))`` (a 30000x50 weight), median of
  5 fresh modules (the module's own creation not timed).
* ``drift``: float32 ``max|WWᵀ - I|`` of a 64x4096 weight after 1000 Adam steps (lr 1e-3) on
  ``‖W X - Y‖²`` (X, Y fixed random, Y not reachable by an orthonormal W), without rebase.
* ``square``: the square path before/after a change, paired: the same timing script run
  alternately with ``--before`` (default ``/work/main``) and ``--after`` (default this
  checkout) on ``PYTHONPATH`` (e.g. two ``git archive`` exports of the package), fwd+bwd at
  64x64, 256x256, 512x512 and 100x64, 128x300 (below the switch: still the square path);
  medians over the rounds, ratio after/before.
* ``switch``: ours, tall path vs square path, at n = 32..512 and k = n/2, n/3, n/4, n/8: where
  the automatic switch (``n >= 3k``, ``n >= 256``) should lie.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

warnings.filterwarnings("ignore")
torch.set_num_threads(2)

from _timing import now  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)) if str(ROOT) not in sys.path else None
import manifoldparam as mp  # noqa: E402

SECTIONS = ("speed", "growth", "register", "drift", "square", "switch")


def fwd_bwd(module: nn.Module, g: torch.Tensor, device: torch.device) -> Callable[[], float]:
    def step() -> float:
        t0 = now(device)
        (module.weight * g).sum().backward()
        t1 = now(device)
        for p in module.parameters():
            p.grad = None
        return t1 - t0

    return step


def geoopt_step(k: int, n: int, g: torch.Tensor, device: torch.device) -> Callable[[], float]:
    import geoopt

    q, _ = torch.linalg.qr(torch.randn(n, k, device=device))
    p = geoopt.ManifoldParameter(q, manifold=geoopt.EuclideanStiefel())
    opt = geoopt.optim.RiemannianSGD([p], lr=1e-3)
    gt = g.T.contiguous()

    def step() -> float:
        t0 = now(device)
        (p * gt).sum().backward()
        opt.step()
        t1 = now(device)
        opt.zero_grad(set_to_none=True)
        return t1 - t0

    return step


def methods_for(k: int, n: int, device: torch.device, args) -> dict[str, tuple[Callable, int]]:
    """name -> (step, rounds)."""
    torch.manual_seed(0)
    g = torch.randn(k, n, device=device)
    out: dict[str, tuple[Callable, int]] = {}
    out["manifoldparam (tall, auto)"] = (
        fwd_bwd(mp.orthogonal(nn.Linear(n, k, bias=False).to(device)), g, device),
        args.rounds,
    )
    if n <= args.max_square_n:
        from torch.nn.utils.parametrizations import orthogonal as torch_orthogonal

        square = mp.orthogonal(nn.Linear(n, k, bias=False).to(device), tall=False)
        out["manifoldparam (tall=False, n×n)"] = (fwd_bwd(square, g, device), args.slow_rounds)
        for how in ("matrix_exp", "cayley"):
            m = torch_orthogonal(nn.Linear(n, k, bias=False).to(device), orthogonal_map=how)
            rounds = args.slow_rounds if how == "matrix_exp" else max(args.slow_rounds, 3)
            out[f"torch orthogonal({how})"] = (fwd_bwd(m, g, device), rounds)
        import geotorch

        m = nn.Linear(n, k, bias=False).to(device)
        geotorch.orthogonal(m, "weight")
        out["geotorch orthogonal"] = (fwd_bwd(m, g, device), args.slow_rounds)
    out["geoopt QR retraction step"] = (geoopt_step(k, n, g, device), args.rounds)
    return out


def run_interleaved(methods: dict[str, tuple[Callable, int]]) -> dict[str, float]:
    for step, _ in methods.values():  # warm-up (one call each; the slow ones too)
        step()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(max(rounds for _, rounds in methods.values())):
        for name, (step, rounds) in methods.items():
            if r < rounds:
                times[name].append(step())
    return {name: statistics.median(ts) for name, ts in times.items()}


def section_speed(args, device) -> dict:
    results = {}
    for shape in args.shapes:
        k, n = (int(v) for v in shape.split("x"))
        t0 = time.perf_counter()
        med = run_interleaved(methods_for(k, n, device, args))
        results[shape] = med
        print(f"speed {shape} ({time.perf_counter() - t0:.0f} s):", flush=True)
        ours = med["manifoldparam (tall, auto)"]
        for name, t in med.items():
            print(f"  {name:34s} {1e3 * t:11.2f} ms  ours/this = {ours / t:.4f}", flush=True)
    return results


def section_growth(args, device) -> dict:
    k = 64
    methods = {}
    g = {}
    for n in args.growth:
        torch.manual_seed(0)
        g[n] = torch.randn(k, n, device=device)
        methods[str(n)] = (
            fwd_bwd(mp.orthogonal(nn.Linear(n, k, bias=False).to(device)), g[n], device),
            args.rounds,
        )
    med = run_interleaved(methods)
    print("growth (k = 64):", flush=True)
    for n, t in med.items():
        print(
            f"  n={n:>6}  {1e3 * t:9.2f} ms  per 1000 rows {1e6 * t / int(n):7.3f} ms", flush=True
        )
    return med


def section_register(args, device) -> dict:
    mp.orthogonal(nn.Linear(5, 300))  # (first-call costs: imports, LAPACK workspace)
    times = []
    for i in range(5):
        torch.manual_seed(i)
        m = nn.Linear(50, 30000).to(device)
        t0 = now(device)
        mp.orthogonal(m)
        times.append(now(device) - t0)
        w = m.weight.detach()
        err = float((w.T @ w - torch.eye(50, device=device)).abs().max())
    med = statistics.median(times)
    print(f"register 30000x50: median {med:.3f} s (all: {times}), max|WᵀW-I| {err:.2e}")
    return {"median_s": med, "all_s": times, "orth_error": err}


def section_drift(args, device) -> dict:
    torch.manual_seed(0)
    k, n = 64, 4096
    m = mp.orthogonal(nn.Linear(n, k, bias=False).to(device))
    x = torch.randn(256, n, device=device)
    y = 3 * torch.randn(256, k, device=device)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    eye = torch.eye(k, device=device)
    worst = 0.0
    t0 = time.perf_counter()
    for step in range(args.drift_steps):
        loss = ((m(x) - y) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 99 or step == args.drift_steps - 1:
            with torch.no_grad():
                w = m.weight
                err = float((w @ w.T - eye).abs().max())
            worst = max(worst, err)
    coords = float(m.parametrizations.weight.original.detach().norm())
    print(
        f"drift 64x4096 float32 after {args.drift_steps} Adam steps: max|WWᵀ-I| = {err:.2e} "
        f"(worst at the 100-step checks {worst:.2e}), loss {float(loss):.4f}, "
        f"|coords| {coords:.2f} ({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    return {"final": err, "worst": worst, "loss": float(loss), "coords_norm": coords}


SQUARE_SCRIPT = r"""
import json, sys, time, statistics, warnings
warnings.filterwarnings("ignore")
import torch
from torch import nn
torch.set_num_threads(%(threads)d)
import manifoldparam as mp
out = {}
for rows, cols, reps in %(shapes)s:
    torch.manual_seed(0)
    m = mp.orthogonal(nn.Linear(cols, rows, bias=False))
    g = torch.randn(rows, cols)
    for _ in range(2):
        (m.weight * g).sum().backward()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        (m.weight * g).sum().backward()
        ts.append(time.perf_counter() - t0)
        m.parametrizations.weight.original.grad = None
    out[f"{rows}x{cols}"] = statistics.median(ts)
print(json.dumps(out))
"""


def section_square(args, device) -> dict:
    shapes = [(64, 64, 40), (256, 256, 15), (512, 512, 6), (100, 64, 30), (128, 300, 10)]
    script = SQUARE_SCRIPT % {"shapes": repr(shapes), "threads": args.threads}
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for _ in range(args.square_rounds):
        for label, path in (("before", args.before), ("after", args.after or str(ROOT))):
            env = dict(os.environ, PYTHONPATH=path)
            res = subprocess.run(
                [sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd="/"
            )
            if res.returncode:
                raise RuntimeError(res.stderr)
            runs[label].append(json.loads(res.stdout.strip().splitlines()[-1]))
    table = {}
    after = args.after or str(ROOT)
    print(
        f"square path before ({args.before}) / after ({after}), paired, "
        f"{args.square_rounds} rounds:"
    )
    for shape in runs["before"][0]:
        b = statistics.median(r[shape] for r in runs["before"])
        a = statistics.median(r[shape] for r in runs["after"])
        table[shape] = {"before_ms": 1e3 * b, "after_ms": 1e3 * a, "ratio": a / b}
        print(f"  {shape:>8}: before {1e3 * b:8.3f} ms  after {1e3 * a:8.3f} ms  ratio {a / b:.3f}")
    return table


def section_switch(args, device) -> dict:
    table = {}
    print("switch: tall path vs square path (fwd+bwd):")
    for n in (32, 64, 128, 256, 512):
        for k in (n // 2, n // 3, n // 4, n // 8):
            torch.manual_seed(0)
            g = torch.randn(k, n, device=device)
            mods = {
                tall: mp.orthogonal(nn.Linear(n, k, bias=False).to(device), tall=tall)
                for tall in (True, False)
            }
            med = run_interleaved(
                {
                    "tall": (fwd_bwd(mods[True], g, device), args.rounds),
                    "square": (fwd_bwd(mods[False], g, device), args.rounds),
                }
            )
            table[f"{k}x{n}"] = med
            print(
                f"  {k:>4}x{n:<4} tall {1e3 * med['tall']:8.3f} ms  square "
                f"{1e3 * med['square']:8.3f} ms  tall/square {med['tall'] / med['square']:.3f}",
                flush=True,
            )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument(
        "--shapes", nargs="+", default=["64x1024", "64x4096", "256x8192", "50x30000"]
    )
    parser.add_argument("--growth", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--slow-rounds", type=int, default=1)
    parser.add_argument("--max-square-n", type=int, default=4096)
    parser.add_argument("--drift-steps", type=int, default=1000)
    parser.add_argument("--square-rounds", type=int, default=6)
    parser.add_argument("--before", default="/work/main")
    parser.add_argument("--after", default=None, help="default: this checkout")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (all sections)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if args.quick:
        args.shapes, args.growth, args.rounds = ["64x512"], [512, 1024, 2048], 5
        args.drift_steps, args.square_rounds = 50, 2
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {load}", flush=True)
    results = {"load_before": load}
    for name in args.sections:
        results[name] = globals()[f"section_{name}"](args, device)
    results["load_after"] = os.getloadavg()
    print(f"load average after: {results['load_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
