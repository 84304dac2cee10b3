"""Sphinx configuration of fastadapt's documentation.

Build (from the repository root)::

    pip install -e ".[docs]"
    python -m sphinx -W --keep-going -b html docs docs/_build/html
    python docs/check_site.py docs/_build/html
"""

import os
import sys

# document the checkout the docs live in, not another installed copy
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import fastadapt  # noqa: E402

project = "fastadapt"
author = "the fastadapt developers"
copyright = "2026, the fastadapt developers"
version = release = fastadapt.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "numpydoc",
]

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
root_doc = "index"
language = "en"

# API reference: classes documented by their public names (fastadapt.Adam, ...), members
# listed by numpydoc from the docstrings; no autosummary stub files to keep in step.
autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "none"          # signatures as written; the numpydoc sections give the types
autodoc_mock_imports = ["mpi4py"]   # fastadapt.distributed imports mpi4py lazily; belt and braces
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

html_theme = "pydata_sphinx_theme"
html_title = f"fastadapt {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
}
html_sidebars = {"**": ["sidebar-nav-bs"]}
html_static_path = []
html_show_sourcelink = False


# ---------------------------------------------------------------- docstring fix-ups
# A docstring type such as "ndarray, shape (k, *row_shape)" is plain reST for numpydoc, where a
# lone "*" opens emphasis (a docutils warning, an error under -W).  Escape such stars outside
# ``literals`` instead of dropping the member from the reference.
import re  # noqa: E402

_LONE_STAR = re.compile(r"(?<=[(,\s])\*(?=[A-Za-z_]\w*[),])")


def _escape_lone_stars(app, what, name, obj, options, lines):
    for j, line in enumerate(lines):
        parts = line.split("``")
        for k in range(0, len(parts), 2):          # even parts are outside ``...``
            parts[k] = _LONE_STAR.sub(r"\\*", parts[k])
        lines[j] = "``".join(parts)


def setup(app):
    # priority < 500 (numpydoc's): run on the raw docstring, before numpydoc rewrites it
    app.connect("autodoc-process-docstring", _escape_lone_stars, priority=400)
