"""Identical stages run once (gsv3d_pl/sweep/dedupe.py): tasks of a stage with equal resolved configs train once,
the others' later stages read the shared folder, on SLURM (--array without them, afterok on the one task that
trains it) and with --local; the plan, the manifest and the report say so. The real-SLURM check is in
tests/test_slurm.py (test_chain_shared_decoder_on_slurm)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from test_sweep import fake_executable, standin, write_sweep_file  # noqa: F401  (standin: a fixture)
from test_sweep_chain import ABL, bases, chain_file  # noqa: F401  (bases: the stand-in stages' fixture)

from gsv3d_pl.config import parse_config
from gsv3d_pl.sweep import (
    SweepError,
    collect_results,
    config_identity,
    expand_tasks,
    format_table,
    load_sweep,
    render_sbatch,
    run_local,
    validate_configs,
    write_sweep_files,
)
from gsv3d_pl.sweep.dedupe import canonical_config
from gsv3d_pl.tools import sweep as sweep_tool

# w/o RGB changes only stage 2; N = 4 both; Full composes the (empty) full.yaml into both, as ablations.yaml does
RUNS = f"""
  - name: no_rgb
    overlays: {{distill: [{ABL}/distill_no_rgb.yaml]}}
  - name: n4
    overlays: {{decoder: [{ABL}/n4.yaml], distill: [{ABL}/n4.yaml]}}
  - name: full
    overlays: {{decoder: [{ABL}/full.yaml], distill: [{ABL}/full.yaml]}}
