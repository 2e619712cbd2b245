"""Every ```python block of README.md and docs/**/*.md runs, and every docstring example does.

A page is a tutorial: its blocks run in order in one namespace, so a later block may use what
an earlier one defined. A block preceded by ``<!-- no-run: REASON -->`` is not run; each such
block is reported as a skipped test with its reason (``pytest -ra`` lists them). Any page
added under docs/ is picked up. Tracebacks point at the markdown file and line.

The docstring examples (``>>>`` lines) of every module of the package run as doctests.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import manifoldparam

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,}|~{3,})(?P<info>[^`]*)$")
NO_RUN = re.compile(r"^\s*<!--\s*no-run:\s*(?P<reason>.*?)\s*-->\s*$")
RUN_LANGS = {"python", "py"}


@dataclass(frozen=True)
class Block:
    path: str
    line: int  # 1-based line of the first code line
    code: str
    lang: str
    no_run: str | None  # the stated reason, or None


def parse_blocks(text: str, path: str) -> list[Block]:
    """Fenced code blocks of a markdown text, with the no-run marker before each."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, ticks = m["indent"], m["ticks"]
        lang = m["info"].strip().split(" ")[0].lower() if m["info"].strip() else ""
        prev = next((ln for ln in reversed(lines[:i]) if ln.strip()), "")
        marker = NO_RUN.match(prev)
        start = i + 1
        j = start
        close = re.compile(rf"^{re.escape(indent)}{ticks[0]}{{{len(ticks)},}}\s*$")
        while j < len(lines) and not close.match(lines[j]):
            j += 1
        if j == len(lines):
            raise ValueError(f"{path}:{i + 1}: unclosed code fence")
        body = [ln[len(indent) :] if ln.startswith(indent) else ln for ln in lines[start:j]]
        blocks.append(
            Block(path, start + 1, "\n".join(body), lang, marker["reason"] if marker else None)
        )
        i = j + 1
    return blocks


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def python_blocks(page: Path) -> list[Block]:
    return [b for b in parse_blocks(page.read_text(), rel(page)) if b.lang in RUN_LANGS]


def run_page(blocks: list[Block], namespace: dict | None = None) -> dict:
    """Run the page's runnable blocks in order in one namespace; line numbers are the page's."""
    ns = {"__name__": "__docs__"} if namespace is None else namespace
    torch.manual_seed(0)
    for b in blocks:
        if b.no_run is not None:
            continue
        code = compile("\n" * (b.line - 1) + b.code, b.path, "exec")
        exec(code, ns)
    return ns


PAGES = [p for p in pages() if python_blocks(p)]
NO_RUN_BLOCKS = [b for p in pages() for b in python_blocks(p) if b.no_run is not None]


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_page_runs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # files a page writes (checkpoints) land in a temp dir
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the pages' tensors are tiny: threads only add overhead
    try:
        run_page(python_blocks(page))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("block", NO_RUN_BLOCKS, ids=lambda b: f"{b.path}:{b.line}")
def test_block_not_run(block: Block) -> None:
    assert block.no_run, f"{block.path}:{block.line}: a no-run marker must state its reason"
    pytest.skip(f"{block.path}:{block.line} not run: {block.no_run}")


def test_readme_and_docs_have_runnable_code() -> None:
    """The collection is not vacuous: README and the docs pages hold runnable blocks."""
    names = {rel(p) for p in PAGES}
    assert "README.md" in names
    assert any(n.startswith("docs/") for n in names)
    assert sum(len(python_blocks(p)) for p in PAGES) >= 10


def test_readme_is_a_short_guide() -> None:
    """Issue 19: the README is a user guide (at most ~400 lines); measurements live in
    BENCHMARKS.md, of which the README keeps only the at-a-glance table."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 400
    tables = [ln for ln in readme.splitlines() if ln.startswith("| at a glance")]
    assert len(tables) == 1 and "BENCHMARKS.md" in readme


def test_runner_reports_the_failing_line() -> None:
    text = "# t\n\n```python\nx = 1\n```\n\ntext\n\n```python\n\ny = x + undefined\n```\n"
    blocks = parse_blocks(text, "page.md")
    assert [b.line for b in blocks] == [4, 10]
    with pytest.raises(NameError) as info:
        run_page(blocks)
    frame = info.traceback[-1]
    assert (str(frame.path), frame.lineno + 1) == ("page.md", 11)


def test_runner_shares_the_namespace_and_honours_no_run() -> None:
    text = (
        "```python\na = 2\n```\n<!-- no-run: needs a GPU -->\n```python\nraise SystemExit\n```\n"
        "```py\nb = a * 3\n```\n```bash\nexit 1\n```\n"
    )
    blocks = parse_blocks(text, "p.md")
    assert [(b.lang, b.no_run) for b in blocks] == [
        ("python", None),
        ("python", "needs a GPU"),
        ("py", None),
        ("bash", None),
    ]
    ns = run_page([b for b in blocks if b.lang in RUN_LANGS])
    assert ns["b"] == 6


def test_unclosed_fence_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"p\.md:1: unclosed"):
        parse_blocks("```python\nx = 1\n", "p.md")


def modules() -> list[str]:
    return [
        m.name
        for m in pkgutil.walk_packages(manifoldparam.__path__, "manifoldparam.")
        if not m.name.rsplit(".", 1)[-1].startswith("_")
    ]


def doctests() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    found = []
    for name in modules():
        module = importlib.import_module(name)
        found.extend(t for t in finder.find(module, name) if t.examples)
    return sorted(found, key=lambda t: t.name)


DOCTESTS = doctests()


@pytest.mark.parametrize("test", DOCTESTS, ids=lambda t: t.name)
def test_docstring_example(test: doctest.DocTest) -> None:
    torch.manual_seed(0)
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    # The examples' names: ``torch``, ``nn``, and the package as ``manifoldparam`` or ``mp``.
    for name, value in (("torch", torch), ("nn", torch.nn), ("manifoldparam", manifoldparam)):
        test.globs.setdefault(name, value)
    test.globs.setdefault("mp", manifoldparam)
    out: list[str] = []
    result = runner.run(test, out=out.append)
    assert result.failed == 0, "".join(out)


def test_docstring_examples_are_collected() -> None:
    assert len(DOCTESTS) >= 10, [t.name for t in DOCTESTS]
