"""``gsv3d sweep SWEEP.yaml [--dry-run | --submit | --local] [--out runs/NAME] [--no-validate]``.

Checks the sweep file (schema, config files, every run's composed config of every stage against the CLI parser),
writes ``<out>/sweep.sbatch`` (a chained sweep: ``<out>/<stage>.sbatch`` per stage and ``<out>/submit.sh``),
``<out>/tasks.txt`` and ``<out>/sweep.json``, then:

- ``--dry-run`` (the default) prints the script(s); for a chained sweep first the stages and their dependencies;
- ``--submit`` runs ``sbatch`` (a chained sweep: one array job per stage, each later one with
  ``--dependency=aftercorr:<previous job id>``) and prints the job id(s);
- ``--local`` runs the tasks one after another on this machine, without SLURM (each task's stages in order).

Tasks of a stage whose resolved configs are identical (e.g. the decoders of the rows that change only the distill
stage) train once; the plan names them (``no_rgb/decoder = full/decoder (identical resolved config; ...)``) and
their later stages read the shared folder (:mod:`gsv3d_pl.sweep.dedupe`; ``dedupe: false`` in the sweep file turns
it off). That needs the composed configs: with ``--no-validate`` every task trains.

Nothing is written or submitted when a check fails; the message names the sweep file's line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gsv3d_pl.sweep import (
    SweepError,
    config_identity,
    describe_chain,
    describe_plan,
    load_sweep,
    run_local,
    run_local_stages,
    submit,
    submit_chain,
    validate_configs,
    write_sweep_files,
)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gsv3d sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_file", help="sweep YAML, e.g. configs/sweeps/ablations.yaml")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="write the files and print the sbatch script(s) (default)")
    mode.add_argument("--submit", action="store_true", help="submit the array job(s) with sbatch; prints the id(s)")
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
    for key, fixes in (rerooted or {}).items():
        if fixes:
            print(f"gsv3d sweep: run {key}: {', '.join(fixes)} had paths under the config's own default_root_dir; "
                  "moved under each task's folder", file=sys.stderr)
    if sweep.result_stage is None:
        print("gsv3d sweep: note: no stage has `test: true`: the tasks only train and `gsv3d report` will have no "
              "numbers", file=sys.stderr)
    if sweep.dedupe and rerooted is None:
        print("gsv3d sweep: note: --no-validate: identical stages are not detected (that needs the composed "
              "configs); every task trains", file=sys.stderr)
    try:
        files = write_sweep_files(sweep, out, rerooted=rerooted,
                                  identify=config_identity if rerooted is not None else None)
    except SweepError as e:
        print(f"gsv3d sweep: error: {e}", file=sys.stderr)
        return 2
    n = sweep.num_tasks
    stages = f" x {len(sweep.stages)} stages" if files.chained else ""
    print(f"gsv3d sweep: {len(sweep.runs)} runs x {len(sweep.seeds)} seeds = {n} tasks{stages} -> "
          f"{', '.join(str(f.script) for f in files.stages)}, {files.tasks_file}", file=sys.stderr)
    plan = describe_plan(files)
    if plan and (args.submit or args.local):  # the dry run prints it on stdout with the scripts
        print("\n".join(f"gsv3d sweep: {line.lstrip('# ')}" for line in plan), file=sys.stderr)

    if args.submit:
        try:
            jobs = submit_chain(files) if files.chained else [("", submit(files.stages[0].script))]
        except RuntimeError as e:
            print(f"gsv3d sweep: error: {e}", file=sys.stderr)
            return 1
        for _, job_id in jobs:
            print(job_id)
        if files.chained:
            ids = dict(jobs)
            chain = "; ".join(
                (f"stage {f.name}" if sub.name == f.name else f"stage {f.name} tasks {sub.array}")
                + f": {ids[sub.name]}" + (f" ({sub.dependency(ids[sub.after])})" if sub.after else "")
                for f in files.stages for sub in f.submissions)
        else:
            chain = f"array job {jobs[0][1]}"
        print(f"gsv3d sweep: submitted {chain}. Follow with `squeue -j {','.join(j for _, j in jobs)}`, logs in "
              f"{out}/slurm/; table: gsv3d report {out}", file=sys.stderr)
        return 0
    if args.local:
        if files.chained:
            failed = run_local_stages([(f.name, f.script, f.tasks) for f in files.stages])
        else:
            failed = run_local(files.stages[0].script, files.stages[0].tasks)
        print(f"gsv3d sweep: {n - failed}/{n} tasks finished; table: gsv3d report {out}", file=sys.stderr)
        return 1 if failed else 0
    if files.chained:
        print(describe_chain(files), end="")
        for f in files.stages:
            print(f"\n# ==> {f.script} <==")
            print(f.script.read_text(), end="")
        return 0
    if plan:
        print("\n".join(plan) + "\n")
    print(files.stages[0].script.read_text(), end="")
    return 0
