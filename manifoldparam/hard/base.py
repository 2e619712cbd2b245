"""The shared base of every hard constraint (registered by :mod:`.registration`).

A hard constraint is a *trivialization*: a smooth surjective map ``f: R^d -> M`` from
unconstrained coordinates (the ``original`` tensor PyTorch stores) onto a set ``M`` (the
value ``module.weight`` returns). Training any optimizer on the coordinates keeps the
weight on ``M`` by construction.

The contract every subclass implements (the same as :mod:`torch.nn.utils.parametrize`):

* ``forward(x) = f(x)`` maps coordinates onto the set;
* ``right_inverse(w)`` returns coordinates ``x`` with ``f(x) == w`` for any ``w`` on the set,
  so that ``module.weight = w`` works. The *first* call (made by
  :func:`~torch.nn.utils.parametrize.register_parametrization`) moves the user's current
  weight to the nearest point of the set instead of rejecting it; every later call rejects a
  value off the set with a :class:`ValueError` that names the module, the attribute, the
  distance and the fix, and leaves the weight unchanged;
* ``d = original.numel()`` equals the dimension of ``M`` (minimal coordinates), so Newton-type
  optimizers meet no dead directions.

Precision (one policy for every constraint, in :meth:`Parametrization.compute`): the map runs
with autocast off, in float32 for bfloat16/float16 coordinates and in the coordinates' own
dtype otherwise, and returns the coordinates' dtype. Under ``torch.autocast`` a float32 weight
is therefore exact in float32 and autocast casts it per op, as it casts a plain float32 weight;
a weight stored in bfloat16/float16 lies on the set to that dtype's precision
(:meth:`Parametrization.to_storage`). A value that is not finite is named, not returned
(:class:`NonFiniteError`), wherever reading it costs no device sync.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from manifoldparam._device import autocast_off, value_readable
from manifoldparam._torch import (
    any_autocast,
    dtensor_of,
    removing,
    transferring,
)
from manifoldparam.caching.api import invalidate
from manifoldparam.caching.cache import cached_forward, note_change
from manifoldparam.hard._values import (  # re-exported: the sets import them from here
    LOW_PRECISION,
    _all_finite,
    _eager_readable,
    compute_dtype,
    max_abs,
)

__all__ = [
    "LOW_PRECISION",
    "NonFiniteError",
    "Parametrization",
    "check_finite",
    "compute_dtype",
    "max_abs",
    "owner_name",
]


def owner_name(module: nn.Module, name: str) -> str:
    """``"Linear.weight"``: how messages name an attribute (the user's class, not the
    ``ParametrizedLinear`` subclass torch swaps in)."""
    cls = type(module)
    if parametrize.is_parametrized(module):
        cls = cls.__bases__[0]
    return f"{cls.__name__}.{name}"


class NonFiniteError(FloatingPointError):
    """A constrained value (or what it is computed from) holds NaN or Inf; the message names the
    attribute, the tensor (coordinates, a buffer such as ``base``) and the likely cause."""


class Parametrization(nn.Module, metaclass=abc.ABCMeta):
    r"""The base of every hard constraint: write a new set by implementing five hooks.

    A subclass describes a set :math:`M` and a smooth surjection :math:`f: \mathbb{R}^d \to M`
    from unconstrained coordinates (the ``original`` tensor torch stores) onto it:

    * :meth:`map` -- :math:`f(x)`, coordinates to a point of the set;
    * :meth:`inverse` -- coordinates :math:`x` with :math:`f(x) = w` for a point :math:`w` of
      the set (it may reset buffers, such as a base point);
    * :meth:`project` -- the nearest point of the set to any tensor;
    * :meth:`distance` -- how far a tensor is from the set, as a 0-dim tensor (the metric the
      tolerance is stated in);
    * :attr:`dim` -- the dimension :math:`d` of the set, which the coordinates must match
      (minimal coordinates: no dead directions for Newton-type optimizers).

    Optional: :attr:`manifold` (the geoopt manifold, for users' checks), :meth:`default_atol`,
    :meth:`validate` (registration-time checks of the weight), :meth:`explain` and
    :meth:`membership_failure` (what :meth:`check` says), :meth:`to_storage` (half precision),
    :meth:`check_state` (what a checkpoint may load), :meth:`forget` (memos of the map), and
    ``has_base_point = True`` for :func:`~manifoldparam.rebase`.

    The base gives every subclass, written once: registration through :func:`register` (the
    user's weight moved to :meth:`project`, the coordinate count checked against :attr:`dim`),
    the checked assignment ``module.weight = w`` (off the set: a ``ValueError`` naming the
    attribute and the distance, nothing changed), :meth:`check` with ``explain=True``, the
    never-stale cache (:func:`~manifoldparam.cached`, :func:`~manifoldparam.auto_cache`), the
    precision policy (:meth:`compute`: autocast off, half precision computed in float32,
    non-finite values named), checkpoint checks, and rebase for sets with a base point.

    Example (symmetric matrices, in minimal coordinates: the lower triangle)::

        class Symmetric(manifoldparam.Parametrization):
            set_name = "symmetric"

            def __init__(self, shape, **kw):
                super().__init__(shape, **kw)
                self.n = shape[-1]
                rows, cols = torch.tril_indices(self.n, self.n)
                self.register_buffer("rows", rows, persistent=False)
                self.register_buffer("cols", cols, persistent=False)

            @property
            def dim(self):
                return self.n * (self.n + 1) // 2

            def map(self, x):
                low = x.new_zeros(self.n, self.n).index_put((self.rows, self.cols), x)
                return low + low.mT - torch.diag(low.diagonal())

            def inverse(self, w):
                return w[self.rows, self.cols]

            def project(self, w):
                return (w + w.mT) / 2

            def distance(self, w):
                return (w - w.mT).abs().amax()

        layer = manifoldparam.register(nn.Linear(4, 4), "weight", Symmetric)

    Args:
        shape: the shape of the constrained tensor (``module.weight.shape``).
        atol: how far from the set an assigned value may be and still count as on it. ``None``
            picks a tolerance from the dtype and size (:meth:`default_atol`).
        owner: ``"Linear.weight"``, how messages name the attribute (:func:`register` sets it).
    """

    #: Human name of the set, used in messages ("orthogonal", "symmetric positive definite").
    set_name: str = "constrained set"
    #: A set of complex matrices (:class:`~manifoldparam.hard.Unitary`): complex weights only.
    complex_weight: bool = False
    #: Whether the map is centred at a base point that :func:`~manifoldparam.rebase` may move
    #: to the current weight (``inverse(project(map(x)))`` re-centres the coordinates).
    has_base_point: bool = False

    # torch.jit.script compiles every property and ``forward`` of a submodule; these are
    # Python-only (the attribute's getter raises a clear error when a scripted model runs).
    __jit_unused_properties__ = ("dim", "manifold")

    def __init__(
        self, shape: Sequence[int], *, atol: float | None = None, owner: str | None = None
    ) -> None:
        super().__init__()
        self.shape = torch.Size(shape)
        self.atol = atol
        # The first right_inverse (registration) projects; later ones (assignment) check.
        self._registered = False
        #: "Linear.weight": names the constrained attribute in every message.
        self.owner = owner or f"<{type(self).__name__}>"

    def __setattr__(self, name: str, value: Any) -> None:
        # Any assignment drops the cached values: a new setting (``p.method = "cayley"``)
        # changes what the map computes, which no tensor's version shows. (A new buffer object
        # is also seen by the cache's identity check, which covers writes into ``_buffers``.)
        super().__setattr__(name, value)
        # (Not before nn.Module.__init__, and not for ``training``: train()/eval() keep it.)
        if name != "training" and "_modules" in self.__dict__:
            invalidate(self)
            note_change()  # (also the entries of a chain this parametrization is in)

    # ----------------------------------------------------------------- the hooks
    @abc.abstractmethod
    def map(self, x: Tensor) -> Tensor:
        """:math:`f(x)`: the point of the set for coordinates ``x`` (shape ``(dim,)``, or what
        :meth:`inverse` returns). Differentiable; pure in ``x`` and this module's tensors (the
        cache relies on it)."""

    @abc.abstractmethod
    def inverse(self, w: Tensor) -> Tensor:
        """Coordinates ``x`` with ``map(x) == w`` for ``w`` on the set (already checked or
        projected by the base). May reset buffers, such as a base point, to make ``x`` small."""

    @abc.abstractmethod
    def project(self, w: Tensor) -> Tensor:
        """The nearest point of the set to ``w`` (same shape and dtype)."""

    @abc.abstractmethod
    def distance(self, w: Tensor) -> Tensor:
        """A 0-dim tensor: how far ``w`` is from the set (0 on it). No host sync."""

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """The dimension of the set: the number of coordinates (``original.numel()``)."""

    def forget(self) -> None:
        """Drop what the map remembers about its own tensors between calls (none here; see
        ``Orthogonal._exact_base``). Called by :func:`~manifoldparam.invalidate`."""

    def default_atol(self, dtype: torch.dtype) -> float:
        """Tolerance of :meth:`check` and of assignment when ``atol`` is not given."""
        return 0.0

    def to_storage(self, y: Tensor, dtype: torch.dtype) -> Tensor:
        """The value ``y`` (computed in float32) rounded to the half-precision ``dtype`` the
        coordinates are stored in. A set that rounding can leave (SPD) overrides this to land
        inside it; for the others rounding is monotone and keeps them (boxes with bounds of that
        dtype, the orthant) or stays within the dtype's precision (Stiefel)."""
        return y.to(dtype)

    # ----------------------------------------------------------------- precision
    def compute(self, x: Tensor) -> Tensor:
        """``f(x)`` under the precision policy (module docstring): autocast off, computed in
        float32 for half-precision coordinates, returned in ``x``'s dtype; a non-finite result
        raises :class:`NonFiniteError` on the CPU (a free read there). The cache stores what
        this returns. Sharded coordinates (a DTensor) are gathered first: the whole weight."""
        if not isinstance(x, Tensor):  # a torch.fx Proxy (symbolic_trace): record the map
            return self.map(x)
        if dtensor_of(x) is not None:  # sharded (fully_shard outside forward): the map needs
            x = x.full_tensor()  # all coordinates; a collective every rank must make
        low = x.dtype in LOW_PRECISION
        if low or any_autocast():
            with autocast_off(x):
                y = self.map(x.float() if low else x)
            if low:
                y = self.to_storage(y, x.dtype)
        else:
            y = self.map(x)
        if self.check_finite and _eager_readable(y) and not _all_finite(y):
            raise NonFiniteError(self._why_not_finite(x, y))
        return y

    #: Whether :meth:`compute` checks its value for NaN/Inf (where that read is free).
    check_finite: bool = True

    def _why_not_finite(self, x: Tensor, y: Tensor) -> str:
        """Which tensor brought the NaN/Inf into ``y``, for the error (read only on failure)."""
        bad = int((~torch.isfinite(y)).sum())
        head = f"{self.owner}: the constrained value has {bad} NaN/Inf entries of {y.numel()}"
        coords = int((~torch.isfinite(x.detach())).sum())
        if coords:
            return (
                f"{head}: its coordinates (parametrizations.{self.owner.rsplit('.', 1)[-1]}"
                f".original) hold {coords} NaN/Inf entries. The last optimizer step wrote them "
                "(a NaN/Inf gradient, or a learning rate too large): restore a checkpoint, "
                "lower the learning rate or clip the gradients; under fp16, use "
                "torch.amp.GradScaler, which skips such steps."
            )
        for name, b in self.named_buffers(recurse=False):
            if b.is_floating_point() and not bool(torch.isfinite(b).all()):
                return (
                    f"{head}: its buffer {name!r} holds NaN/Inf (written by a load, a rebase or "
                    f"a direct write); re-register the constraint or load a finite checkpoint."
                )
        norm = float(x.detach().double().norm())
        return (
            f"{head} from finite coordinates of norm {norm:.3e} ({x.dtype}): the map "
            "overflowed. Bring the coordinates back near 0 (manifoldparam.rebase for "
            "orthogonal weights), lower the learning rate, or use a wider dtype."
        )

    @property
    def manifold(self) -> object | None:
        """The geoopt manifold this set is (or lies in), or ``None`` where geoopt has none."""
        return None

    def validate(self, weight: Tensor) -> None:
        """Registration-time checks beyond the shared ones; raise with a clear message."""
        if weight.shape != self.shape:
            raise ValueError(
                f"{self.owner}: the parametrization was built for shape {tuple(self.shape)} but "
                f"the tensor has shape {tuple(weight.shape)}; build it with "
                f"{type(self).__name__}(module.weight.shape, ...)."
            )

    # ----------------------------------------------------------------- checkpoints
    def check_state(self, state: MutableMapping[str, Any], prefix: str) -> None:
        """Raise if what ``state`` holds for this constraint's buffers (keys ``prefix + name``)
        would not fit it; the module is not modified.

        Called by the attribute's load pre-hook before torch copies anything of it (so a
        failure leaves the attribute as it was), and by manifoldparam's loaders before they
        change anything. Absent keys are not checked (a strict load reports them). The error
        (a :class:`RuntimeError`) names the key, what was expected, what was found and the fix.
        An accepted entry may be replaced in ``state`` by this module's own value (a bound the
        code declares is kept exactly). The default checks nothing: no persistent buffers.
        """

    def _loaded(self, state: Mapping[str, Any], key: str, own: Tensor, what: str) -> Tensor | None:
        """``state[key]`` once it is known to fit ``own`` (a tensor of its shape, floating,
        finite); ``None`` when absent or when its values cannot be read (meta, fake)."""
        if key not in state:
            return None
        value = state[key]
        where = f"{self.owner}: the checkpoint's {what} {key!r}"
        if not isinstance(value, Tensor) or value.shape != own.shape:
            found = (
                f"has shape {tuple(value.shape)}"
                if isinstance(value, Tensor)
                else f"is a {type(value).__name__}"
            )
            raise RuntimeError(
                f"{where} {found}; this constraint's has shape {tuple(own.shape)}. The "
                "checkpoint is of another model or constraint (other sizes, map or batched=): "
                "build the model as it was when saved."
            )
        if not (value.is_floating_point() or (value.is_complex() and own.is_complex())):
            raise RuntimeError(f"{where} has dtype {value.dtype}, expected one like {own.dtype}.")
        if not value_readable(value):
            return None
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            raise RuntimeError(
                f"{where} holds {bad} NaN/Inf entries of {value.numel()}: the run that saved it "
                "had diverged. Load an earlier checkpoint."
            )
        return value

    # ----------------------------------------------------------------- public API
    #: ``forward(x)``: the value through the cache (:func:`~manifoldparam.caching.cached_forward`).
    forward = cached_forward

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> nn.Module:
        # .to() / .double() / .cuda(): the cached values are of the old tensors. Module._apply
        # visits children (this module) before their parent's ``original``, so dropping them
        # here also releases their graphs, which would otherwise make
        # torch.utils.swap_tensors (swap_module_params_on_conversion) refuse ``original``.
        invalidate(self)
        return super()._apply(fn, recurse)

    def right_inverse(self, w: Tensor) -> Tensor:
        check_finite(w, self.owner, "assigned value" if self._registered else "weight")
        store = w.dtype
        # In the compute dtype with autocast off, as the map (the module docstring's policy);
        # the check's tolerance is the storage dtype's.
        with autocast_off(w):
            x = self._right_inverse(w)
        return x.to(store)

    def _right_inverse(self, w: Tensor) -> Tensor:
        if not self._registered:
            w = self.project(w.to(compute_dtype(w.dtype)))
            self._registered = True
            _keep_values_on_removal()
        elif transferring():
            # torch registers this very instance on a second module and then gives it the
            # source's coordinates: nothing of ours may change (a base point would move the
            # source's weight), and the coordinates returned here are discarded.
            return self._without_side_effects(w)
        else:
            if w.shape != self.shape:
                raise ValueError(
                    f"{self.owner} = X: X has shape {tuple(w.shape)}, expected "
                    f"{tuple(self.shape)}. The weight is unchanged."
                )
            # X from another device (a CPU tensor for a CUDA model): to the parametrization's
            # device first, so that no buffer (Orthogonal.base) is set on the wrong one.
            device = next((t.device for t in self.buffers()), w.device)
            w = w.to(device)
            ok, why = self.check(w, explain=True)
            if not ok:
                raise ValueError(
                    f"{self.owner} = X: X is not {self.set_name}: {why}. The weight is "
                    "unchanged. Assign manifoldparam.project(module, name, X) to use the "
                    "nearest point of the set, or register with a larger atol=."
                )
            w = w.to(compute_dtype(w.dtype))
        return self.inverse(w)

    def _without_side_effects(self, w: Tensor) -> Tensor:
        """``inverse(project(w))`` with every buffer as it was before (the submodules' too: a
        set built from others, such as LowRank's orthogonal factors)."""
        objects = {(m, n): b for m in self.modules() for n, b in m._buffers.items()}
        values = {k: b.clone() for k, b in objects.items() if b is not None}
        x = self.inverse(self.project(w.to(compute_dtype(w.dtype))))
        with torch.no_grad():
            for k, b in objects.items():
                if b is not None and not torch.equal(b, values[k]):
                    b.copy_(values[k])
        for (m, n), b in objects.items():
            m._buffers[n] = b
        return x

    def tolerance(self, dtype: torch.dtype) -> float:
        return self.default_atol(dtype) if self.atol is None else float(self.atol)

    def check(
        self, w: Tensor, *, atol: float | None = None, explain: bool = False
    ) -> bool | tuple[bool, str | None]:
        """Whether ``w`` lies on the set within ``atol`` (geoopt's ``check_point`` style).

        With ``explain=True`` returns ``(ok, reason)``, ``reason`` saying what failed and by how
        much. This syncs with the host: use it in tests and at assignment, not per step.
        """
        tol = self.tolerance(w.dtype) if atol is None else atol
        # Measured in the compute dtype (no half kernels; float32 round-off is far below a half
        # tolerance), against the tolerance of the dtype the value is stored in.
        w = w.detach().to(compute_dtype(w.dtype))
        if w.shape != self.shape:
            ok, why = False, f"shape {tuple(w.shape)} != {tuple(self.shape)}"
        elif not bool(torch.isfinite(w).all()):
            bad = int((~torch.isfinite(w)).sum())
            ok, why = False, f"it contains {bad} NaN/Inf entries of {w.numel()}"
        else:
            with autocast_off(w):
                d = float(self.distance(w))
            ok = d <= tol
            why = None if ok else self.explain(w.detach(), d, tol)
            if ok:
                why = self.membership_failure(w.detach())
                ok = why is None
        return (ok, why) if explain else ok

    def explain(self, w: Tensor, d: float, tol: float) -> str:
        return f"distance {d:.3e} > tolerance {tol:.3e} ({w.dtype})"

    def membership_failure(self, w: Tensor) -> str | None:
        """A reason ``w`` is off the set that :meth:`distance` cannot see, or ``None``."""
        return None

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, owner={self.owner}"


def check_finite(w: Tensor, owner: str, what: str) -> None:
    """Raise a ValueError naming ``owner`` if ``w`` (the registered weight or an assigned value)
    holds NaN/Inf."""
    bad = ~torch.isfinite(w)
    if bool(bad.any()):
        raise ValueError(
            f"{owner}: the {what} contains {int(bad.sum())} NaN/Inf entries of {w.numel()}; "
            + (
                "initialise it with finite values first (e.g. torch.nn.init)."
                if what == "weight"
                else "the weight is unchanged."
            )
        )


def _value_for_removal(module: nn.Module, name: str, param: Tensor) -> None:
    """A parameter-registration hook: when torch's ``remove_parametrizations(...,
    leave_parametrized=False)`` puts one of our attributes' coordinates back as the attribute,
    the same Parameter gets the attribute's current value instead. The coordinates are minimal
    (a flat vector of another shape), so the "unparametrized" tensor torch would restore does
    not exist, and a module holding the flat vector fails at its next use."""
    found = removing(param)
    if found is None:
        return
    plist, leave = found
    if leave or not any(isinstance(p, Parametrization) for p in plist):
        return
    with torch.no_grad():
        param.set_(plist().detach().clone())


_REMOVAL_HOOK: list[object] = []


def _keep_values_on_removal() -> None:
    """Install :func:`_value_for_removal` (once, at the first registration of one of ours)."""
    if not _REMOVAL_HOOK:
        hook = nn.modules.module.register_module_parameter_registration_hook
        _REMOVAL_HOOK.append(hook(_value_for_removal))
