"""Two gloo CPU ranks for the distributed tests (DDP, FSDP2, DCP): a test runs its own file
as a script in a subprocess with a time bound; the script spawns the ranks, which rendezvous
through a file store in the test's temporary folder (no TCP port: nothing another process can
take between choosing a port and binding it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, out_dir: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``script`` (a test file whose ``__main__`` spawns the ranks) as
    ``python script STORE OUT_DIR`` with one thread per rank and a time bound."""
    store = Path(out_dir) / "rendezvous"
    store.unlink(missing_ok=True)  # a file store needs a new, empty file
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, script, str(store), str(out_dir)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
        check=False,
    )


def init(rank: int, store: str, world_size: int = 2) -> None:  # pragma: no cover - subprocess
    """Join the gloo process group of ``run_script``'s ranks, one thread each."""
    import warnings
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=Path(store).resolve().as_uri(),
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )


def finish() -> None:  # pragma: no cover - subprocess
    """Leave the process group and exit the rank at once: interpreter teardown can destroy
    gloo's or DCP's still-joinable C++ threads ("terminate called without an active
    exception", SIGABRT, seen once in about fifty runs) after the rank's work is done."""
    import os

    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
