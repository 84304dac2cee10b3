"""Check the built documentation site without a browser.

Usage (from the repository root, after building the site)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html
    python docs/check_site.py docs/_build/html

Asserts that

* every expected page exists (``EXPECTED_PAGES``);
* the pages hold the anchors other documents link to: the specification's section labels
  (``spec-adam``, ...) and the API reference's public names (``fastadapt.Adam``, ...);
* every internal link resolves: each ``href``/``src`` that points into the site (not
  ``http:``, ``https:``, ``mailto:``, ...) names a file that exists, and its ``#anchor``,
  if any, is an ``id`` (or ``<a name>``) in that file.

Exit status 0 when everything holds, 1 otherwise (each problem printed on one line).
Standard library only.
"""

import argparse
import html.parser
import os
import sys
import urllib.parse

#: pages the site must have (paths relative to the build directory)
EXPECTED_PAGES = [
    "index.html",
    "getting-started.html",
    "torch.html",
    "optimizers.html",
    "sparse.html",
    "gpu.html",
    "distributed.html",
    "performance.html",
    "memory.html",
    "api.html",
    "spec.html",
    "development.html",
    "genindex.html",
    "search.html",
]

#: anchors that must exist, by page: the stable labels the README, docstrings and tests link to
EXPECTED_ANCHORS = {
    "spec.html": [
        "spec-conventions", "spec-step-counter",
        "spec-adagrad", "spec-rmsprop", "spec-adam", "spec-adamw", "spec-sparseadam",
        "spec-sgd", "spec-adadelta", "spec-adamax", "spec-nadam", "spec-radam",
        "spec-sparse", "spec-sparse-formats", "spec-sparse-semantics", "spec-sparse-lazy",
        "spec-sparse-exact", "spec-sparse-adagrad", "spec-nonfinite", "spec-validation",
        "spec-state", "spec-tolerances", "spec-decisions", "spec-compressed-state",
    ],
    "api.html": [
        "fastadapt.Adam", "fastadapt.AdamW", "fastadapt.Adagrad", "fastadapt.RMSprop",
        "fastadapt.SparseAdam", "fastadapt.Optimizer", "fastadapt.Optimizer.step",
        "fastadapt.Optimizer.state_dict", "fastadapt.Optimizer.load_state_dict",
        "fastadapt.RowGrad", "fastadapt.BagGrad", "fastadapt.embedding_bag", "module-fastadapt.functional", "fastadapt.functional.adam",
        "fastadapt.functional.adamw", "fastadapt.functional.adagrad",
        "fastadapt.functional.rmsprop", "fastadapt.distributed.ShardedOptimizer",
        "fastadapt.distributed.ShardedTable",
    ],
    "performance.html": ["performance-measuring", "performance-dense", "performance-sparse",
                         "performance-limits"],
    "sparse.html": ["sparse-recsys", "sparse-bags"],
    "development.html": ["development-sdist"],
}

_EXTERNAL_SCHEMES = {"http", "https", "mailto", "ftp", "data", "javascript", "tel"}


class _Page(html.parser.HTMLParser):
    """Collects a page's ids and the (tag, attribute, value, line) of its links."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.ids = set()
        self.links = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        if tag == "a" and attrs.get("name"):
            self.ids.add(attrs["name"])
        for attr in ("href", "src"):
            value = attrs.get(attr)
            if value is not None and tag in ("a", "link", "img", "script", "iframe", "source"):
                self.links.append((tag, attr, value, self.getpos()[0]))

    handle_startendtag = handle_starttag


def _parse(path):
    page = _Page()
    with open(path, encoding="utf-8") as f:
        page.feed(f.read())
    page.close()
    return page


def check_site(root):
    """Return the list of problems found in the site built under ``root`` (empty: all good)."""
    root = os.path.abspath(root)
    problems = []
    if not os.path.isdir(root):
        return [f"{root}: no such directory (build the site first)"]
    for rel in EXPECTED_PAGES:
        if not os.path.isfile(os.path.join(root, rel)):
            problems.append(f"missing page: {rel}")

    pages = {}
    for dirpath, dirnames, filenames in os.walk(root):
        # _static holds the theme's assets (including Jinja template fragments named .html),
        # _sources the reST sources: neither is a page of the site
        if os.path.normpath(dirpath) == root:
            dirnames[:] = [d for d in dirnames if d not in (".doctrees", "_static", "_sources")]
        for name in filenames:
            if name.endswith(".html"):
                path = os.path.join(dirpath, name)
                pages[os.path.normpath(path)] = _parse(path)

    for rel, anchors in EXPECTED_ANCHORS.items():
        page = pages.get(os.path.normpath(os.path.join(root, rel)))
        if page is None:
            continue                       # reported as a missing page
        for anchor in anchors:
            if anchor not in page.ids:
                problems.append(f"{rel}: expected anchor #{anchor} is missing")

    checked = 0
    for path, page in sorted(pages.items()):
        rel_page = os.path.relpath(path, root)
        for tag, attr, value, line in page.links:
            url = urllib.parse.urlsplit(value)
            if url.scheme in _EXTERNAL_SCHEMES or url.netloc or value.startswith("//"):
                continue
            if url.scheme:                 # an unknown scheme is not a local file either
                continue
            target_path = urllib.parse.unquote(url.path)
            if target_path == "":
                target = path              # "#anchor": this page
            else:
                target = os.path.normpath(os.path.join(os.path.dirname(path), target_path))
                if os.path.isdir(target):
                    target = os.path.join(target, "index.html")
            where = f"{rel_page}:{line}: <{tag} {attr}={value!r}>"
            checked += 1
            if not target.startswith(root + os.sep) and target != root:
                problems.append(f"{where} points outside the site")
                continue
            if not os.path.isfile(target):
                problems.append(f"{where}: {os.path.relpath(target, root)} does not exist")
                continue
            fragment = urllib.parse.unquote(url.fragment)
            if fragment and target.endswith(".html"):
                ids = pages[os.path.normpath(target)].ids if os.path.normpath(target) in pages else set()
                if fragment not in ids:
                    problems.append(f"{where}: no id {fragment!r} in {os.path.relpath(target, root)}")
    if not pages:
        problems.append(f"{root}: no HTML pages")
    check_site.links_checked = checked
    return problems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", nargs="?", default=os.path.join(os.path.dirname(__file__), "_build", "html"),
                        help="the built HTML directory (default: docs/_build/html)")
    args = parser.parse_args(argv)
    problems = check_site(args.site)
    for p in problems:
        print(p)
    if problems:
        print(f"check_site: {len(problems)} problem(s) in {args.site}")
        return 1
    print(f"check_site: {len(EXPECTED_PAGES)} expected pages present, "
          f"{sum(len(a) for a in EXPECTED_ANCHORS.values())} expected anchors found, "
          f"{check_site.links_checked} internal links resolve ({args.site})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
