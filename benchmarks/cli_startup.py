"""
How fast the `cavmae` command answers `--help`, `--version` and usage errors: each in a fresh interpreter (as the
console script runs), interleaved round by round with what the console script did before it had its own argument
module (import `cavmae_hf.cli`, which imports the package: torch, Transformers, the registrations).

    python benchmarks/cli_startup.py [--repeats 5]

Runs this checkout's code (its `src` first on the path). Ends with the heaviest imports of `cavmae --help`
(`python -X importtime`), which must not include torch or Transformers.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
COMMANDS = {
    "python -c pass (interpreter start)": ["-c", "pass"],
    "before: import cavmae_hf.cli": ["-c", "import cavmae_hf.cli"],
    "cavmae --help": ["-m", "cavmae_hf_cli", "--help"],
    "cavmae --version": ["-m", "cavmae_hf_cli", "--version"],
    "cavmae classify (usage error)": ["-m", "cavmae_hf_cli", "classify"],
    "cavmae convert --help": ["-m", "cavmae_hf_cli", "convert", "--help"],
}


def environment() -> dict:
    path = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def run_once(arguments, env) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *arguments], env=env, capture_output=True, check=False)
    return time.perf_counter() - start


def heaviest_imports(env, count: int = 5) -> list[tuple[int, str]]:
    """(cumulative microseconds, module) of the `count` slowest top-level imports of `cavmae --help`."""
    completed = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "cavmae_hf_cli", "--help"], env=env, capture_output=True, text=True
    )
    rows = []
    for line in completed.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = (part.strip() for part in line.removeprefix("import time:").split("|"))
        if not name.startswith(" "):  # top level only
            rows.append((int(cumulative), name.strip()))
    return sorted(rows, reverse=True)[:count]


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    env = environment()
    load = " ".join(f"{value:.2f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {load}; {args.repeats} rounds")
    for arguments in COMMANDS.values():  # warm-up: the file system cache
        run_once(arguments, env)
    timings = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):
        for name, arguments in COMMANDS.items():
            timings[name].append(run_once(arguments, env))
    medians = {name: statistics.median(values) for name, values in timings.items()}
    width = max(map(len, COMMANDS))
    print(f"{'command':<{width}}  median s  min s")
    for name, values in timings.items():
        print(f"{name:<{width}}  {medians[name]:8.3f}  {min(values):5.3f}")
    print("heaviest imports of `cavmae --help` (cumulative):")
    for microseconds, module in heaviest_imports(env):
        print(f"  {microseconds / 1000:7.1f} ms  {module}")
    before, after = medians["before: import cavmae_hf.cli"], medians["cavmae --help"]
    slowest = max(medians[name] for name in COMMANDS if name.startswith("cavmae"))
    print(
        f"SUMMARY: cavmae --help {after:.2f} s vs {before:.2f} s before ({before / after:.1f}x faster); "
        f"slowest of --help / --version / usage error / convert --help: {slowest:.2f} s (load {load})"
    )


if __name__ == "__main__":
    main()