"""  # task indices (seeds 0, 1): no_rgb 0-1, n4 2-3, full 4-5


def _tasks(sweep, out):
    return {(t.stage, t.run, t.seed): t for t in expand_tasks(sweep, out, validate_configs(sweep),
                                                              identify=config_identity)}


def test_identity_is_the_resolved_config_without_output_folders(bases, tmp_path):  # noqa: F811
    """no_rgb's decoder = full's: other --config lists and other folders, the same resolved config; other seeds and
    other overlays differ. The shared task does not train and no_rgb's distill reads full's decoder."""
    sweep = load_sweep(chain_file(tmp_path, *bases, runs=RUNS))
    out = (tmp_path / "o").resolve()
    by = _tasks(sweep, out)
    dec_rgb, dec_full = by["decoder", "no_rgb", 0], by["decoder", "full", 0]
    assert dec_rgb.args != dec_full.args  # full.yaml in the list, and each its own default_root_dir
    assert dec_rgb.identity == dec_full.identity
    assert dec_full.identity != by["decoder", "full", 1].identity  # the seed is part of the config
    assert dec_full.identity != by["decoder", "n4", 0].identity
    canon = canonical_config(parse_config(dec_full.args), dec_full.stage_dir)
    assert "config" not in canon and "default_root_dir" not in canon["trainer"]
    assert canon["trainer"]["callbacks"][0]["init_args"]["dirpath"] == "{stage_dir}/checkpoints"

    # the owner is full (the report's reference row); no_rgb's decoder is its, per seed
    for seed in (0, 1):
        t, owner = by["decoder", "no_rgb", seed], by["decoder", "full", seed]
        assert t.shared and (t.same_as, t.same_as_run) == (owner.index, "full") and not owner.shared
        assert t.stage_dir == owner.stage_dir == out / "full" / f"seed{seed}" / "decoder"
    assert not any(by["decoder", "n4", s].shared for s in (0, 1))
    # downstream: no_rgb's distill trains (it differs from full's) and reads the shared decoder
    dist = by["distill", "no_rgb", 1]
    assert not dist.shared and dist.stage_dir == out / "no_rgb" / "seed1" / "distill"
    assert dist.prev_dir == out / "full" / "seed1" / "decoder"
    ckpt = str(out / "full" / "seed1" / "decoder" / "checkpoints" / "last.ckpt")
    assert parse_config(dist.args).model.init_args.decoder_ckpt == ckpt
    assert parse_config(by["distill", "n4", 1].args).model.init_args.decoder_ckpt == \
        str(out / "n4" / "seed1" / "decoder" / "checkpoints" / "last.ckpt")
    assert not any(t.shared for k, t in by.items() if k[0] == "distill")

    # dedupe: false -> every task trains in its own folders
    off = load_sweep(chain_file(tmp_path, *bases, runs=RUNS, extra="dedupe: false\n"))
    assert not any(t.shared for t in expand_tasks(off, out, identify=config_identity))


def test_fully_identical_rows_share_every_stage(bases, tmp_path):  # noqa: F811
    """A row identical to Full in both stages: its distill is identical too once it reads Full's decoder, so the
    whole chain is Full's and the manifest points its result at Full's distill folder."""
    runs = f"\n  - name: copy\n  - name: full\n    overlays: {{decoder: [{ABL}/full.yaml]}}\n"
    sweep = load_sweep(chain_file(tmp_path, *bases, runs=runs))
    out = (tmp_path / "o").resolve()
    by = _tasks(sweep, out)
    for stage in ("decoder", "distill"):
        assert by[stage, "copy", 0].same_as_run == "full" and by[stage, "copy", 0].same_as == 2
    files = write_sweep_files(sweep, out, rerooted=validate_configs(sweep), identify=config_identity)
    manifest = json.loads(files.manifest.read_text())
    assert manifest["tasks"][0]["shared"] == {"decoder": "full", "distill": "full"}
    assert manifest["tasks"][0]["result_dir"] == str(out / "full" / "seed0" / "distill")
    assert all(sub.indices == (2, 3) for f in files.stages for sub in f.submissions)
    assert len(files.stages[1].submissions) == 1  # nothing reads a shared stage: plain aftercorr
    assert "afterok:${JOB_" not in files.submit_script.read_text()


def test_dry_run_plan_scripts_and_manifest(bases, tmp_path, capsys):  # noqa: F811
    f = chain_file(tmp_path, *bases, runs=RUNS)
    out = (tmp_path / "o").resolve()
    assert sweep_tool.main([str(f), "--dry-run", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "#   no_rgb/decoder = full/decoder (identical resolved config; seeds 0, 1)" in printed
    assert "#   stage 1 decoder (4 train, 2 shared)" in printed
    assert "distill__2: tasks 0  --dependency=afterok:<job id of decoder>_4" in printed
    dec, dis = (out / "decoder.sbatch").read_text(), (out / "distill.sbatch").read_text()
    assert "#SBATCH --array=2-5%3" in dec  # no_rgb's decoders are not in the array
    assert "0) echo '[gsv3d sweep] task 0: no_rgb seed 0 decoder = task 4 (full)" in dec and "exit 0 ;;" in dec
    assert f"PREV_DIR={out / 'full' / 'seed0' / 'decoder'}" in dis
    assert f"--model.init_args.decoder_ckpt={out / 'full' / 'seed0' / 'decoder'}/checkpoints/last.ckpt" in dis
    submit_sh = (out / "submit.sh").read_text()
    assert (f"JOB_distill=$(sbatch --parsable --array=2-5%3 --dependency=aftercorr:${{JOB_decoder}} "
            f"{out / 'distill.sbatch'}") in submit_sh
    assert f"--array=0%1 --dependency=afterok:${{JOB_decoder}}_4 {out / 'distill.sbatch'}" in submit_sh
    assert f"--array=1%1 --dependency=afterok:${{JOB_decoder}}_5 {out / 'distill.sbatch'}" in submit_sh
    for script in (out / "submit.sh", out / "decoder.sbatch", out / "distill.sbatch"):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    # a shared task's case entry does nothing, also when run by hand
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "1", "GSV3D_SWEEP_LOCAL": "1"}
    proc = subprocess.run(["bash", str(out / "decoder.sbatch")], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and "identical resolved config" in proc.stdout
    assert not (out / "no_rgb").exists()
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["dedupe"] is True
    assert manifest["shared_stages"] == [{"stage": "decoder", "run": "no_rgb", "same_as": "full", "seeds": [0, 1]}]
    assert [s["dependency"] for s in manifest["stages"][1]["submissions"]] == [
        "aftercorr:<decoder>", "afterok:<decoder>_4", "afterok:<decoder>_5"]
    rows = [ln.split("\t") for ln in (out / "tasks.txt").read_text().splitlines() if ln.startswith("decoder\t0")]
    assert rows[0][4] == str(out / "full" / "seed0" / "decoder") and rows[0][5].startswith("(not run")

    # --no-validate: the configs are not composed, nothing can be compared: every task trains
    assert sweep_tool.main([str(f), "--dry-run", "--no-validate", "--out", str(tmp_path / "nv")]) == 0
    captured = capsys.readouterr()
    assert "identical stages are not detected" in captured.err and "identical resolved config" not in captured.out
    assert "#SBATCH --array=0-5%3" in (tmp_path / "nv" / "decoder.sbatch").read_text()


# The stage runner of tests/test_sweep_chain.py, also logging the stage-1 checkpoint a stage-2 fit reads.
FAKE_GSV3D = """#!/usr/bin/env python3
import json, os, sys
args = sys.argv[1:]
root = [a.split("=", 1)[1] for a in args if a.startswith("--trainer.default_root_dir=")][0]
ckpt = [a.split("=", 1)[1] for a in args if a.startswith("--model.init_args.decoder_ckpt=")]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps([args[0], root] + ckpt[:1]) + "\\n")
if ckpt and not os.path.isfile(ckpt[0]):
    sys.exit(5)  # as DistillStage does: the stage-1 checkpoint must exist when stage 2 starts
