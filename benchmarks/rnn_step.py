"""Benchmark: one training step of an orthogonal RNN, cached / uncached / automatic, vs peers.

Run (CPU, 2 threads; about 2-4 minutes with the defaults)::

    python benchmarks/rnn_step.py                       # n=190, T=100, batch 128
    python benchmarks/rnn_step.py --rounds 3 --no-uncached  # quicker
    python benchmarks/rnn_step.py --rounds 301 --steps 1 --only 'cached(),auto,geoopt'
                                                        # head to head, tighter quartiles
    python benchmarks/rnn_step.py --device cuda         # on a GPU

The model is expRNN's copy-task cell (``examples/copy_task.py``): one-hot inputs (10),
``h_t = modReLU(W h_{t-1} + U x_t)``, a linear read-out to 9 classes, cross-entropy over all
T steps. A *training step* is ``zero_grad`` + forward over T steps + ``backward`` + ``step``
(Adam; geoopt's ``RiemannianAdam`` for geoopt). Variants:

* ``unconstrained``: ``W`` a plain ``nn.Linear`` weight (the reference: ratio 1);
* ``manifoldparam cached()``: ``manifoldparam.orthogonal`` with the step inside
  ``manifoldparam.cached()``;
* ``manifoldparam auto``: the same model after ``manifoldparam.auto_cache(model)``, no block;
* ``manifoldparam, weight read once``: no cache; the forward reads ``rec.weight`` once and
  calls ``F.linear(h, w)`` at each step (the same map cost, without T reads through
  ``torch.nn.utils.parametrize``'s property: what the cache cannot remove);
* ``manifoldparam uncached``: no cache: the orthogonal map is evaluated at each of the T steps;
* ``cached(), reads free (floor)``: a diagnostic, not a way to use the library: the
  ``cached()`` step with ``rec.weight``'s getter replaced by one that returns the value
  computed at the start of the step without any check (stale after any change, so never do
  this). What a cached step would cost if the T reads cost nothing: the map's forward and
  backward and the cache's gradient node alone;
* ``geotorch + parametrize.cached()``: ``geotorch.orthogonal(rnn, "weight")`` (expm), forward
  and backward inside torch's ``parametrize.cached()``;
* ``torch parametrize, identity map``: an unconstrained weight behind
  ``torch.nn.utils.parametrize`` with a parametrization that returns its input: the cost of
  T reads through parametrize's property alone, which every parametrization pays per read
  (a floor for the cached rows; ``parametrize.cached()`` skips it by returning its stored
  tensor without any check, which is why it goes stale);
* ``geoopt RiemannianAdam``: ``W`` a ``geoopt.ManifoldParameter`` on ``Stiefel()`` (no
  parametrization; the optimizer retracts).

Rounds are interleaved across variants in one process (each round runs ``--steps`` steps of
every variant, in a rotated order); the table reports the median seconds per step over rounds,
the median over rounds of the ratio to the unconstrained step *of the same round* (with its
quartiles: the machine's speed drifts between rounds), and the median extra milliseconds.
Below it, our ``cached()`` and automatic steps over each peer's step of the same round
(median, quartiles, in how many rounds ours was the faster, and the two-sided sign test's p
of that count: below 0.05, one side is faster beyond the noise): the direct comparison, with
the same pairing; and where each variant's extra time goes (forward, backward, optimizer
step; median over rounds of the difference with the unconstrained step's same phase).
On a GPU (``--device cuda``) every timestamp is taken after ``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import statistics
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

warnings.filterwarnings("ignore", category=DeprecationWarning)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from _timing import now  # noqa: E402
from copy_task import N_CLASSES, N_INPUTS, ModReLU, copy_batch  # noqa: E402

import manifoldparam as mp  # noqa: E402
from manifoldparam.caching import auto_cache, cached  # noqa: E402


class RNN(nn.Module):
    """expRNN's cell with any recurrent module ``rec`` (``h ↦ h Wᵀ``).

    ``read_once``: read ``rec.weight`` once per forward and call ``F.linear(h, w)`` at each
    step (no cache needed) instead of calling ``rec`` at each step.
    """

    def __init__(self, n: int, rec: nn.Module, read_once: bool = False) -> None:
        super().__init__()
        self.n = n
        self.inp = nn.Linear(N_INPUTS, n)
        self.rec = rec
        self.act = ModReLU(n)
        self.out = nn.Linear(n, N_CLASSES)
        self.read_once = read_once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = nn.functional.embedding(x, self.inp.weight.T) + self.inp.bias
        h = u.new_zeros(x.shape[1], self.n)
        if self.read_once:
            w = self.rec.weight
            rec = lambda h: nn.functional.linear(h, w)  # noqa: E731
        else:
            rec = self.rec
        hs = []
        for u_t in u.unbind(0):  # not u[t]: its backward zero-fills (T, batch, n) per step
            h = self.act(rec(h) + u_t)
            hs.append(h)
        return self.out(torch.stack(hs))


class _Identity(nn.Module):
    """A parametrization that does nothing: what T reads through parametrize's property cost."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


DEVICE = torch.device("cpu")  # --device


