"""The wheel bundle the GPU run carries: download it, and check it installs on Python 3.12.

    python bench/gpu/wheels.py download .gpu-wheels   # pip download each pin of wheels.txt
    python bench/gpu/wheels.py check .gpu-wheels      # what `make gpu-wheels` runs after it

The target GPU machines run Python 3.12 with torch and transformers but reach no
package index, so the farm's other dependencies travel as cp312 manylinux x86-64
wheels (bench/gpu/run.sh installs them with --no-deps into a temporary target).
`check` proves, on this machine, that the folder holds exactly the pinned wheels,
that each installs on CPython 3.12 manylinux x86-64, that together with the image's
packages (image-packages.txt, stood in by empty wheels) they resolve with pip's own
resolver, and that they fit the size limit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

HERE = Path(__file__).resolve().parent
PINS = HERE / "wheels.txt"
IMAGE = HERE / "image-packages.txt"
LIMIT_MIB = 60
# pip matches a manylinux tag exactly, so name every glibc level a wheel may carry.
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]
TARGET = [
    "--only-binary=:all:",
    "--python-version",
    "3.12",
    "--implementation",
    "cp",
    *(arg for platform in PLATFORMS for arg in ("--platform", platform)),
]
# A version above any floor, for image packages whose version nobody reported.
UNKNOWN_VERSION = "9999"


def read_requirements(path: Path) -> list[Requirement]:
    """The requirements of a pip requirements file (comments and blank lines skipped)."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def pinned(requirement: Requirement) -> str:
    """The exact version a `name==version` line pins."""
    specs = list(requirement.specifier)
    if len(specs) != 1 or specs[0].operator != "==":
        raise ValueError(f"{requirement}: pin one exact version")
    return specs[0].version


def download(folder: Path) -> int:
    """Download every pin of wheels.txt, without dependencies, for CPython 3.12 x86-64."""
    folder.mkdir(parents=True, exist_ok=True)
    for requirement in read_requirements(PINS):
        # One call per package: a package with no such wheel is named in the error.
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *TARGET,
             "--dest", str(folder), str(requirement)],
            check=True,
        )  # fmt: skip
    return check(folder)


def _stub_wheel(folder: Path, name: str, version: str) -> None:
    """An empty wheel that stands in for a package the GPU image already has."""
    dist = f"{canonicalize_name(name).replace('-', '_')}-{version}"
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as wheel:
        info = f"{dist}.dist-info"
        wheel.writestr(
            f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        )
        tags = "Root-Is-Purelib: true\nTag: py3-none-any\n"
        wheel.writestr(f"{info}/WHEEL", f"Wheel-Version: 1.0\nGenerator: kolors-farm\n{tags}")
        wheel.writestr(f"{info}/RECORD", "")


def check(folder: Path) -> int:
    """Print the bundle with sizes; 0 if it is complete, installable and resolves."""
    pins = {canonicalize_name(r.name): pinned(r) for r in read_requirements(PINS)}
    wheels = sorted(folder.glob("*.whl"))
    problems: list[str] = []
    found: dict[str, str] = {}
    total = 0
    print(f"{'wheel':<90} {'MiB':>6}")
    for path in wheels:
        name, version, _build, _tags = parse_wheel_filename(path.name)
        size = path.stat().st_size
        total += size
        print(f"{path.name:<90} {size / 2**20:6.2f}")
        if name in found:
            problems.append(f"two wheels of {name}: keep one version")
        found[name] = str(version)
    print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in all (limit {LIMIT_MIB} MiB)")
    if total > LIMIT_MIB * 2**20:
        problems.append(f"{total / 2**20:.1f} MiB is over the {LIMIT_MIB} MiB limit")
    for name, pin in pins.items():
        if found.get(name) != pin:
            problems.append(f"{name}=={pin}: no such wheel in {folder}")
    problems += [f"{name}: not in wheels.txt" for name in sorted(set(found) - set(pins))]
    if not problems:
        problems += _resolve(folder)
    for problem in problems:
        print(f"PROBLEM: {problem}")
    return 1 if problems else 0


def _resolve(folder: Path) -> list[str]:
    """pip's resolver, for CPython 3.12 x86-64, over the bundle and the image's stand-ins."""
    image = read_requirements(IMAGE)
    with tempfile.TemporaryDirectory(prefix="kolors-wheels-check-") as scratch:
        stubs = Path(scratch) / "image"
        stubs.mkdir()
        for requirement in image:
            specs = list(requirement.specifier)
            version = specs[0].version if specs else UNKNOWN_VERSION
            _stub_wheel(stubs, requirement.name, version)
        report = Path(scratch) / "report.json"
        # Only what this command names: no pip.conf indexes, find-links or constraints.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
        env["PIP_CONFIG_FILE"] = os.devnull
        result = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
             "--no-index", "--find-links", str(folder), "--find-links", str(stubs), *TARGET,
             "--target", str(Path(scratch) / "site"), "--report", str(report),
             "-r", str(PINS)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )  # fmt: skip
        if result.returncode != 0:
            return [f"pip cannot resolve the bundle for CPython 3.12:\n{result.stderr[-3000:]}"]
        planned = json.loads(report.read_text())["install"]
    names = {canonicalize_name(item["metadata"]["name"]) for item in planned}
    from_image = sorted(names & {canonicalize_name(r.name) for r in image})
    print(f"resolves for CPython 3.12 manylinux x86-64: {len(names)} distributions")
    print(f"relies on the GPU image for: {', '.join(from_image) or 'nothing'}")
    return []


def main(argv: list[str] | None = None) -> int:
    """`download DIR` or `check DIR`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("command", choices=("download", "check"))
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    return download(args.folder) if args.command == "download" else check(args.folder)


if __name__ == "__main__":
    sys.exit(main())
