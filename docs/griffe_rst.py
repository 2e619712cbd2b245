"""A griffe extension: the package's reST docstring markup as mkdocstrings' markdown.

The docstrings are written for ``help()`` and Sphinx-style readers (``:func:`register```,
``:math:`f(x)```, ``.. math::``, literal blocks after ``::``). Before mkdocstrings renders
them, this extension rewrites, in every docstring of the package:

* ``:func:`name``` (``:class:``, ``:meth:``, ``:attr:``, ``:mod:``, ``:data:``) into a link
  to the object, resolved as Python resolves a name from where the docstring is (the
  object, its parents, the package; ``.name`` relative to the module's package; ``~`` shows
  the last component). A name of the package that resolves to nothing is a broken reference:
  it is logged as a warning, so ``mkdocs build --strict`` fails. Names of other packages
  (torch, geoopt, scipy, ...) and builtins are shown as code.
* ``:math:`x``` into inline math, a ``.. math::`` block into display math (arithmatex);
* a paragraph ending in ``::`` and its indented block into a fenced code block;
* ``low, high: ...`` in an Args section into one entry per name;
* ``Example:`` / ``Example (what it shows):`` before a doctest into griffe's ``Examples:``
  section, so the doctest renders as code.
"""

from __future__ import annotations

import builtins
import html
import logging
import re
from typing import Any

import griffe

