"""Peak memory per rank and step time: one process vs FSDP2 (``fully_shard``) on 1 and 2 ranks.

The model: a 1024x1024 orthogonal layer (``mp.orthogonal``: 523,776 coordinates, the matrix
exponential of the skew matrix they fill), tanh, a 1024->10 head; float32, Adam, the weight
cached once per step (``auto_cache``), a global batch of 64 split over the ranks; gloo on CPU,
one thread per rank. FSDP shards the coordinates, their gradients and Adam's moments, but the
map needs the whole matrix: every rank gathers all the coordinates and computes the same
exponential and its backward (n x n workspace on every rank, the compute replicated).

Per configuration and rank: the peak resident set above the process's resident set before
the model was built (``ru_maxrss``; CPU allocations are not tracked by torch), the persistent
training state held by the rank (parameters, gradients, Adam moments: the bytes of the local
tensors), and the median step time. Rounds run the configurations in turn (interleaved), each
in fresh processes.

    flock /tmp/cpu.lock python benchmarks/fsdp_memory.py --rounds 3 --steps 8

The same layer unconstrained (a plain ``nn.Linear``) is measured alongside: the difference is
what the map costs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BATCH = 64
N = int(os.environ.get("FSDP_MEMORY_N", "1024"))  # (a smaller n: a quick check of the script)


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    total = 0
    for p in model.parameters():
        total += local(p).nbytes + (local(p.grad).nbytes if p.grad is not None else 0)
        for v in opt.state.get(p, {}).values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                total += local(v).nbytes
    return total


def _run(rank: int, world: int, mode: str, port: int, steps: int, out: str) -> None:
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    import torch.distributed as dist
    from torch import nn

    import manifoldparam as mp

    if mode.startswith("fsdp"):
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )

    def train(n: int, steps: int) -> tuple[nn.Module, torch.optim.Optimizer, list[float]]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(n, n), nn.Tanh(), nn.Linear(n, 10))
        if not mode.endswith("_free"):
            mp.orthogonal(model[0])
        if mode.startswith("fsdp"):
            from torch.distributed.fsdp import fully_shard

            fully_shard(model[0])
            fully_shard(model)
        mp.auto_cache(model)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(BATCH, n, generator=g).chunk(world)[rank]
        y = torch.randint(0, 10, (BATCH,), generator=g).chunk(world)[rank]
        times = []
        for i in range(steps + 2):  # two warm-up steps
            if mode.startswith("fsdp"):
                dist.barrier()
            t = time.perf_counter()
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i >= 2:
                times.append(time.perf_counter() - t)
        return model, opt, times

    # The same code on a tiny model first: torch's lazily loaded kernels and the process
    # group's buffers are then in the base, and the peak above it is the model's own.
    train(16, 1)
    base = _rss_kib()
    model, opt, times = train(N, steps)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    row = {
        "peak_above_base_mib": (peak - base) / 1024,
        "state_mib": _state_bytes(model, opt) / 2**20,
        "step_ms": 1e3 * statistics.median(times),
    }
    Path(out, f"{mode}{world}_rank{rank}.json").write_text(json.dumps(row))
    if mode.startswith("fsdp"):
        dist.destroy_process_group()


def _spawn(world: int, mode: str, steps: int, out: str) -> None:
    import torch.multiprocessing as tmp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp.spawn(_run, args=(world, mode, port, steps, out), nprocs=world, join=True)


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)  # world mode out
    args = parser.parse_args(argv)
    if args.child:
        _spawn(int(args.child[0]), args.child[1], args.steps, args.child[2])
        return []
    # (*_free: the same layer unconstrained, for what the map itself costs)
    configs = [(1, "plain"), (1, "fsdp"), (2, "fsdp"), (1, "plain_free"), (2, "fsdp_free")]
    rows: dict[tuple[int, str], list[dict[str, float]]] = {c: [] for c in configs}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for _ in range(args.rounds):
        for world, mode in configs:  # interleaved: each round runs every configuration
            with tempfile.TemporaryDirectory() as out:
                cmd = [sys.executable, __file__, "--steps", str(args.steps)]
                cmd += ["--child", str(world), mode, out]
                subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=600)
                for r in range(world):
                    rows[(world, mode)].append(
                        json.loads(Path(out, f"{mode}{world}_rank{r}.json").read_text())
                    )
    table = []
    for (world, mode), rs in rows.items():
        table.append(
            {
                "config": f"{'fully_shard' if mode.startswith('fsdp') else 'one process'}, "
                f"{world} rank(s), {'unconstrained' if mode.endswith('_free') else 'orthogonal'}",
                "peak_above_base_mib": statistics.median(r["peak_above_base_mib"] for r in rs),
                "state_mib": statistics.median(r["state_mib"] for r in rs),
                "step_ms": statistics.median(r["step_ms"] for r in rs),
            }
        )
    print(f"load average: {os.getloadavg()}")
    print(
        "| configuration | peak RSS above base per rank (MiB) "
        "| params+grads+Adam per rank (MiB) | step (ms, median) |"
    )
    print("|---|---:|---:|---:|")
    for t in table:
        cells = [f"{t['peak_above_base_mib']:.1f}", f"{t['state_mib']:.1f}", f"{t['step_ms']:.0f}"]
        print(f"| {t['config']} | " + " | ".join(cells) + " |")
    return table


if __name__ == "__main__":
    main()
