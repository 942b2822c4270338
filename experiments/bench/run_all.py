"""Run every benchmark in ``experiments/bench/`` and collect their reports (what ``make bench`` runs).

    python experiments/bench/run_all.py [--quick] [--only data,align] [--out results] [--timeout S]
        -> results/bench.md, results/bench.json (+ each script's own <name>.json / <name>.md)

Each script runs in its own subprocess (``sys.executable``, from the repository root), one after
another, so one that crashes or times out does not stop the others. ``--quick`` and ``--out`` are
passed only to scripts whose argparse defines them. A script's console output is shown live and
kept in ``<out>/bench_logs/<name>.log``. ``bench.md`` has a status table (script, exit code,
seconds) and then each script's own Markdown report (headings demoted one level);
``bench.json`` holds the same status. Runs with ``--only`` update their scripts' entries and keep
the others from the previous ``bench.json``. Exit status: 0 if every script run now succeeded,
else 1.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# The order they run in: cheap ones first, then those that compare against torch/transformers.
ORDER = ("data", "align", "eval", "cpu_matmul", "cpu_layers", "train_step", "decode")
LOG_TAIL = 30


def discover() -> list[str]:
    """Benchmark scripts: ``ORDER`` first, then any other ``*.py`` here (not this file, not ``_*``)."""
    found = {p.stem for p in HERE.glob("*.py") if p.name != Path(__file__).name and not p.name.startswith("_")}
    return [n for n in ORDER if n in found] + sorted(found - set(ORDER))


def script_flags(name: str) -> set[str]:
    """The options a script's argparse defines (read from its source: nothing is imported)."""
    src = (HERE / f"{name}.py").read_text()
    return set(re.findall(r"add_argument\(\s*['\"](--[\w-]+)['\"]", src))


def command(name: str, quick: bool, out: Path) -> list[str]:
    flags = script_flags(name)
    cmd = [sys.executable, str(HERE / f"{name}.py")]
    if quick and "--quick" in flags:
        cmd.append("--quick")
    if "--out" in flags:
        cmd += ["--out", str(out)]
    return cmd


def _kill(proc: subprocess.Popen) -> None:
    """Ends the script and the workers it started (its own process group)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def run_one(name: str, cmd: list[str], log_file: Path, timeout: float | None) -> dict:
    """Runs one script, echoing and logging its output; returns its status entry."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0, started = time.perf_counter(), time.time()
    status = "ok"
    with log_file.open("w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", bufsize=1, start_new_session=True)

        def pump():
            for line in proc.stdout:
                sys.stdout.write(f"[{name}] {line}")
                sys.stdout.flush()
                log.write(line)
                log.flush()
        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            rc, status = proc.returncode, "timeout"
        except KeyboardInterrupt:
            _kill(proc)
            rc, status = proc.returncode, "interrupted"
        reader.join(timeout=10)
    if status == "ok" and rc != 0:
        status = "failed"
    shown = ["python", os.path.relpath(cmd[1], ROOT)] + cmd[2:]
    return dict(script=f"experiments/bench/{name}.py", command=" ".join(shown), exit_code=rc, status=status,
                seconds=round(time.perf_counter() - t0, 1),
                started=dt.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
                started_unix=started, log=str(log_file))


def outputs(name: str, out: Path, entry: dict) -> dict:
    """Which of ``<name>.md`` / ``<name>.json`` exist and whether this run wrote them."""
    res = {}
    for ext in ("md", "json"):
        p = out / f"{name}.{ext}"
        if p.exists():
            res[ext] = dict(path=p.name, fresh=p.stat().st_mtime >= entry.get("started_unix", 0))
    return res


def demote(md: str) -> str:
    """Every Markdown heading one level down (outside code fences)."""
    lines, fenced = [], False
    for line in md.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        lines.append("#" + line if not fenced and re.match(r"#{1,5} ", line) else line)
    return "\n".join(lines)


def tail(path: str, n: int = LOG_TAIL) -> str:
    p = Path(path)
    return "\n".join(p.read_text(errors="replace").splitlines()[-n:]) if p.exists() else "(no log)"