_log = logging.getLogger("mkdocs.plugins.griffe_rst")  # counted by mkdocs --strict
PACKAGE = "manifoldparam"
ROLE = re.compile(r":(?P<role>func|class|meth|attr|mod|data|obj|exc):`(?P<target>[^`]+)`")
#: Packages whose objects the docstrings name: shown as code (no inventory to link them to).
EXTERNAL = {
    "torch",
    "geoopt",
    "scipy",
    "numpy",
    "mdmm",
    "cooper",
    "geotorch",
    "torchmin",
    "torchzero",
    "functools",
    "copy",
    "pickle",
    "typing",
    "math",
    "warnings",
}
#: Paths that some docstrings still use after the issue-18 reorganisation, and where the
#: object is now. Remove an entry once its docstring is fixed.
MATH = re.compile(r":math:`(?P<tex>[^`]+)`")
ARGS = {"Args:", "Arguments:", "Parameters:", "Params:", "Keyword Args:", "Other Parameters:"}
SHARED = re.compile(
    r"^(?P<pad>\s*)(?P<names>\w+(?:\s*,\s*\w+)+)(?P<type>\s*\([^)]*\))?:(?P<rest>.*)$"
)
EXAMPLE_START = re.compile(r"^(?P<pad>\s*)Example(?P<rest>\b.*)$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _blocks(text: str) -> str:
    """``.. math::`` directives and ``::`` literal blocks as markdown blocks."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        is_math = stripped == ".. math::"
        if not is_math and not (stripped.endswith("::") and not stripped.startswith("..")):
            out.append(line)
            i += 1
            continue
        base = _indent(line)
        j = i + 1
        body: list[str] = []
        while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > base):
            body.append(lines[j])
            j += 1
        while body and not body[-1].strip():
            body.pop()
            j -= 1
        content = [ln for ln in body if ln.strip()]
        if not content:  # a "::" with nothing indented after it: keep the text
            out.append(line[: len(line) - 1] if not is_math else line)
            i += 1
            continue
        cut = min(_indent(ln) for ln in content)
        pad = " " * base
        code = [ln[cut:] if ln.strip() else "" for ln in body]
        while code and not code[0].strip():
            code.pop(0)
        if is_math:
            out += [pad + r"\[", *(pad + ln for ln in code), pad + r"\]"]
        else:
            head = line.rstrip()[:-2].rstrip()
            if head.strip():
                out += [head if head.endswith(":") else head + ":", ""]
            out += [pad + "```python", *(pad + ln if ln else "" for ln in code), pad + "```"]
        i = j
    return "\n".join(out)


def _split_shared_params(text: str) -> str:
    """``low, high: the bounds`` in an Args section as one entry per name, as griffe reads."""
    lines = text.splitlines()
    out: list[str] = []
    section: int | None = None  # the indentation of the current Args heading
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() in ARGS:
            section = _indent(line)
        elif line.strip() and section is not None and _indent(line) <= section:
            section = None
        m = SHARED.match(line) if section is not None and _indent(line) > section else None
        if not m:
            out.append(line)
            i += 1
            continue
        j = i + 1
        while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > _indent(line)):
            j += 1
        rest = lines[i + 1 : j]
        for name in (n.strip() for n in m["names"].split(",")):
            out += [f"{m['pad']}{name}{m['type'] or ''}:{m['rest']}", *rest]
        i = j
    return "\n".join(out)


def _examples(text: str) -> str:
    """``Example:`` (or ``Example (what it shows):``, possibly over several lines) before a
    ``>>>`` block as griffe's ``Examples:`` section, the parenthesis as its first paragraph;
    griffe reads the singular as an admonition and would not render the doctest as code."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        start = EXAMPLE_START.match(line)
        j = i
        if start and start["rest"].lstrip().startswith("("):
            while j + 1 < len(lines) and not lines[j].rstrip().endswith("):"):
                j += 1  # a parenthesis over several lines
        head = " ".join(ln.strip() for ln in lines[i : j + 1])
        following = lines[j + 1].lstrip() if j + 1 < len(lines) else ""
        if not start or not head.endswith(":") or not following.startswith(">>>"):
            out.append(line)
            i += 1
            continue
        pad = start["pad"]
        out.append(f"{pad}Examples:")
        note = head[len("Example") : -1].strip()
        if note.startswith("(") and note.endswith(")"):
            out += [f"{pad}    {note[1:-1].strip()}:", ""]
        i = j + 1
    return "\n".join(out)


class RstToMarkdown(griffe.Extension):
    """Rewrite every docstring of the package once it is loaded (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **_: Any) -> None:
        if pkg.path != PACKAGE:
            return
        self.loader = loader
        self._walk(pkg, set())

    def _walk(self, obj: griffe.Object, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            obj.docstring.value = self.convert(obj.docstring.value, obj)
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(member, seen)

    def _lookup(self, path: str, role: str = "") -> str | None:
        try:
            found = self.loader.modules_collection[path]
            if found.is_alias:
                found = found.final_target
        except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            return None
        name = path.rsplit(".", 1)[-1]
        if role != "mod" and found.is_module and name in found.members:
            # ``from .orthogonal import orthogonal``: Python's package attribute is the
            # function, griffe's the submodule of the same name.
            return self._lookup(f"{found.path}.{name}")
        return found.path

    def resolve(self, name: str, obj: griffe.Object, role: str = "") -> str | None:
        """The canonical path ``name`` means in ``obj``'s docstring, or ``None``."""
        module = obj.module
        if name.startswith("."):
            package = module.path if module.is_init_module else module.parent.path
            return self._lookup(package + name, role)
        candidates = []
        scope: griffe.Object | None = obj
        while scope is not None:
            candidates.append(f"{scope.path}.{name}")
            scope = scope.parent
        candidates += [name, f"{PACKAGE}.{name}"]
        for cand in candidates:
            found = self._lookup(cand, role)
            if found is not None:
                return found
        return None

    def _role(self, m: re.Match[str], obj: griffe.Object) -> str:
        target = m["target"].strip()
        title = target
        if "<" in target and target.endswith(">"):  # :func:`title <target>`
            title, target = (s.strip() for s in target[:-1].split("<", 1))
        short = target.startswith("~")
        target = target.lstrip("~").removesuffix("()")
        if short:
            title = target.rsplit(".", 1)[-1]
        title = title.lstrip("~")
        code = f"<code>{html.escape(title)}</code>"
        path = self.resolve(target, obj, m["role"])
        root = target.split(".", 1)[0]
        if path is None and (root in EXTERNAL or hasattr(builtins, root)):
            return code  # another package's object or a builtin: shown, not linked
        if path is None and any(part.startswith("_") for part in obj.path.split(".")):
            return code  # a private object's note: never rendered, so never a broken link
        if path is None:
            where = f"{obj.relative_filepath}:{obj.lineno}" if obj.lineno else obj.path
            _log.warning("%s: %s (%s): broken reference %r", where, obj.path, m["role"], target)
            return code
        return f'<autoref identifier="{path}" optional>{code}</autoref>'

    def convert(self, text: str, obj: griffe.Object) -> str:
        text = _examples(_split_shared_params(_blocks(text)))
        text = MATH.sub(lambda m: r"\(" + m["tex"] + r"\)", text)
        return ROLE.sub(lambda m: self._role(m, obj), text)