if os.environ.get("FAKE_FAIL", "@@") in root and args[0] == "fit":
    sys.exit(3)
if args[0] == "fit":
    os.makedirs(os.path.join(root, "checkpoints"), exist_ok=True)
    open(os.path.join(root, "checkpoints", "last.ckpt"), "w").close()
else:
    metrics = {"psnr": {"value": 20.0, "num_objects": 1, "num_views": 1}, "meta": {"ckpt_path": args[-1]}}
    with open(os.path.join(root, "metrics.json"), "w") as f:
        json.dump(metrics, f)
"""


def test_local_runs_a_shared_stage_once_and_downstream_reads_it(bases, tmp_path, monkeypatch):  # noqa: F811
    fake = fake_executable(tmp_path / "bin" / "gsv3d", FAKE_GSV3D)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_LOG", str(log))
    f = chain_file(tmp_path, *bases, runs=RUNS, slurm=f"slurm: {{command: {fake}}}\n")
    out = (tmp_path / "o").resolve()
    assert sweep_tool.main([str(f), "--local", "--out", str(out)]) == 0
    calls = [tuple(json.loads(ln)) for ln in log.read_text().splitlines()]
    d = {(r, s): out / r / f"seed{s}" for r in ("no_rgb", "n4", "full") for s in (0, 1)}

    def ck(run, seed):
        return str(d[run, seed] / "decoder" / "checkpoints" / "last.ckpt")

    assert calls == [
        # task 0 (no_rgb, seed 0): its decoder is full's, trained first, once; its distill reads it
        ("fit", str(d["full", 0] / "decoder")),
        ("fit", str(d["no_rgb", 0] / "distill"), ck("full", 0)), ("test", str(d["no_rgb", 0] / "distill"), ck("full", 0)),
        ("fit", str(d["full", 1] / "decoder")),
        ("fit", str(d["no_rgb", 1] / "distill"), ck("full", 1)), ("test", str(d["no_rgb", 1] / "distill"), ck("full", 1)),
        # n4: its own decoder
        ("fit", str(d["n4", 0] / "decoder")),
        ("fit", str(d["n4", 0] / "distill"), ck("n4", 0)), ("test", str(d["n4", 0] / "distill"), ck("n4", 0)),
        ("fit", str(d["n4", 1] / "decoder")),
        ("fit", str(d["n4", 1] / "distill"), ck("n4", 1)), ("test", str(d["n4", 1] / "distill"), ck("n4", 1)),
        # full: decoder already trained
        ("fit", str(d["full", 0] / "distill"), ck("full", 0)), ("test", str(d["full", 0] / "distill"), ck("full", 0)),
        ("fit", str(d["full", 1] / "distill"), ck("full", 1)), ("test", str(d["full", 1] / "distill"), ck("full", 1)),
    ]
    assert not (d["no_rgb", 0] / "decoder").exists()
    results = {r.name: r for r in collect_results(out)}
    assert all(r.seeds == {0: "ok", 1: "ok"} for r in results.values())
    assert results["no_rgb"].result_dirs[0] == d["no_rgb", 0] / "distill"
    md = format_table(list(results.values()), paired=False)
    assert ("Trained once, shared with another row (read from that row's folder): w/o RGB loss/decoder = "
            "Full Model/decoder (identical resolved config; seeds 0, 1).") in md

    # The shared decoder fails: both rows that read it fail (and the report says so), n4 is untouched.
    shutil.rmtree(out)
    log.unlink()
    monkeypatch.setenv("FAKE_FAIL", f"{os.sep}full{os.sep}seed0{os.sep}decoder")
    assert sweep_tool.main([str(f), "--local", "--out", str(out)]) == 1
    calls = [tuple(json.loads(ln)) for ln in log.read_text().splitlines()]
    assert calls.count(("fit", str(d["full", 0] / "decoder"))) == 1  # tried once, for both rows
    assert not any(c[1] in (str(d["no_rgb", 0] / "distill"), str(d["full", 0] / "distill")) for c in calls)
    results = {r.name: r for r in collect_results(out)}
    assert results["no_rgb"].seeds == {0: "failed", 1: "ok"} and results["full"].seeds == {0: "failed", 1: "ok"}
    assert any("decoder fit: exit 3" in n for n in results["no_rgb"].notes)
    assert results["n4"].seeds == {0: "ok", 1: "ok"}


def test_three_stages_dependencies_follow_the_shared_tasks(bases, tmp_path):  # noqa: F811
    """With a stand-in identity: stage a of r2 is r1's. Stage b of r2 waits for task 0 of a (afterok) and is
    submitted apart; stage c of r2 then waits for that submission of b task by task (aftercorr)."""
    dec, dis = bases
    f = write_sweep_file(tmp_path / "three.yaml", f"""
        name: three
        stages:
          - {{name: a, base: [{dec}], test: false}}
          - name: b
            base: [{dis}]
            test: false
            overrides: {{model.init_args.decoder_ckpt: "{{run_dir}}/a/checkpoints/last.ckpt"}}
          - name: c
            base: [{dis}]
            overrides: {{model.init_args.decoder_ckpt: "{{run_dir}}/b/checkpoints/last.ckpt"}}
        runs: [{{name: r1}}, {{name: r2}}, {{name: r3}}]
        """)
    sweep = load_sweep(f)
    out = (tmp_path / "o").resolve()

    def identify(t):  # a of r1 and r2 identical; everything else differs
        return f"{t.stage}:{'r1' if t.stage == 'a' and t.run == 'r2' else t.run}"

    files = write_sweep_files(sweep, out, identify=identify)
    subs = {f.name: [(s.name, s.indices, s.after, s.after_task, s.array_flag) for s in f.submissions]
            for f in files.stages}
    assert subs == {
        "a": [("a", (0, 2), None, None, None)],
        "b": [("b", (0, 2), "a", None, "--array=0,2%2"), ("b__2", (1,), "a", 0, "--array=1%1")],
        "c": [("c", (0, 2), "b", None, "--array=0,2%2"), ("c__2", (1,), "b__2", None, "--array=1%1")],
    }
    b_r2 = next(t for t in files.stages[1].tasks if t.run == "r2")
    assert f"--model.init_args.decoder_ckpt={out}/r1/seed0/a/checkpoints/last.ckpt" in b_r2.args
    submit_sh = files.submit_script.read_text()
    assert "JOB_b__2=$(sbatch --parsable --array=1%1 --dependency=afterok:${JOB_a}_0 " in submit_sh
    assert "JOB_c__2=$(sbatch --parsable --array=1%1 --dependency=aftercorr:${JOB_b__2} " in submit_sh
    assert subprocess.run(["bash", "-n", str(files.submit_script)]).returncode == 0


def test_single_stage_identical_runs_train_once(standin, tmp_path, monkeypatch):  # noqa: F811
    """A sweep without stages: a run identical to Full is not trained; its row reads Full's folder."""
    fake = fake_executable(tmp_path / "bin" / "gsv3d", FAKE_GSV3D)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_LOG", str(log))
    f = write_sweep_file(tmp_path / "one.yaml", f"""
        name: one
        base: {standin}
        runs:
          - name: again
          - name: no_rgb
            overlays: [{ABL}/no_rgb.yaml]
          - name: full
            overlays: [{ABL}/full.yaml]
        slurm: {{command: {fake}}}
        """)
    sweep = load_sweep(f)
    out = (tmp_path / "o").resolve()
    files = write_sweep_files(sweep, out, rerooted=validate_configs(sweep), identify=config_identity)
    tasks = files.stages[0].tasks
    assert [(t.run, t.same_as_run) for t in tasks] == [("again", "full"), ("no_rgb", None), ("full", None)]
    assert "#SBATCH --array=1-2%2" in render_sbatch(sweep, tasks, out)
    assert run_local(files.stages[0].script, tasks) == 0
    assert [c[:2] for c in map(json.loads, log.read_text().splitlines())] == [
        ["fit", str(out / "no_rgb" / "seed0")], ["test", str(out / "no_rgb" / "seed0")],
        ["fit", str(out / "full" / "seed0")], ["test", str(out / "full" / "seed0")]]
    results = {r.name: r for r in collect_results(out)}
    assert results["again"].seeds == {0: "ok"} and results["again"].result_dirs[0] == out / "full" / "seed0"
    assert "again = Full Model (identical resolved config; seed 0)" in format_table(list(results.values()))


def test_dedupe_key_must_be_a_bool(bases, tmp_path):  # noqa: F811
    with pytest.raises(SweepError, match=r"chain.yaml:10: `dedupe` must be true or false"):
        load_sweep(chain_file(tmp_path, *bases, extra="dedupe: sometimes\n"))
