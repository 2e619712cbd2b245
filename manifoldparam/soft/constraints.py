r"""The base of every soft constraint: its multipliers, its term of the Lagrangian, its checks.

:class:`Constraint` owns one Lagrange multiplier (:class:`Multiplier`) per element of its
function's value and adds one term to the Lagrangian; the kinds (:mod:`.kinds`) say which
term and which bounds. Subclasses name their bounds (``bounds = ("max",)``) and define
``infeasibility`` (the signed distance to the feasible set) and ``term``.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from manifoldparam._device import value_readable

__all__ = ["Constraint", "ConstraintReturn", "Multiplier", "fmt"]


def _rebuild_multiplier(data: Tensor, requires_grad: bool) -> Multiplier:
    return Multiplier(data, requires_grad)


class Multiplier(nn.Parameter):
    """A Lagrange multiplier: an ``nn.Parameter`` that optimizers must *ascend*.

    The type lets :mod:`manifoldparam.soft` recognise multipliers inside any optimizer (and
    refuse a line-search optimizer, or descent, on them); it survives ``copy.deepcopy`` and
    pickling. ``state_dict`` stores it as a plain tensor.
    """

    def __reduce_ex__(self, proto: Any) -> Any:  # keep the type through pickle
        return (_rebuild_multiplier, (self.data, self.requires_grad))


@dataclass
class ConstraintReturn:
    """What one constraint returns: its Lagrangian term, ``fn``'s value, the infeasibility."""

    value: Tensor
    fn_value: Tensor
    inf: Tensor


_is_compiling = torch.compiler.is_compiling


def _device_fix(device: torch.device) -> str:
    """What to do when a constraint's tensors are not on fn's device."""
    return (
        "Move the constraints with the model before building the optimizer: "
        f"mdmm.to({str(device)!r}) (or declare them after model.to(...); constrain() puts "
        "them on the attribute's device)."
    )


def _fn_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


