"""The README's Python snippets run as written, and its links point at files of the repository.

Every fenced ```python block of README.md is executed, in this process, in a fresh namespace:
a block must define every name it uses.  Blocks are small by design (tiny arrays).  A block
that cannot run here can opt out with ``# readme: skip`` on its first line (none does).
"""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)


def _blocks(lang):
    text = README.read_text(encoding="utf-8")
    out = []
    for m in _FENCE.finditer(text):
        if m.group(1) == lang:
            line = text.count("\n", 0, m.start()) + 1
            out.append((line, m.group(2)))
    return out


PYTHON_BLOCKS = _blocks("python")


def test_readme_has_python_snippets():
    # the quickstart: dense, sparse, param groups + state_dict (at least)
    assert len(PYTHON_BLOCKS) >= 3


@pytest.mark.parametrize("line, code", PYTHON_BLOCKS, ids=[f"README.md:{ln}" for ln, _ in PYTHON_BLOCKS])
def test_readme_snippet_runs(line, code):
    if code.lstrip().startswith("# readme: skip"):
        pytest.skip("marked '# readme: skip'")
    if "fastadapt.torch" in code:
        pytest.importorskip("torch")
    namespace = {"__name__": "__readme__"}
    exec(compile(code, f"README.md:{line}", "exec"), namespace)


def test_readme_snippets_use_the_public_api_only():
    # fastadapt.<name> and `from fastadapt... import` name only public objects
    public = {"Adam", "AdamW", "Adagrad", "RMSprop", "SparseAdam", "Optimizer", "RowGrad", "functional",
              "distributed", "DeviceCSR", "__version__", "RowwiseAdagrad", "Ftrl", "BagGrad", "embedding_bag"}
    for line, code in PYTHON_BLOCKS:
        for name in re.findall(r"\bfa\.(\w+)", code):
            assert name in public, f"README.md:{line}: fa.{name} is not a public name"
        for module in re.findall(r"^\s*(?:from|import)\s+(fastadapt[\w.]*)", code, re.M):
            assert module in ("fastadapt", "fastadapt.functional", "fastadapt.distributed", "fastadapt.torch"), (
                f"README.md:{line}: imports {module}, not a public module")


def test_readme_links_resolve():
    # relative links ([text](path) and [text](path#anchor)) name files or folders of the repository
    text = README.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [u for u in links if not re.match(r"[a-z]+:", u) and not u.startswith("#")]
    assert local, "the README links into docs/"
    for url in local:
        path = url.split("#", 1)[0]
        assert (ROOT / path).exists(), f"README.md links to {url}, which is not in the repository"


# ---------------------------------------------------------------------------------------------
# the guides' Python examples that run on any machine (no GPU, no MPI): each page's
# ``.. code-block:: python`` blocks run in sequence in one namespace, as a reader would type them

DOC_PAGES = ["docs/index.rst", "docs/getting-started.rst", "docs/sparse.rst"]

_RST_BLOCK = re.compile(r"^\.\. code-block:: python\n((?:[ \t]*\n)*(?:(?:[ \t]+[^\n]*)?\n)+)", re.M)


def _rst_blocks(page):
    text = (ROOT / page).read_text(encoding="utf-8")
    blocks = []
    for m in _RST_BLOCK.finditer(text):
        lines = m.group(1).splitlines()
        indent = min(len(ln) - len(ln.lstrip()) for ln in lines if ln.strip())
        blocks.append("\n".join(ln[indent:] for ln in lines))
    return blocks


@pytest.mark.parametrize("page", DOC_PAGES)
def test_doc_page_snippets_run(page):
    blocks = _rst_blocks(page)
    assert blocks, f"{page} has no python code-block"
    namespace = {"__name__": "__docs__"}
    for j, code in enumerate(blocks):
        exec(compile(code, f"{page} (python block {j + 1})", "exec"), namespace)
