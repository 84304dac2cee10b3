"""Build the sdist and the wheel and check what they carry.

Usage (from the repository root)::

    python tools/check_dist.py                  # isolated build (pip fetches the build requirements)
    python tools/check_dist.py --no-isolation   # use the installed setuptools (>= 77) instead

Builds the sdist with ``python -m build``, then the wheel from that sdist, into a temporary
directory, and asserts that

* the build prints no setuptools deprecation warning (e.g. about ``project.license`` as a table);
* the wheel holds only ``fastadapt/...`` files and its ``.dist-info``, including
  ``fastadapt/py.typed``, the LICENSE file and ``License-Expression: BSD-3-Clause``, and no
  compiled or cache files;
* the sdist holds ``LICENSE``, ``README.md``, ``pyproject.toml`` and the package (with
  ``py.typed``), and no ``tests/``, ``bench/``, ``examples/``, ``tools/`` or built docs: the
  tests need the repository (see docs/development.rst).

Exit status 0 when everything holds, 1 otherwise (each problem printed on one line).
"""

import argparse
import os
import pathlib
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "fastadapt"

#: what a build log must not contain
_WARNING = re.compile(r"SetuptoolsDeprecationWarning|_DeprecatedConfig|"
                      r"license.*(deprecat|TOML table)|(deprecat|TOML table).*license|"
                      r"you need to update your project and remove deprecated calls", re.I)
_JUNK = re.compile(r"(^|/)__pycache__/|\.py[cod]$|\.nb[ic]$|(^|/)\.")


def _build(outdir, isolation):
    # no --sdist/--wheel: build makes the sdist, then the wheel *from the unpacked sdist*, which
    # also checks that the sdist is complete, and leaves no stale build/ tree to leak into a wheel
    cmd = [sys.executable, "-m", "build", "--outdir", str(outdir), str(ROOT)]
    if not isolation:
        cmd.insert(3, "--no-isolation")
    env = dict(os.environ, PYTHONWARNINGS="default")      # show deprecation warnings, do not hide them
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    return proc.returncode, proc.stdout


def check_wheel(path):
    problems = []
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        dist_info = [n.split("/", 1)[0] for n in names if n.split("/", 1)[0].endswith(".dist-info")]
        dist_info = dist_info[0] if dist_info else None
        for n in names:
            top = n.split("/", 1)[0]
            if top != PACKAGE and top != dist_info:
                problems.append(f"wheel: {n} is outside {PACKAGE}/ and the .dist-info")
            if _JUNK.search(n):
                problems.append(f"wheel: {n} is a compiled or cache file")
        for required in (f"{PACKAGE}/__init__.py", f"{PACKAGE}/py.typed", f"{PACKAGE}/__init__.pyi",
                         f"{PACKAGE}/functional.pyi", f"{PACKAGE}/optim/base.pyi"):
            if required not in names:
                problems.append(f"wheel: {required} is missing")
        if dist_info is None:
            problems.append("wheel: no .dist-info")
        else:
            if not any(n.startswith(f"{dist_info}/") and n.endswith("LICENSE") for n in names):
                problems.append("wheel: the LICENSE file is not in the .dist-info")
            metadata = z.read(f"{dist_info}/METADATA").decode("utf-8")
            if "License-Expression: BSD-3-Clause" not in metadata:
                problems.append("wheel: METADATA has no 'License-Expression: BSD-3-Clause'")
    return problems, len(names)


def check_sdist(path):
    problems = []
    with tarfile.open(path) as t:
        names = [m.name for m in t.getmembers() if m.isfile()]
    top = names[0].split("/", 1)[0] if names else ""
    rel = {n.split("/", 1)[1] for n in names if "/" in n}
    for required in ("LICENSE", "README.md", "pyproject.toml", "PKG-INFO",
                     f"{PACKAGE}/__init__.py", f"{PACKAGE}/py.typed"):
        if required not in rel:
            problems.append(f"sdist: {top}/{required} is missing")
    for n in sorted(rel):
        first = n.split("/", 1)[0]
        if first in ("tests", "bench", "examples", "tools"):
            problems.append(f"sdist: {n} (the sdist carries no {first}/)")
        elif n.startswith("docs/_build/"):
            problems.append(f"sdist: {n} (built documentation)")
        elif _JUNK.search(n):
            problems.append(f"sdist: {n} is a compiled or cache file")
    return problems, len(names)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-isolation", action="store_true",
                        help="build with the installed setuptools instead of an isolated environment")
    args = parser.parse_args(argv)
    try:
        import build  # noqa: F401  (the PyPA build frontend)
    except ImportError:
        print("check_dist: needs the 'build' package: python -m pip install build")
        return 2
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        rc, log = _build(pathlib.Path(tmp), isolation=not args.no_isolation)
        if rc != 0:
            print(log)
            print(f"check_dist: python -m build failed (exit status {rc})")
            return 1
        for line in log.splitlines():
            if _WARNING.search(line):
                problems.append(f"build log: {line.strip()}")
        wheels = sorted(pathlib.Path(tmp).glob("*.whl"))
        sdists = sorted(pathlib.Path(tmp).glob("*.tar.gz"))
        if len(wheels) != 1 or len(sdists) != 1:
            problems.append(f"expected one wheel and one sdist, got {[p.name for p in wheels + sdists]}")
        else:
            wp, wn = check_wheel(wheels[0])
            sp, sn = check_sdist(sdists[0])
            problems += wp + sp
    for p in problems:
        print(p)
    if problems:
        print(f"check_dist: {len(problems)} problem(s)")
        return 1
    print(f"check_dist: {wheels[0].name} ({wn} files: {PACKAGE}/ and .dist-info only, py.typed, LICENSE) and "
          f"{sdists[0].name} ({sn} files: no tests/bench/examples) are as intended; no deprecation warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
