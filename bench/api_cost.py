"""Instructions one GET of a job or of a job list page costs the API process, per source
tree: a figure that the machine's load does not move.

Throughput on a shared 2-core machine swings by a third from one minute to the next (wrk,
PostgreSQL and the API share the cores), which hides a change of a tenth. Here each tree
serves GET /api/v1/jobs/<id> and GET /api/v1/jobs in-process (Flask's test client, the app
as `mnistq api` builds it, a real PostgreSQL) under valgrind's callgrind, which counts the
instructions the process executes. Each tree runs twice, with a short and a long series of
requests after the same warm-up, and the difference divided by the extra requests is the
cost of one request, start-up and warm-up cancelled out. PostgreSQL's own work and the
kernel's are not counted: the figure is the API process's share, the part a change to the
code moves.

Needs valgrind, and PostgreSQL on 127.0.0.1:5432 (scripts/services).

    git worktree add /tmp/base HEAD~1
    python bench/api_cost.py /tmp/base . [--kinds finished,running,list] [--requests 100,400]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from service_overhead import admin_token, bench_env, fresh_database, seed_jobs

HERE = Path(__file__).resolve()
SEEDED = 1000  # jobs in the table: a tenth of them running
ASKED = 100  # distinct jobs the requests cycle through
WARM_PASSES = 3  # GETs of each of them before the counted series: caches filled


def child(tree: Path, kind: str, requests: int) -> None:
    """Serve ``requests`` GETs of ``kind`` jobs after a fixed warm-up (run under callgrind)."""
    sys.path.insert(0, str(tree))
    with fresh_database() as url, tempfile.TemporaryDirectory() as tmp:
        # The token is trusted for the whole run: under callgrind a second is a few requests,
        # and the look-ups a shorter cache time adds would depend on the machine's speed.
        env = {**bench_env(url, Path(tmp)), "MNISTQ_TOKEN_CACHE_SECONDS": "60"}
        headers = {"Authorization": f"Bearer {admin_token(env)}"}
        finished, running = seed_jobs(url, SEEDED)
        os.environ.update(env)
        from api import create_app

        client = create_app().test_client()
        if kind == "list":
            paths = ["/api/v1/jobs"]  # the newest page, as many jobs as the page size
        else:
            ids = finished if kind == "finished" else running
            paths = [f"/api/v1/jobs/{i}" for i in ids[:ASKED]]
        for _ in range(WARM_PASSES):
            for path in paths:
                assert client.get(path, headers=headers).status_code == 200, path
        for n in range(requests):
            client.get(paths[n % len(paths)], headers=headers)


def instructions(tree: Path, kind: str, requests: int) -> int:
    """What the process executed, start-up and warm-up included."""
    command = [
        "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
        sys.executable, str(HERE), "--child", str(tree), "--kind", kind,
        "--requests", str(requests),
    ]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=True,
                         cwd=HERE.parent).stderr  # fmt: skip
    found = re.search(r"Collected : (\d+)", out)
    if found is None:
        raise SystemExit(f"callgrind printed no count:\n{out[-2000:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("trees", nargs="*", type=Path, help="source trees to compare")
    parser.add_argument(
        "--kinds",
        default="finished,running,list",
        help="what is asked for: a finished job (its answer kept), a running job (read "
        "afresh) or the newest page of the job list",
    )
    parser.add_argument("--requests", default="100,400", help="the short and the long series")
    parser.add_argument("--parallel", type=int, default=2, help="callgrind runs at once")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child.resolve(), args.kind, int(args.requests))
    if not args.trees:
        parser.error("name at least one source tree")
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed: apt-get install valgrind")
    short, long = (int(n) for n in args.requests.split(","))
    kinds = args.kinds.split(",")
    trees = [tree.resolve() for tree in args.trees]
    runs = [(tree, kind, n) for kind in kinds for tree in trees for n in (short, long)]
    with ThreadPoolExecutor(args.parallel) as pool:
        counts = dict(zip(runs, pool.map(lambda run: instructions(*run), runs), strict=True))
    print(f"instructions per GET of a job or a list page, in-process, PostgreSQL, "
          f"({long} - {short} requests) after the same warm-up")  # fmt: skip
    for kind in kinds:
        first = None
        for tree in trees:
            per = (counts[(tree, kind, long)] - counts[(tree, kind, short)]) / (long - short)
            first = first or per
            print(f"  {kind:8} {tree!s:40} {per / 1e6:7.3f} M   ratio {per / first:.3f}")


if __name__ == "__main__":
    main()
