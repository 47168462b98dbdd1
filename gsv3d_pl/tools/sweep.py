"""``gsv3d sweep SWEEP.yaml [--dry-run | --submit | --local] [--out runs/NAME] [--no-validate]``.

Checks the sweep file (schema, config files, every run's composed config against the CLI parser), writes
``<out>/sweep.sbatch``, ``<out>/tasks.txt`` and ``<out>/sweep.json``, then:

- ``--dry-run`` (the default) prints the script;
- ``--submit`` runs ``sbatch`` and prints the array job id;
- ``--local`` runs the tasks one after another on this machine, without SLURM.

Nothing is written or submitted when a check fails; the message names the sweep file's line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gsv3d_pl.sweep import SweepError, load_sweep, run_local, submit, validate_configs, write_sweep


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gsv3d sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_file", help="sweep YAML, e.g. configs/sweeps/ablations.yaml")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="write the files and print the sbatch script (default)")
    mode.add_argument("--submit", action="store_true", help="submit the array job with sbatch; prints its id")
    mode.add_argument("--local", action="store_true", help="run every task here, one after another, no SLURM")
    parser.add_argument("--out", default=None, help="sweep folder (default: runs/<name from the sweep file>)")
    parser.add_argument("--no-validate", action="store_true",
                        help="skip composing each run's config with the CLI parser (e.g. on a login node "
                             "without the training environment)")
    args = parser.parse_args(argv)

    rerooted = None
    try:
        sweep = load_sweep(args.sweep_file)
        if not args.no_validate:
            rerooted = validate_configs(sweep)
    except SweepError as e:
        print(f"gsv3d sweep: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or Path("runs") / sweep.name)
    for run, fixes in (rerooted or {}).items():
        if fixes:
            print(f"gsv3d sweep: run {run}: {', '.join(fixes)} had paths under the config's own default_root_dir; "
                  "moved under each task's run folder", file=sys.stderr)
    script, tasks_file, tasks = write_sweep(sweep, out, rerooted=rerooted)
    print(f"gsv3d sweep: {len(sweep.runs)} runs x {len(sweep.seeds)} seeds = {len(tasks)} tasks -> {script}, "
          f"{tasks_file}", file=sys.stderr)

    if args.submit:
        try:
            job_id = submit(script)
        except RuntimeError as e:
            print(f"gsv3d sweep: error: {e}", file=sys.stderr)
            return 1
        print(job_id)
        print(f"gsv3d sweep: submitted array job {job_id}. Follow it with `squeue -j {job_id}`, logs in "
              f"{out}/slurm/; table: gsv3d report {out}", file=sys.stderr)
        return 0
    if args.local:
        failed = run_local(script, tasks)
        print(f"gsv3d sweep: {len(tasks) - failed}/{len(tasks)} tasks finished; table: gsv3d report {out}",
              file=sys.stderr)
        return 1 if failed else 0
    print(script.read_text(), end="")
    return 0
