#!/usr/bin/env python3
"""Test crosslmm against dependency releases in a fresh virtual environment, and raise a
dependency's upper bound only after the whole suite has passed on the new release.

    python3 tools/deps.py test                       # what a fresh install picks today, whole suite
    python3 tools/deps.py test --lowest              # lowest supported transformers, the lowest_bound subset
    python3 tools/deps.py test transformers==5.20.0  # any release inside the declared ranges
    python3 tools/deps.py raise transformers 5.25.0  # test a new release; on success write the new bound

Every environment is made the way the README's test command makes one (`pip install
torch==2.13.0 -e ".[dev]"`) plus the pins given, so a result here is what a user gets.
`raise` writes `<=VERSION` into pyproject.toml for the run, and keeps it (with a row in
docs/compatibility.md) only if the suite passes; otherwise pyproject.toml is restored.
Why the policy: docs/compatibility.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
COMPATIBILITY = ROOT / "docs" / "compatibility.md"
README_TORCH = "torch==2.13.0"  # what the README's commands install
REPORTED = ("torch", "transformers", "accelerate", "av", "safetensors", "tokenizers", "numpy")
TABLE_END = "<!-- tested releases: tools/deps.py adds rows above this line -->"


def declared() -> dict[str, str]:
    """Package name -> its requirement line in pyproject.toml."""
    lines = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    return {re.match(r"[A-Za-z0-9_.-]+", line).group(0).lower(): line for line in lines}


def lowest(package: str) -> str:
    match = re.search(r">=\s*([\w.]+)", declared()[package])
    if not match:
        raise SystemExit(f"{package} has no lower bound in pyproject.toml")
    return match.group(1)


def make_env(pins: list[str], where: Path) -> Path:
    """A fresh venv with the README's install plus `pins`; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
    python = where / "bin" / "python"
    torch = next((p for p in pins if p.startswith("torch==")), README_TORCH)
    others = [p for p in pins if not p.startswith("torch==")]
    subprocess.run([str(python), "-m", "pip", "install", "-q", torch, "-e", f"{ROOT}[dev]", *others], check=True, cwd=ROOT)
    return python


def installed_versions(python: Path) -> dict[str, str]:
    code = (
        "import json, importlib.metadata as m; "
        f"print(json.dumps({{n: m.version(n) for n in {list(REPORTED)!r}}}))"
    )
    return json.loads(subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True).stdout)


def run_suite(python: Path, subset: bool) -> tuple[bool, str]:
    """Run pytest (whole suite, or the lowest_bound subset); returns (passed, summary line)."""
    command = [str(python), "-m", "pytest", "-p", "no:cacheprovider"] + (["-m", "lowest_bound"] if subset else [])
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    sys.stdout.write(proc.stdout[-4000:])
    sys.stderr.write(proc.stderr[-2000:])
    lines = [line.strip("= ") for line in proc.stdout.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    return proc.returncode == 0, (lines[-1] if lines else f"pytest exited {proc.returncode}")


def test(pins: list[str], subset: bool, keep: Path | None = None) -> tuple[bool, str, dict[str, str]]:
    with tempfile.TemporaryDirectory(prefix="crosslmm-deps-") as tmp:
        env = keep or Path(tmp) / "venv"
        python = make_env(pins, env)
        versions = installed_versions(python)
        print("installed:", ", ".join(f"{k} {v}" for k, v in versions.items()), flush=True)
        passed, summary = run_suite(python, subset)
    return passed, summary, versions


def record(versions: dict[str, str], scope: str, summary: str) -> None:
    """Add a row to the tested-releases table of docs/compatibility.md."""
    row = (
        f"| {datetime.date.today()} | {platform.python_version()} | {versions['torch']} | {versions['transformers']} | "
        f"{versions['accelerate']} | {versions['av']} | {scope} | {summary} |"
    )
    text = COMPATIBILITY.read_text()
    if TABLE_END not in text:
        raise SystemExit(f"{COMPATIBILITY} lacks the line {TABLE_END!r}")
    COMPATIBILITY.write_text(text.replace(TABLE_END, f"{row}\n{TABLE_END}"))


def set_upper_bound(package: str, version: str) -> str:
    """Rewrite `package`'s upper bound in pyproject.toml to <=version; returns the old text."""
    old_text = PYPROJECT.read_text()
    line = declared()[package]
    lower = ",".join(part for part in line[len(package):].split(",") if part.strip().startswith(">"))
    new_line = f"{package}{lower},<={version}" if lower else f"{package}<={version}"
    PYPROJECT.write_text(old_text.replace(f'"{line}"', f'"{new_line}"'))
    return old_text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("test", help="run the suite in a fresh venv")
    t.add_argument("pins", nargs="*", help="extra requirements, e.g. transformers==5.20.0")
    t.add_argument("--lowest", action="store_true", help="lowest supported transformers, lowest_bound subset")
    t.add_argument("--record", action="store_true", help="add the result to docs/compatibility.md")
    t.add_argument("--venv", type=Path, help="build the venv here and keep it")
    r = sub.add_parser("raise", help="test a new release and, if the whole suite passes, make it the upper bound")
    r.add_argument("package")
    r.add_argument("version")
    args = parser.parse_args()

    if args.command == "test":
        pins = list(args.pins) + ([f"transformers=={lowest('transformers')}"] if args.lowest else [])
        passed, summary, versions = test(pins, subset=args.lowest, keep=args.venv)
        if args.record:
            record(versions, "lowest_bound subset" if args.lowest else "whole suite", summary)
        print(("PASSED: " if passed else "FAILED: ") + summary)
        return 0 if passed else 1

    package = args.package.lower()
    if package not in declared():
        raise SystemExit(f"{package} is not a dependency in pyproject.toml")
    old_text = set_upper_bound(package, args.version)
    try:
        passed, summary, versions = test([f"{package}=={args.version}"], subset=False)
    except BaseException:
        PYPROJECT.write_text(old_text)
        raise
    if not passed:
        PYPROJECT.write_text(old_text)
        print(f"FAILED on {package} {args.version}: {summary}; pyproject.toml left unchanged")
        return 1
    record(versions, "whole suite", summary)
    print(f"PASSED on {package} {args.version}: {summary}; the bound is now <={args.version} "
          f"(pyproject.toml, docs/compatibility.md); commit both")
    return 0


if __name__ == "__main__":
    sys.exit(main())
