"""The GPU suite's bookkeeping: stamp the tables a run wrote with the commit, and show them.

    python -m benchmarks.suite_report stamp RESULTS_DIR --since EPOCH --commit SHA
    python -m benchmarks.suite_report show RESULTS_DIR --since EPOCH [--max-lines N]

Every results table (``<name>_<device-kind>.md`` beside its ``.json``) records the device, torch
version and command line (``experiments.harness.md_header``). ``stamp`` adds the commit of the
checkout the suite ran: a ``- commit:`` line after the command line of each Markdown table, and
``provenance.commit`` (or a top-level ``commit``) in each JSON file, written since EPOCH (seconds
since the epoch, the suite's start). ``show`` prints those tables without their long sections (a
profile, per-epoch lists), for the end of the suite's log. Standard library and
``functional_seg.core.files`` only: it runs in a fraction of a second, without torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from functional_seg.core.files import write_atomic, write_json

COMMIT_PREFIX = "- commit: "


def written_since(results: Path, since: float, suffix: str) -> list[Path]:
    """The files ``*suffix`` directly under ``results`` modified at or after ``since``, by name."""
    return sorted(p for p in results.glob(f"*{suffix}") if p.is_file() and p.stat().st_mtime >= since)


def stamp_markdown(text: str, commit: str) -> str:
    """``text`` with one ``- commit: `SHA``` line: after ``- command:``, else after the title line;
    an existing commit line is replaced."""
    lines = [line for line in text.splitlines() if not line.startswith(COMMIT_PREFIX)]
    at = next((i + 1 for i, line in enumerate(lines) if line.startswith("- command:")), min(1, len(lines)))
    lines.insert(at, f"{COMMIT_PREFIX}`{commit}`")
    return "\n".join(lines) + "\n"


def stamp_json(payload, commit: str):
    """``payload`` with the commit in its provenance (a top-level key when it has none)."""
    if isinstance(payload, dict):
        if isinstance(payload.get("provenance"), dict):
            payload["provenance"]["commit"] = commit
        else:
            payload["commit"] = commit
    return payload


def stamp(results: Path, since: float, commit: str) -> list[Path]:
    """Stamp every table and JSON written since ``since``; returns the files stamped."""
    done = []
    for path in written_since(results, since, ".md"):
        write_atomic(path, stamp_markdown(path.read_text(), commit))
        done.append(path)
    for path in written_since(results, since, ".json"):
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # not ours to judge: a partial or foreign file stays as it is
        write_json(path, stamp_json(payload, commit))
        done.append(path)
    return done


def brief(text: str, max_lines: int) -> str:
    """A table's header and tables, without sections that start with ``# Profile`` or ``per-epoch``."""
    kept = []
    for line in text.splitlines():
        if line.startswith("# Profile") or line.startswith("```"):
            break
        if not line.startswith("per-epoch"):
            kept.append(line)
    if len(kept) > max_lines:
        kept = kept[:max_lines] + [f"... ({len(kept) - max_lines} more lines in the file)"]
    return "\n".join(kept).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("stamp", "show"))
    p.add_argument("results", type=Path, help="the results folder (experiments/results)")
    p.add_argument("--since", type=float, required=True, help="seconds since the epoch: the suite's start")
    p.add_argument("--commit", default=None, help="stamp: the commit to record")
    p.add_argument("--max-lines", type=int, default=40, help="show: lines per table at most")
    args = p.parse_args(argv)
    if not args.results.is_dir():
        raise SystemExit(f"suite_report: error: {args.results} is not a folder")
    if args.action == "stamp":
        if not args.commit:
            raise SystemExit("suite_report: error: stamp needs --commit SHA")
        done = stamp(args.results, args.since, args.commit)
        print(f"stamped {len(done)} files with commit {args.commit}")
        return 0
    for path in written_since(args.results, args.since, ".md"):
        print(f"\n----- {path.name}\n{brief(path.read_text(), args.max_lines)}", end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