def _free_reads(rec: nn.Module) -> Callable[[], contextlib.AbstractContextManager[None]]:
    """The floor row's context: a ``cached()`` block that computes ``rec.weight`` once on entry
    and makes every read inside it return that tensor with no check (the property of ``rec``'s
    own class is replaced; ``rec`` serves no other variant)."""
    cls = type(rec)
    prop = cls.__dict__["weight"]
    box: list[torch.Tensor | None] = [None]
    cls.weight = property(lambda self: box[0], prop.fset)  # type: ignore[attr-defined]

    @contextlib.contextmanager
    def ctx() -> Iterator[None]:
        with cached():
            box[0] = prop.fget(rec)
            try:
                yield
            finally:
                box[0] = None

    return ctx


def orthogonal_linear(n: int) -> nn.Linear:
    rec = nn.Linear(n, n, bias=False)
    nn.init.orthogonal_(rec.weight)
    return rec.to(DEVICE)


class Step:
    """One training step (``zero_grad``, forward, ``backward``, ``step``); each call appends its
    (forward, backward, optimizer step) seconds to ``phases``."""

    def __init__(self, run: Callable[[list[float]], None]) -> None:
        self.run = run
        self.phases: list[tuple[float, ...]] = []

    def __call__(self) -> None:
        marks = [now(DEVICE)]
        self.run(marks)
        self.phases.append(tuple(b - a for a, b in itertools.pairwise(marks)))


def make_variants(n: int, length: int, batch: int, uncached: bool) -> dict[str, Step]:
    gen = torch.Generator().manual_seed(0)
    x, y = (t.to(DEVICE) for t in copy_batch(batch, length, gen))  # T = length + 20
    loss_fn = nn.CrossEntropyLoss()

    def trainer(model: nn.Module, opt: torch.optim.Optimizer, ctx: Callable[[], object]) -> Step:
        def step(marks: list[float]) -> None:
            with ctx():  # type: ignore[attr-defined]
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(x).reshape(-1, N_CLASSES), y.reshape(-1))
                marks.append(now(DEVICE))
                loss.backward()
                marks.append(now(DEVICE))
                opt.step()
                marks.append(now(DEVICE))

        return Step(step)

    none = contextlib.nullcontext
    variants: dict[str, Step] = {}
    torch.manual_seed(0)
    plain = RNN(n, orthogonal_linear(n)).to(DEVICE)
    variants["unconstrained"] = trainer(plain, torch.optim.Adam(plain.parameters(), 1e-3), none)

    torch.manual_seed(0)
    ours = RNN(n, mp.orthogonal(orthogonal_linear(n))).to(DEVICE)
    variants["manifoldparam cached()"] = trainer(
        ours, torch.optim.Adam(ours.parameters(), 1e-3), cached
    )
    torch.manual_seed(0)
    ours_auto = auto_cache(RNN(n, mp.orthogonal(orthogonal_linear(n))).to(DEVICE))
    variants["manifoldparam auto"] = trainer(
        ours_auto, torch.optim.Adam(ours_auto.parameters(), 1e-3), none
    )
    torch.manual_seed(0)
    hoisted = RNN(n, mp.orthogonal(orthogonal_linear(n)), read_once=True).to(DEVICE)
    variants["manifoldparam, weight read once"] = trainer(
        hoisted, torch.optim.Adam(hoisted.parameters(), 1e-3), none
    )
    torch.manual_seed(0)
    floor = RNN(n, mp.orthogonal(orthogonal_linear(n))).to(DEVICE)
    variants["cached(), reads free (floor)"] = trainer(
        floor, torch.optim.Adam(floor.parameters(), 1e-3), _free_reads(floor.rec)
    )
    if uncached:
        torch.manual_seed(0)
        ours_none = RNN(n, mp.orthogonal(orthogonal_linear(n))).to(DEVICE)
        variants["manifoldparam uncached"] = trainer(
            ours_none, torch.optim.Adam(ours_none.parameters(), 1e-3), none
        )

    try:
        import geotorch
        from torch.nn.utils import parametrize

        torch.manual_seed(0)
        rec = orthogonal_linear(n)
        geotorch.orthogonal(rec, "weight")
        geo = RNN(n, rec).to(DEVICE)
        variants["geotorch + parametrize.cached()"] = trainer(
            geo, torch.optim.Adam(geo.parameters(), 1e-3), parametrize.cached
        )
    except ImportError:
        print("geotorch not installed: skipped", file=sys.stderr)

    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    rec = orthogonal_linear(n)
    parametrize.register_parametrization(rec, "weight", _Identity())
    ident = RNN(n, rec).to(DEVICE)
    variants["torch parametrize, identity map"] = trainer(
        ident, torch.optim.Adam(ident.parameters(), 1e-3), none
    )

    import geoopt

    torch.manual_seed(0)
    rec = orthogonal_linear(n)
    rec.weight = geoopt.ManifoldParameter(rec.weight.detach().clone(), manifold=geoopt.Stiefel())
    rgeo = RNN(n, rec).to(DEVICE)
    variants["geoopt RiemannianAdam"] = trainer(
        rgeo, geoopt.optim.RiemannianAdam(rgeo.parameters(), 1e-3), none
    )
    return variants