class Constraint(nn.Module):
    r"""Base of the constraint kinds: a function, its multiplier(s), ``scale`` and ``damping``.

    A constraint adds :math:`s\,\psi(c(\theta), \lambda)` to the Lagrangian
    :math:`f(\theta) + \sum_i s_i \psi_i`, minimised over the parameters :math:`\theta` and
    maximised over the multiplier :math:`\lambda` (a :class:`Multiplier`, one per element of
    ``fn``'s value); by default :math:`\psi(c, \lambda) = \lambda c + d c^2/2`. Calling the
    constraint returns a :class:`ConstraintReturn`.

    Args:
        fn: a differentiable callable returning a tensor of shape ``shape``. Called with no
            argument (mdmm style), or, for a constraint declared on a module attribute with
            :func:`manifoldparam.soft.constrain`, with the attribute's current (parametrized)
            value.
        *args: the kind's bounds in order (:attr:`bounds`: ``value``, ``max``, ``min``), then
            ``scale`` and ``damping`` (mdmm's positional signatures).
        shape: shape of ``fn``'s value; one multiplier per element (default: a scalar).
        dtype: the multipliers' and bounds' dtype (default: torch's default dtype).
        **named: the same bounds, ``scale`` and ``damping`` by name.

    Other Parameters:
        scale (float): multiplies the constraint's whole Lagrangian term (mdmm's ``scale``).
        damping (float): the quadratic damping / augmented-Lagrangian penalty :math:`d`. It damps
            the oscillation of ``fn`` and the multiplier around the solution: too little and
            the violation oscillates (forever at ``d = 0`` where ``f`` is flat along the
            constraint); too much and the Lagrangian gets stiff: convergence slows and plain
            SGD diverges once ``lr·scale·d·|∇fn|² > 2``. On min 0 s.t. x = 1 with SGD at
            lr 0.05, d = 2 settles in 323 steps, d = 0.1 still oscillates after 4000, d = 10
            takes 1824, d = 41 diverges.

    Raises:
        TypeError: ``fn`` is not callable; too many, unknown, repeated or missing arguments.
        ValueError: a NaN/infinite/negative ``scale`` or ``damping``, a NaN bound, or
            ``min > max``.

    A subclass defines :meth:`infeasibility` and, if it is not of the
    :math:`\lambda c + d c^2/2` form, :meth:`term`.

    Example (a new kind, ``|fn| <= max``, with the clamp as its projection):
        >>> class AbsMax(mp.Constraint):
        ...     relation = "<="
        ...     bounds = ("max",)
        ...     def infeasibility(self, fn_value):
        ...         return fn_value.clamp(-self.max, self.max) - fn_value
        ...     def bound_repr(self):
        ...         return f"|.| <= {float(self.max):g}"
        >>> w = torch.tensor([3.0], requires_grad=True)
        >>> c = AbsMax(lambda: w.sum(), 1.0, damping=2.0)
        >>> c().inf                     # Π(fn) − fn: clamp(3, −1, 1) − 3
        tensor(-2., grad_fn=<SubBackward0>)
    """

    #: "==", "<=", ">=" or "in": how :meth:`describe` prints the kind.
    relation: ClassVar[str] = "=="
    #: Whether the multiplier is projected onto ``λ <= 0`` by :func:`dual_update`.
    nonpositive_multiplier: ClassVar[bool] = False
    #: Whether the constraint binds even when satisfied (equalities only).
    always_active: ClassVar[bool] = False

    scale: Tensor
    damping: Tensor

    #: The names of the kind's bound arguments, in order (``("value",)``, ``("max",)``,
    #: ``("min", "max")``): each is a positional or keyword argument after ``fn``, before
    #: ``scale`` and ``damping`` (mdmm's signatures), registered as a buffer of that name.
    bounds: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # What help() and inspect show: fn, the bounds, scale, damping, shape, dtype.
        P = inspect.Parameter
        params = [P("fn", P.POSITIONAL_OR_KEYWORD)]
        params += [P(b, P.POSITIONAL_OR_KEYWORD) for b in cls.bounds]
        params += [
            P("scale", P.POSITIONAL_OR_KEYWORD, default=1.0),
            P("damping", P.POSITIONAL_OR_KEYWORD, default=1.0),
            P("shape", P.KEYWORD_ONLY, default=()),
            P("dtype", P.KEYWORD_ONLY, default=None),
        ]
        cls.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]

    def __init__(
        self,
        fn: Callable[..., Tensor],
        *args: float | Tensor,
        shape: Sequence[int] = (),
        dtype: torch.dtype | None = None,
        **named: float | Tensor,
    ) -> None:
        super().__init__()
        names = (*self.bounds, "scale", "damping")
        if len(args) > len(names):
            raise TypeError(
                f"{type(self).__name__}() takes fn, {', '.join(names)}: {len(args) + 1} "
                "positional arguments given"
            )
        given = dict(zip(names, args, strict=False))
        for k, v in named.items():
            if k not in names or k in given:
                raise TypeError(
                    f"{type(self).__name__}(): unexpected or repeated argument {k!r} (takes fn, "
                    f"{', '.join(names)}, shape=, dtype=)"
                )
            given[k] = v
        missing = [b for b in self.bounds if b not in given]
        if missing:
            raise TypeError(f"{type(self).__name__}(): missing the bound {', '.join(missing)}")
        scale, damping = given.get("scale", 1.0), given.get("damping", 1.0)
        if not callable(fn):
            raise TypeError(
                f"{type(self).__name__}: fn must be callable (a function returning a tensor), "
                f"got {type(fn).__name__}; e.g. {type(self).__name__}(lambda: w.norm(), ...)."
            )
        self.fn = fn
        #: (module, attribute) when declared on a module attribute, else None.
        self.target: tuple[nn.Module, str] | None = None
        #: "Linear.weight" style name of the target, used in messages.
        self.owner: str | None = None
        dtype = dtype or torch.get_default_dtype()
        self.register_buffer("scale", self._number("scale", scale, dtype))
        self.register_buffer("damping", self._number("damping", damping, dtype))
        self.__dict__["_scale_damping"] = (float(self.scale), float(self.damping))
        self._check_overflow(dtype)
        self.lmbda = Multiplier(torch.zeros(tuple(shape), dtype=dtype))
        for name in self.bounds:
            self._register_bound(name, given[name], dtype)
        if "min" in self.bounds and "max" in self.bounds and bool((self.min > self.max).any()):
            raise ValueError(
                f"{self.describe()}: min {fmt(self.min)} > max {fmt(self.max)}; swap them."
            )

    # ------------------------------------------------------------------ validation
    def _number(self, what: str, value: float | Tensor, dtype: torch.dtype) -> Tensor:
        """``scale`` / ``damping`` as a 0-dim tensor, refused when NaN, infinite or negative."""
        if isinstance(value, Tensor):
            if value.dim() != 0 or not value_readable(value):
                raise ValueError(
                    f"{self.describe()}: {what} must be a number, got a tensor of shape "
                    f"{tuple(value.shape)}; pass a float (one {what} per constraint)."
                )
            value = value.item()
        v = float(value)  # a Python float: 1e40 stays 1e40 (as float32 it would be inf)
        if not math.isfinite(v) or v < 0:
            raise ValueError(
                f"{self.describe()}: {what}={v} is not a finite number >= 0; pass one such as "
                f"{what}=1.0 (a NaN or infinite {what} turns the Lagrangian into NaN, a negative "
                f"one rewards the violation)."
            )
        return torch.as_tensor(v, dtype=dtype)

    def _check_overflow(self, dtype: torch.dtype) -> None:
        """Refuse a ``scale`` (or ``scale·damping``) whose square overflows ``dtype``.

        The constraint's gradient is ``scale·(λ + damping·c)·∇c``; an optimizer that keeps the
        squared gradient (Adam, RMSprop, Adagrad) stores ``inf`` once it passes
        ``finfo(dtype).max`` (float32: ``scale`` > 1.8e19) and its steps become ``m/√inf = 0``:
        training silently freezes. Checked on the Python floats (no device read)."""
        limit = math.sqrt(torch.finfo(dtype).max)
        scale, damping = self._floats
        for what, v in (("scale", scale), ("scale·damping", scale * damping)):
            if v > limit:
                raise ValueError(
                    f"{self.describe()}: {what} = {v:.3g} overflows the optimizer's statistics "
                    f"in {dtype}: the squared gradient (about {v * v:.3g}) exceeds "
                    f"the largest {dtype} ({torch.finfo(dtype).max:.3g}), so Adam's second "
                    "moment becomes inf and its steps 0 (training freezes). Keep scale (and "
                    f"scale·damping) below {limit:.3g}: rescale fn instead (e.g. divide it by "
                    "its typical size), or compute in float64 (the parameters and the multipliers)."
                )

    @property
    def _floats(self) -> tuple[float, float]:
        """``(scale, damping)`` as Python floats, kept from construction (no device read)."""
        return self.__dict__["_scale_damping"]

    def _register_bound(self, name: str, value: float | Tensor, dtype: torch.dtype | None) -> None:
        """Register the bound ``name`` (``value``, ``max``, ``min``) as a buffer; refuse NaN, and
        the infinities no value of ``fn`` can meet (``value=±inf``, ``max=-inf``, ``min=+inf``;
        ``max=+inf`` and ``min=-inf`` are vacuous and allowed)."""
        t = torch.as_tensor(value, dtype=dtype or torch.get_default_dtype())
        if value_readable(t):  # (a meta or fake bound has no value to check)
            unmeetable = {"value": torch.isinf(t), "max": t == -math.inf, "min": t == math.inf}
            for bad, why in (
                (torch.isnan(t), "NaN"),
                (unmeetable[name], "an infinity that no value of fn can meet"),
            ):
                if bool(bad.any()):
                    where = "" if t.dim() == 0 else f" ({int(bad.sum())} of {t.numel()} entries)"
                    raise ValueError(
                        f"{self.describe()}: {name}={_fmt_given(t)} is {why}{where}; pass a "
                        f"finite {name}. (Left in, the constraint value c would be NaN or "
                        "infinite, and so would the Lagrangian and every parameter after one "
                        "step.)"
                    )
        self.register_buffer(name, t)

    # ------------------------------------------------------------------ the math
    def infeasibility(self, fn_value: Tensor) -> Tensor:  # pragma: no cover - abstract
        """The signed constraint value :math:`c` entering the Lagrangian."""
        raise NotImplementedError

    def violation(self, fn_value: Tensor) -> Tensor:
        """The true infeasibility ``projection(fn) - fn`` (0 when satisfied)."""
        return self.infeasibility(fn_value)

    def term(self, c: Tensor) -> Tensor:
        """:math:`\\psi(c, \\lambda) = \\lambda c + d c^2 / 2`, summed over elements."""
        l_term = self.lmbda * c
        damp_term = self.damping * c**2 / 2
        out = self.scale * (l_term + damp_term)
        return out.sum() if out.dim() else out

    def dual_target(self, c: Tensor, step: Tensor | float) -> Tensor:
        """The method-of-multipliers update :math:`\\lambda + \\rho c` (projected if needed)."""
        new = self.lmbda + step * c
        return new.clamp(max=0) if self.nonpositive_multiplier else new

    # ------------------------------------------------------------------ evaluation
    def _warn_cpu_scalar(self, device: torch.device) -> None:
        """Once per constraint: its 0-dim multiplier or bound is on the CPU, fn's value on
        ``device``. Correct (a CPU 0-dim tensor acts as a scalar), but its gradient crosses
        devices at every step, and NCCL broadcasts of the multipliers and CUDA graph capture
        fail. Not while torch.compile traces (dynamo cannot trace a warning)."""
        self.__dict__["_device_warned"] = True
        warnings.warn(
            f"{self.describe()}: its multiplier or bound is on the CPU, fn's value on "
            f"{device}; this works (a CPU 0-dim tensor acts as a scalar) but copies across "
            f"devices at every step, and NCCL broadcasts and CUDA graphs fail. "
            f"{_device_fix(device)}",
            stacklevel=2,
        )

    def evaluate(self) -> Tensor:
        """``fn()`` (or ``fn(module.<name>)``), checked to be a tensor of the right shape."""
        if self.target is not None:
            module, name = self.target
            out = self.fn(getattr(module, name))
        else:
            out = self.fn()
        if not isinstance(out, Tensor):
            raise TypeError(
                f"{self.describe()}: fn returned {type(out).__name__}, not a tensor; return a "
                "differentiable torch.Tensor computed from the parameters."
            )
        cpu_scalar = False
        for t in (self.lmbda, *self.buffers()):
            if t.device == out.device:
                continue
            if t.dim() == 0 and t.is_cpu:  # acts as a scalar beside tensors on any device
                cpu_scalar = True
                continue
            raise ValueError(
                f"{self.describe()}: fn's value is on {out.device} but the constraint's "
                f"multipliers or bounds are on {t.device}. {_device_fix(out.device)}"
            )
        if cpu_scalar and not self.__dict__.get("_device_warned") and not _is_compiling():
            self._warn_cpu_scalar(out.device)
        if out.shape != self.lmbda.shape:
            raise ValueError(
                f"{self.describe()}: fn returned a tensor of shape {tuple(out.shape)} but the "
                f"constraint has multipliers of shape {tuple(self.lmbda.shape)}. "
                + (
                    "A scalar is needed: reduce fn's value (e.g. .sum() or .mean()) or, for "
                    f"one constraint per element, pass shape={tuple(out.shape)}."
                    if self.lmbda.dim() == 0
                    else "Make fn return that shape or rebuild the constraint with "
                    f"shape={tuple(out.shape)}."
                )
            )
        return out

    def forward(self) -> ConstraintReturn:
        fn_value = self.evaluate()
        c = self.infeasibility(fn_value)
        return ConstraintReturn(self.term(c), fn_value, self.violation(fn_value))

    # ------------------------------------------------------------------ naming
    def bound_repr(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:
        """``"EqConstraint(mean_abs(Linear.weight) == 1)"``: how messages name it."""
        arg = f"({self.owner})" if self.owner else "()"
        f = getattr(self, "fn", None)  # (None while __init__ checks its arguments)
        fn = "fn" if f is None else _fn_name(f)
        try:
            bound = " " + self.bound_repr()
        except AttributeError:  # during __init__, before the bounds are registered
            bound = ""
        return f"{type(self).__name__}({fn}{arg}{bound})"

    def extra_repr(self) -> str:
        shape = f", shape={tuple(self.lmbda.shape)}" if self.lmbda.dim() else ""
        return (
            f"{_fn_name(self.fn)}({self.owner or ''}) {self.bound_repr()}, "
            f"scale={float(self.scale):g}, damping={float(self.damping):g}{shape}"
        )

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # An mdmm checkpoint has a slack variable we eliminate in closed form: drop it.
        state_dict.pop(prefix + "slack", None)
        super()._load_from_state_dict(state_dict, prefix, *args)
        if value_readable(self.scale) and value_readable(self.damping):  # a loaded scale
            self.__dict__["_scale_damping"] = (float(self.scale), float(self.damping))
            self._check_overflow(self.lmbda.dtype)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> Constraint:
        # .half() / .to(dtype): the overflow limit is the new dtype's (float16: scale <= 255).
        out = super()._apply(fn, recurse)
        if self.lmbda.is_floating_point():
            self._check_overflow(self.lmbda.dtype)
        return out


def _fmt_given(t: Tensor) -> str:
    return f"{float(t)}" if t.numel() == 1 else f"<tensor {tuple(t.shape)}>"


def fmt(t: Tensor) -> str:
    if t.numel() == 1 and not t.is_meta:
        return f"{float(t):g}"
    return f"<tensor {tuple(t.shape)}>"