def write_reports(out: Path, entries: dict[str, dict], order: list[str], quick: bool) -> None:
    names = [n for n in order if n in entries] + sorted(set(entries) - set(order))
    machine = dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                   cpus=os.cpu_count(), python=platform.python_version())
    (out / "bench.json").write_text(json.dumps(dict(
        written=dt.datetime.now().isoformat(timespec="seconds"), quick=quick, machine=machine,
        scripts={n: entries[n] for n in names}), indent=2) + "\n")

    md = ["# Benchmarks (`make bench`)", "",
          f"Written {dt.datetime.now():%Y-%m-%d %H:%M} by `experiments/bench/run_all.py`"
          f"{' --quick' if quick else ''}; machine: {machine['processor']}, {machine['cpus']} CPUs, "
          f"Python {machine['python']}. Wall-clock numbers on a shared machine are noisy.", "",
          "| script | status | exit code | seconds | started | report | log |",
          "|---|---|---:|---:|---|---|---|"]
    for n in names:
        e = entries[n]
        rep = e.get("outputs", {}).get("md")
        link = f"[{rep['path']}]({rep['path']})" + ("" if rep["fresh"] else " (stale)") if rep else "-"
        log = os.path.relpath(e["log"], out) if e.get("log") else "-"
        md.append(f"| `{n}.py` | {e['status']} | {e['exit_code']} | {e['seconds']} | {e['started']} | {link} | "
                  f"[log]({log}) |")
    for n in names:
        e = entries[n]
        md += ["", "---", "", f"## {n}", "", f"`{e['command']}`: {e['status']}, exit code {e['exit_code']}, "
               f"{e['seconds']} s.", ""]
        rep = e.get("outputs", {}).get("md")
        if e["status"] != "ok":
            md += [f"Last {LOG_TAIL} lines of the log:", "", "```", tail(e["log"]), "```", ""]
        if rep:
            if not rep["fresh"]:
                md += [f"*{rep['path']} was not rewritten by this run: it is from an earlier one.*", ""]
            md.append(demote((out / rep["path"]).read_text().strip()))
        else:
            md.append(f"*No {n}.md was written.*")
    (out / "bench.md").write_text("\n".join(md) + "\n")


def main(argv=None) -> int:
    names = discover()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help=f"comma-separated subset of: {','.join(names)}")
    ap.add_argument("--quick", action="store_true", help="pass --quick to the scripts that have it")
    ap.add_argument("--out", default="results", help="results folder, passed to the scripts that take --out "
                                                     "(default: results/, relative to the current directory)")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds per script before it is stopped (default: no limit)")
    ap.add_argument("--list", action="store_true", help="print the scripts and the command each would run, then exit")
    args = ap.parse_args(argv)

    chosen = names
    if args.only:
        chosen = [n.strip().removesuffix(".py") for n in args.only.split(",") if n.strip()]
        unknown = [n for n in chosen if n not in names]
        if unknown:
            ap.error(f"--only: unknown {unknown}; known: {names}")
    out = Path(args.out).resolve()
    if args.list:
        for n in chosen:
            print(f"{n}: {' '.join(command(n, args.quick, out))}")
        return 0
    out.mkdir(parents=True, exist_ok=True)

    entries: dict[str, dict] = {}
    previous = out / "bench.json"
    if previous.exists():
        try:
            entries = {n: e for n, e in json.loads(previous.read_text()).get("scripts", {}).items() if n in names}
        except (json.JSONDecodeError, AttributeError):
            entries = {}
    for n in entries:  # kept from an earlier run: recheck what is on disk now
        entries[n]["outputs"] = outputs(n, out, entries[n])

    ran, interrupted = [], False
    for i, n in enumerate(chosen, 1):
        cmd = command(n, args.quick, out)
        print(f"=== [{i}/{len(chosen)}] {n}: {' '.join(cmd[1:])}", flush=True)
        e = run_one(n, cmd, out / "bench_logs" / f"{n}.log", args.timeout)
        e["outputs"] = outputs(n, out, e)
        entries[n] = e
        ran.append(n)
        print(f"=== {n}: {e['status']} (exit code {e['exit_code']}) in {e['seconds']} s", flush=True)
        write_reports(out, entries, names, args.quick)  # after each script: a crash later loses nothing
        if e["status"] == "interrupted":
            interrupted = True
            break

    write_reports(out, entries, names, args.quick)
    print("\n| script | status | exit code | seconds |\n|---|---|---:|---:|")
    for n in ran:
        print(f"| {n} | {entries[n]['status']} | {entries[n]['exit_code']} | {entries[n]['seconds']} |")
    print(f"wrote {out / 'bench.md'} and {out / 'bench.json'}")
    if interrupted:
        return 130
    return 0 if all(entries[n]["status"] == "ok" for n in ran) else 1


if __name__ == "__main__":
    raise SystemExit(main())