def sign_test(wins: int, n: int) -> float:
    """Two-sided exact sign test: the probability, if each round were a fair coin, of a count
    of wins at least as far from ``n/2`` as ``wins``. Small p: one side is faster (which one,
    the count says); large p: parity within the noise."""
    k = min(wins, n - wins)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=190)
    parser.add_argument("--T", type=int, default=100, help="time steps (= L + 20)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-uncached", action="store_true", help="skip the slow uncached run")
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated substrings: run only the variants whose name contains one "
        "(the unconstrained reference always runs), e.g. --only 'cached(),auto,geoopt'",
    )
    parser.add_argument("--device", default="cpu", help="e.g. cuda (default cpu)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    variants = make_variants(args.n, args.T - 20, args.batch, not args.no_uncached)
    if args.only:
        keep = [k.strip() for k in args.only.split(",")]
        variants = {
            k: v for k, v in variants.items() if k == "unconstrained" or any(s in k for s in keep)
        }
    names = list(variants)
    for step in variants.values():  # warm-up
        step()
    times: dict[str, list[float]] = {k: [] for k in names}
    phases: dict[str, list[list[float]]] = {k: [] for k in names}  # per round: fwd, bwd, step
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            steps = 1 if name == "manifoldparam uncached" else args.steps
            variants[name].phases.clear()
            t0 = now(DEVICE)
            for _ in range(steps):
                variants[name]()
            times[name].append((now(DEVICE) - t0) / steps)
            per_step = variants[name].phases
            phases[name].append([statistics.fmean(c) for c in zip(*per_step, strict=True)])
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    # Paired per round: each variant's step against the unconstrained step of the same round
    # (the machine's speed drifts between rounds; within a round it is nearly constant).
    table = {}
    for k, v in times.items():
        ratios = [t / u for t, u in zip(v, times["unconstrained"], strict=True)]
        extra = [t - u for t, u in zip(v, times["unconstrained"], strict=True)]
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios * 3)
        table[k] = {
            "median_ms": 1e3 * statistics.median(v),
            "ratio": statistics.median(ratios),
            "ratio_q1": q1,
            "ratio_q3": q3,
            "extra_ms": 1e3 * statistics.median(extra),
        }
    where = (
        torch.cuda.get_device_name(DEVICE)
        if DEVICE.type == "cuda"
        else f"{torch.get_num_threads()} threads"
    )
    print(
        f"\nTraining step, orthogonal RNN n={args.n}, T={args.T}, batch {args.batch}, "
        f"{where}, torch {torch.__version__}; "
        f"{args.rounds} interleaved rounds of {args.steps} steps; ratio = median over rounds of "
        f"(step / unconstrained step of the same round), [quartiles]\n"
    )
    print("| variant | ms / step | vs unconstrained | extra ms / step |")
    print("| --- | ---: | ---: | ---: |")
    for k, v in table.items():
        print(
            f"| {k} | {v['median_ms']:.1f} | {v['ratio']:.3f}x "
            f"[{v['ratio_q1']:.3f}, {v['ratio_q3']:.3f}] | {v['extra_ms']:+.1f} |"
        )
    # The peers against our cached steps directly, paired per round as above.
    print()
    pairs = [
        (ours, peer)
        for ours in (
            "manifoldparam cached()",
            "manifoldparam auto",
            "manifoldparam, weight read once",
            "cached(), reads free (floor)",
        )
        for peer in ("geotorch + parametrize.cached()", "geoopt RiemannianAdam")
        if ours in times and peer in times
    ]
    for ours, peer in pairs:
        r = [a / b for a, b in zip(times[ours], times[peer], strict=True)]
        q1, _, q3 = statistics.quantiles(r, n=4) if len(r) > 1 else (r * 3)
        faster = sum(x < 1.0 for x in r)
        p = sign_test(faster, len(r))
        table[f"{ours} / {peer}"] = {
            "ratio": statistics.median(r),
            "ratio_q1": q1,
            "ratio_q3": q3,
            "faster": faster,
            "p_sign": p,
        }
        print(
            f"{ours} / {peer}: {statistics.median(r):.3f}x [{q1:.3f}, {q3:.3f}] "
            f"(ours faster in {faster} of {len(r)} rounds; sign test p = {p:.2g})"
        )
    # Where each variant's extra time goes: forward (T reads of the weight and the map's
    # forward), backward, optimizer step; paired per round with the unconstrained step.
    print("\n| variant | extra ms: forward | backward | optimizer step |")
    print("| --- | ---: | ---: | ---: |")
    for k in names[1:]:
        cols = []
        for i in range(3):
            d = [a[i] - u[i] for a, u in zip(phases[k], phases["unconstrained"], strict=True)]
            cols.append(1e3 * statistics.median(d))
        table[k]["extra_phases_ms"] = cols  # type: ignore[assignment]
        print(f"| {k} | {cols[0]:+.1f} | {cols[1]:+.1f} | {cols[2]:+.1f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "table": table}, indent=1)
        )
    return table


if __name__ == "__main__":
    main()
