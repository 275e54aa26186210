"""Random kill -9 of the stack's roles for a while; a table of what survived and what it cost.

The stack of the fault suite (``tests/faults/killstack.py``: 2 shard servers with data
dirs, 2 trainers, the joiner, the publisher and a subscriber as ``pipeline``
processes, on a private embedded broker and redis-server) runs under a steady feed of
impressions and clicks. Every few seconds a random role is killed with SIGKILL and
restarted (as a supervisor would) after a random pause; the next fault waits until
serving moved on (a version covering events produced after the restart). At the end
the feed stops, everything drains and stops cleanly, and the run is counted exactly:
samples lost (must be 0), duplicates against their bound (one uncommitted window per
trainer kill), versions applied and rejected, recovery time per role.

    python benchmarks/chaos.py                  # 5 minutes
    python benchmarks/chaos.py --duration 60 --seed 3

Exit status 1 when a sample was lost, duplicates passed their bound, the group kept
lag, or a subscriber applied a version out of order.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.faults.killstack

from _common import print_table, private_stack

from pipeline.topics import apply_topics, load_topic_specs
from tests.faults.killstack import ROLES, KillStack
from tests.procgroups import ProcessGroups


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of faults")
    parser.add_argument("--rate", type=float, default=120.0, help="impressions per second")
    parser.add_argument("--gap", type=float, default=3.0, help="most seconds between faults")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the logs' directory")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with private_stack("chaos-", keep=args.keep) as (stack, work), ProcessGroups() as procs:
        prefix = f"chaos{args.seed}."
        specs = load_topic_specs()
        apply_topics({"bootstrap.servers": stack.bootstrap}, specs, prefix=prefix)
        topics = {s.name: s.physical_name(prefix) for s in specs}
        run = KillStack(procs, work, stack.bootstrap, topics, prefix, "chaos", rate=args.rate)
        print(f"starting the stack in {work} ...", flush=True)
        run.up()
        recovery: dict[str, list[float]] = {role: [] for role in ROLES}
        began = time.monotonic()
        while time.monotonic() - began < args.duration:
            role = rng.choice(ROLES)
            seconds = run.fault(role, pause_s=rng.uniform(0.0, 2.0))
            recovery[role].append(seconds)
            print(
                f"{time.monotonic() - began:6.0f}s  kill -9 {role:<9}  serving again after "
                f"{seconds:.1f} s",
                flush=True,
            )
            time.sleep(rng.uniform(0.0, args.gap))
        result = run.account()
    faults = sum(len(v) for v in recovery.values())
    print_table(
        f"Faults survived: {faults} kill -9 in {args.duration:.0f} s (seed {args.seed})",
        ["role", "kills", "recovery mean s", "recovery max s"],
        [
            [role, len(v), statistics.fmean(v) if v else "-", max(v) if v else "-"]
            for role, v in recovery.items()
        ],
    )
    lost = result.missing_samples + result.never_trained
    print_table(
        "Accounting",
        ["what", "count"],
        [
            ["impressions produced", result.impressions],
            ["samples (one per impression)", result.samples],
            ["samples lost (never trained or never joined)", lost],
            ["samples joined twice", result.duplicate_samples],
            ["rows trained (PS show counts)", result.trained],
            ["duplicates (trained more than once)", result.duplicates],
            ["duplicate bound (uncommitted at trainer kills)", result.duplicate_bound],
            ["rows in the job's metrics", result.metrics_rows],
            ["lag at the end (messages)", result.lag],
            ["versions applied by subscribers", len(result.versions)],
            ["versions rejected or out of order", len(result.rejected)],
        ],
    )
    ok = (
        lost == 0
        and result.duplicate_samples == 0
        and 0 <= result.duplicates <= result.duplicate_bound
        and result.lag == 0
        and not result.rejected
    )
    for line in result.rejected:
        print(f"  {line}")
    print("\nPASS" if ok else "\nFAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
