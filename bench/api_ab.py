"""GET throughput of two API builds, alternately, against one seeded PostgreSQL database.

Each side is a source tree, optionally with settings: ``TREE`` or ``TREE:VAR=VALUE,...``.
The same database (N jobs, RUNNING of them running) serves every round; each round starts
gunicorn as `mnistq api` runs it, from each side's tree in turn, fills its finished-job
answers, then runs wrk on finished and on running jobs at each --connections. No worker
runs: only the API, PostgreSQL and wrk share the machine.

    git worktree add /tmp/base HEAD~1
    python bench/api_ab.py /tmp/base . [--rounds 2] [--jobs 100000] [--connections 4,16]
    python bench/api_ab.py .:MNISTQ_DB_POOL_SIZE=5 .:MNISTQ_DB_POOL_SIZE=10
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from service_overhead import (
    BIN,
    HTTP,
    admin_token,
    bench_env,
    fill_answers,
    free_port,
    fresh_database,
    measure_throughput,
    rate,
    seed_jobs,
    start,
    stop,
    wait_healthy,
)


def parse_side(text: str) -> tuple[Path, dict[str, str]]:
    """``TREE[:VAR=VALUE,...]`` → (the tree, its extra environment)."""
    tree, _, settings = text.partition(":")
    extra = dict(pair.split("=", 1) for pair in settings.split(",") if pair)
    return Path(tree).resolve(), extra


def serve(tree: Path, env: dict[str, str], log: Path) -> tuple[str, subprocess.Popen[bytes]]:
    """gunicorn with `mnistq api`'s config and 2 workers, importing the app from ``tree``."""
    port = free_port()
    proc = start([str(BIN / "python"), "-m", "gunicorn", "--config", "python:api.serving",
                  "--bind", f"127.0.0.1:{port}", "--workers", "2", "--access-logfile", "-",
                  "api:create_app()"], {**env, "PYTHONPATH": str(tree)}, log, cwd=tree)  # fmt: skip
    return f"http://127.0.0.1:{port}", proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sides", nargs=2, help="TREE or TREE:VAR=VALUE,...")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", default="4,16")
    args = parser.parse_args()
    sides = [parse_side(side) for side in args.sides]
    work = Path(tempfile.mkdtemp(prefix="mnistq-ab-"))
    with fresh_database() as database_url:
        env = bench_env(database_url, work)
        HTTP.headers["Authorization"] = f"Bearer {admin_token(env)}"
        ids, running = seed_jobs(database_url, args.jobs)
        for round_ in range(1, args.rounds + 1):
            for (tree, extra), label in zip(sides, args.sides, strict=True):
                base, api = serve(tree, {**env, **extra}, work / "api.log")
                try:
                    wait_healthy(base)
                    fill_answers(base, ids)
                    for connections in (int(c) for c in args.connections.split(",")):
                        for name, chosen in (("finished", ids), ("running", running)):
                            tput = measure_throughput(base, chosen, args.seconds, connections)
                            print(f"round {round_} {label}: {name} jobs, wrk -c{connections}: "
                                  f"{rate(tput)}", flush=True)  # fmt: skip
                finally:
                    stop(api)


if __name__ == "__main__":
    main()
