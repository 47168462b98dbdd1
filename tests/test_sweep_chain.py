"""Chained sweeps (`stages:`): schema and errors, overlays per stage, the per-stage array jobs with
`--dependency=aftercorr`, the local runner, and `gsv3d report`'s paired per-object comparison."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_sweep import REPO, fake_executable, make_standin, write_sweep_file

from gsv3d_pl.config import parse_config
from gsv3d_pl.metrics.results import PER_OBJECT_FILE, per_object_csv
from gsv3d_pl.sweep import (
    SweepError,
    collect_results,
    expand_tasks,
    format_table,
    load_sweep,
    paired_bootstrap,
    paired_comparison,
    paired_differences,
    validate_configs,
)
from gsv3d_pl.tools import report as report_tool
from gsv3d_pl.tools import sweep as sweep_tool

ABL = REPO / "configs" / "ablations"

# A stand-in for stage 2: the keys the stage-2 ablations change (lambda_rgb, lambda_depth, dino) and the stage-1
# checkpoint it reads (decoder_ckpt), so the chain is tested without the real models.
DISTILL_SRC = '''
import lightning.pytorch as pl
import torch


class Distiller(pl.LightningModule):
    def __init__(self, decoder_ckpt: str, lambda_rgb: float = 1.0, lambda_depth: float = 1.0,
                 dino: str | None = "tiny", lr: float = 1.0):
        super().__init__()
        self.save_hyperparameters()
        self.w = torch.nn.Parameter(torch.zeros(()))
'''

DISTILL_BASE = """
trainer:
  accelerator: cpu
  max_steps: 2
  logger: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {save_last: true}
model:
  class_path: sweep_distill_standin.Distiller
  init_args:
    decoder_ckpt: runs/decoder/checkpoints/last.ckpt
data:
  class_path: sweep_standin.Data
  init_args: {num_input_views: 6}
"""


@pytest.fixture
def bases(tmp_path, monkeypatch):
    """(decoder base, distill base) of the stand-in stages, importable here and in child processes."""
    folder = tmp_path / "standin"
    dec = make_standin(folder)
    (folder / "sweep_distill_standin.py").write_text(DISTILL_SRC)
    dis = folder / "distill_base.yaml"
    dis.write_text(DISTILL_BASE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), str(REPO)]))
    yield dec, dis
    sys.path.remove(str(folder))
    for mod in ("sweep_standin", "sweep_distill_standin"):
        sys.modules.pop(mod, None)


def chain_file(tmp_path: Path, dec: Path, dis: Path, runs: str | None = None, extra: str = "",
               slurm: str = "") -> Path:
    runs = runs if runs is not None else f"""
  - name: no_rgb
    overlays: {{distill: [{ABL}/distill_no_rgb.yaml]}}
  - name: n4
    overlays: {{decoder: [{ABL}/n4.yaml], distill: [{ABL}/n4.yaml]}}
  - name: no_dino
    overlays:
      decoder: [{ABL}/no_dino.yaml]
      distill: [{ABL}/distill_no_dino.yaml]
  - name: full
"""
    text = f"""name: chain
stages:
  - name: decoder
    base: [{dec}]
    test: false
  - name: distill
    base: [{dis}]
    overrides:
      model.init_args.decoder_ckpt: "{{run_dir}}/decoder/checkpoints/last.ckpt"
{extra}seeds: [0, 1]
max_parallel: 3
runs:{runs}{slurm}"""
    return write_sweep_file(tmp_path / "chain.yaml", text)


# ------------------------------------------------------------------------------------------- schema, overlays


def test_chain_schema_and_defaults(bases, tmp_path):
    sweep = load_sweep(chain_file(tmp_path, *bases, slurm="slurm: {time: '01:00:00'}\n"))
    assert sweep.chained and [s.name for s in sweep.stages] == ["decoder", "distill"]
    assert [s.test for s in sweep.stages] == [False, True]  # explicit false; the last stage tests by default
    assert sweep.result_stage.name == "distill"
    assert sweep.stages[1].test_ckpt == "{stage_dir}/checkpoints/last.ckpt"
    assert all(s.slurm.time == "01:00:00" for s in sweep.stages)  # the top-level slurm section, for every stage
    assert sweep.num_tasks == 8  # per stage: 4 runs x 2 seeds


def test_overlays_land_on_their_stage(bases, tmp_path):
    """Each run's overlays go to the stage they are keyed by; the distill stage reads its own task's decoder."""
    dec, dis = bases
    sweep = load_sweep(chain_file(tmp_path, dec, dis))
    out = tmp_path / "out"
    by = {(t.stage, t.run, t.seed): t for t in expand_tasks(sweep, out)}
    assert len(by) == 16

    def cfg(stage, run, seed=0):
        return parse_config(by[(stage, run, seed)].args)

    for stage in ("decoder", "distill"):
        for run in ("no_rgb", "n4", "no_dino", "full"):
            t = by[(stage, run, 1)]
            assert t.stage_dir == (out / run / "seed1" / stage).resolve()
            assert f"--trainer.default_root_dir={t.stage_dir}" in t.args
    # w/o RGB: stage 2's L_3D only; the decoder is trained as in Full
    assert cfg("distill", "no_rgb").model.init_args.lambda_rgb == 0.0
    assert cfg("decoder", "no_rgb").model.init_args.lambda_rgb == 1.0
    assert cfg("distill", "full").model.init_args.lambda_rgb == 1.0
    # N: both stages
    assert cfg("decoder", "n4").data.init_args.num_input_views == 4
    assert cfg("distill", "n4").data.init_args.num_input_views == 4
    assert cfg("distill", "full").data.init_args.num_input_views == 6
    # w/o DINO: both stages, each with its own overlay
    assert cfg("decoder", "no_dino").model.init_args.dino is None
    assert cfg("decoder", "no_dino").model.init_args.decoder.init_args.dino_dim is None
    assert cfg("distill", "no_dino").model.init_args.dino is None
    assert cfg("distill", "full").model.init_args.dino == "tiny"
    # the {run_dir} placeholder: this task's stage-1 checkpoint
    t = by[("distill", "n4", 1)]
    assert cfg("distill", "n4", 1).model.init_args.decoder_ckpt == str(t.run_dir / "decoder" / "checkpoints" /
                                                                      "last.ckpt")
    assert {t.index for t in by.values() if t.run == "n4" and t.seed == 1} == {3}  # same index in both arrays
    validate_configs(sweep)  # every run x stage composes with the CLI parser


def _bad_chain(tmp_path, dec, dis, body: str) -> Path:
    return write_sweep_file(tmp_path / "bad.yaml", body.replace("DEC", str(dec)).replace("DIS", str(dis)))


@pytest.mark.parametrize("body, message", [
    ("stages:\n  - {name: dis-till, base: DEC}\nruns: [{name: a}]\n",
     r"bad.yaml:2: stages\[0\] needs a `name` made of letters"),
    ("stages:\n  - {name: a, base: DEC}\n  - {name: a, base: DIS}\nruns: [{name: r}]\n",
     r"bad.yaml:3: duplicate stage name 'a'"),
    ("stages:\n  - {name: decoder, base: DEC}\n  - {name: distill, base: DIS}\nruns:\n  - name: r\n"
     "    overlays:\n      distil: [DIS]\n",
     r"bad.yaml:7: runs\[0\].overlays names 'distil', which is not a stage.*did you mean 'distill'"),
    ("stages:\n  - {name: decoder, base: DEC}\nruns:\n  - name: r\n    overlays: [DEC]\n",
     r"bad.yaml:5: runs\[0\].overlays: in a chained sweep \(`stages:`\) overlays are keyed by stage"),
    ("stages:\n  - {name: decoder, base: DEC}\nruns:\n  - name: r\n    overrides: {trainer.max_steps: 3}\n",
     r"bad.yaml:5: runs\[0\].overrides names 'trainer.max_steps', which is not a stage"),
    ("base: DEC\nstages:\n  - {name: decoder, base: DEC}\nruns: [{name: r}]\n",
     r"bad.yaml:1: `base` is per stage in a chained sweep.*stages\[i\].base"),
    ("stages:\n  - name: decoder\nruns: [{name: r}]\n", r"bad.yaml:2: stage 'decoder' is missing `base`"),
    ("stages: []\nruns: [{name: r}]\n", r"bad.yaml:1: `stages` must be a non-empty list"),
    ("stages:\n  - name: decoder\n    base: DEC\n    overrides:\n      model.init_args.x: '{run_dir}/distill/a.ckpt'\n"
     "  - {name: distill, base: DIS}\nruns: [{name: r}]\n",
     r"bad.yaml:5: `model.init_args.x` of stage 'decoder' reads \{run_dir\}/distill/.*does not run before it"),
    ("stages:\n  - {name: decoder, base: DEC}\n  - name: distill\n    base: DIS\n    overrides:\n"
     "      model.init_args.decoder_ckpt: '{rundir}/decoder/checkpoints/last.ckpt'\nruns: [{name: r}]\n",
     r"bad.yaml:6: unknown placeholder \{rundir\}"),
    ("stages:\n  - {name: decoder, base: DEC, tset: true}\nruns: [{name: r}]\n",
     r"bad.yaml:2: unknown key 'tset' in stages\[0\].*did you mean 'test'"),
    ("stages:\n  - {name: decoder, base: DEC}\nruns: [{name: r}]\nslurm:\n  extra: ['--dependency=afterok:1']\n",
     r"bad.yaml:5: `slurm.extra` must not set --dependency"),
    ("stages:\n  - name: decoder\n    base: DEC\n    slurm: {gpus: 2}\nruns: [{name: r}]\n",
     r"bad.yaml:4: unknown key 'gpus' in stages\[0\].slurm"),
], ids=["stage_name", "duplicate_stage", "overlay_unknown_stage", "overlays_not_keyed", "overrides_not_keyed",
        "top_level_base", "stage_without_base", "no_stages", "reads_later_stage", "placeholder_typo",
        "stage_key_typo", "dependency_in_extra", "stage_slurm_key"])
def test_bad_chain_schema_names_line(bases, tmp_path, body, message):
    with pytest.raises(SweepError, match=message):
        load_sweep(_bad_chain(tmp_path, *bases, body))


def test_typo_in_stage_override_names_stage_and_line(bases, tmp_path):
    f = chain_file(tmp_path, *bases, runs="""
  - name: full
  - name: typo
    overrides:
      distill: {model.init_args.lamda_rgb: 0.0}
""")
    with pytest.raises(SweepError, match=r"chain.yaml:16: run 'typo', stage 'distill': override "
                                         r"`model.init_args.lamda_rgb: 0.0`"):
        validate_configs(load_sweep(f))


# ------------------------------------------------------------------------------------ scripts, dry run, submit


def _sbatch_flags(script: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=?(.*)$", script, re.M))


def test_dry_run_prints_stages_and_dependencies(bases, tmp_path, capsys):
    f = chain_file(tmp_path, *bases, slurm="slurm: {time: '02:00:00'}\n")
    out = tmp_path / "o"
    assert sweep_tool.main([str(f), "--dry-run", "--no-validate", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    dec, dis = (out / "decoder.sbatch").read_text(), (out / "distill.sbatch").read_text()
    assert f"#   stage 1 decoder: {out / 'decoder.sbatch'}  no dependency" in printed
    assert (f"#   stage 2 distill: {out / 'distill.sbatch'}  --dependency=aftercorr:<job id of decoder> "
            "(task k waits for task k of decoder)") in printed
    assert dec in printed and dis in printed and printed.index(dec) < printed.index(dis)
    fd, fs = _sbatch_flags(dec), _sbatch_flags(dis)
    assert fd["array"] == fs["array"] == "0-7%3"  # the same task indices: aftercorr pairs task k with task k
    assert fd["job-name"] == "gsv3d-chain-decoder" and fs["job-name"] == "gsv3d-chain-distill"
    assert "kill-on-invalid-dep" not in fd and fs["kill-on-invalid-dep"] == "yes"
    for flags in (fd, fs):  # each stage stays requeue-safe on its own
        assert flags["signal"] == "SIGUSR1@120" and "requeue" in flags and flags["open-mode"] == "append"
        assert flags["time"] == "02:00:00"
    assert fd["output"].endswith("/slurm/decoder_%A_%a.out")
    # fit never gets --ckpt_path (SLURMEnvironment resumes from the stage folder's hpc_ckpt); markers per stage
    for script, stage in ((dec, "decoder"), (dis, "distill")):
        fit = next(ln for ln in script.splitlines() if re.search(r"srun .* fit ", ln))
        assert "--ckpt_path" not in fit
        assert 'STAGE_DIR="$RUN_DIR"/' + stage in script and 'touch "$STAGE_DIR/fit.done"' in script
        assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert "test.done" not in dec and 'touch "$STAGE_DIR/test.done"' in dis  # only the result stage tests
    assert 'if [[ ! -e "$PREV_DIR"/fit.done ]]' in dis  # a distill task refuses to start before its decoder
    assert f"PREV_DIR={out.resolve() / 'n4' / 'seed1' / 'decoder'}" in dis  # (--no-validate: nothing is shared)
    submit_sh = (out / "submit.sh").read_text()
    assert f"--dependency=aftercorr:${{JOB_decoder}} {out / 'distill.sbatch'}" in submit_sh
    assert subprocess.run(["bash", "-n", str(out / "submit.sh")]).returncode == 0
    manifest = json.loads((out / "sweep.json").read_text())
    assert [(s["name"], s["depends_on"], s["dependency"]) for s in manifest["stages"]] == [
        ("decoder", None, None), ("distill", "decoder", "aftercorr")]
    assert manifest["result_stage"] == "distill"
    assert manifest["tasks"][0]["result_dir"] == str(out.resolve() / "no_rgb" / "seed0" / "distill")
    rows = [ln.split("\t") for ln in (out / "tasks.txt").read_text().splitlines() if not ln.startswith("#")]
    assert len(rows) == 16 and {r[0] for r in rows} == {"decoder", "distill"}


def test_submit_chains_with_aftercorr(bases, tmp_path, capsys, monkeypatch):
    log = tmp_path / "sbatch.log"
    fake_executable(tmp_path / "bin" / "sbatch", f"""#!/bin/bash
echo "$@" >> {log}
n=$(wc -l < {log})
[[ -n "${{FAIL_AT:-}}" && "$n" == "$FAIL_AT" ]] && {{ echo "sbatch: error: QOSMaxSubmitJobPerUserLimit" >&2; exit 1; }}
echo "$((100 + n));cluster"
""", monkeypatch)
    f = chain_file(tmp_path, *bases)
    out = tmp_path / "o"
    assert sweep_tool.main([str(f), "--submit", "--out", str(out)]) == 0  # validates every run x stage too
    assert capsys.readouterr().out.split() == ["101", "102", "103", "104"]
    calls = [ln.split() for ln in log.read_text().splitlines()]
    # no_rgb changes only the distill stage: its decoders (tasks 0, 1) are full's (tasks 6, 7), trained once; its
    # distill tasks wait for those (tests/test_sweep_dedupe.py has the rest)
    assert calls == [["--parsable", str(out / "decoder.sbatch")],
                     ["--parsable", "--array=2-7%3", "--dependency=aftercorr:101", str(out / "distill.sbatch")],
                     ["--parsable", "--array=0%1", "--dependency=afterok:101_6", str(out / "distill.sbatch")],
                     ["--parsable", "--array=1%1", "--dependency=afterok:101_7", str(out / "distill.sbatch")]]
    log.unlink()
    monkeypatch.setenv("FAIL_AT", "2")
    assert sweep_tool.main([str(f), "--submit", "--no-validate", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "QOSMaxSubmitJobPerUserLimit" in err and "already submitted: decoder=101" in err and "scancel 101" in err


# ------------------------------------------------------------------------------------------------ local runner

FAKE_CHAIN_GSV3D = """#!/usr/bin/env python3
import json, os, sys
args = sys.argv[1:]
root = [a.split("=", 1)[1] for a in args if a.startswith("--trainer.default_root_dir=")][0]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps([args[0], root]) + "\\n")
ckpt = [a.split("=", 1)[1] for a in args if a.startswith("--model.init_args.decoder_ckpt=")]
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


def test_local_runner_runs_each_tasks_stages_in_order(bases, tmp_path, monkeypatch):
    """Task by task, decoder fit then distill fit + test; a failed stage skips only its own task's later stages;
    a second run skips every finished phase (the per-stage markers a requeued task relies on)."""
    fake = fake_executable(tmp_path / "bin" / "gsv3d", FAKE_CHAIN_GSV3D)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("FAKE_FAIL", f"{os.sep}n4{os.sep}seed0{os.sep}decoder")
    runs = f"\n  - name: n4\n    overlays: {{decoder: [{ABL}/n4.yaml], distill: [{ABL}/n4.yaml]}}\n  - name: full\n"
    f = chain_file(tmp_path, *bases, runs=runs, slurm=f"slurm: {{command: {fake}}}\n")
    out = (tmp_path / "o").resolve()
    assert sweep_tool.main([str(f), "--local", "--no-validate", "--out", str(out)]) == 1  # one task failed
    calls = [tuple(json.loads(ln)) for ln in log.read_text().splitlines()]
    d = {(r, s): out / r / f"seed{s}" for r in ("n4", "full") for s in (0, 1)}
    assert calls == [
        ("fit", str(d["n4", 0] / "decoder")),  # fails: no distill for this task
        ("fit", str(d["n4", 1] / "decoder")), ("fit", str(d["n4", 1] / "distill")),
        ("test", str(d["n4", 1] / "distill")),
        ("fit", str(d["full", 0] / "decoder")), ("fit", str(d["full", 0] / "distill")),
        ("test", str(d["full", 0] / "distill")),
        ("fit", str(d["full", 1] / "decoder")), ("fit", str(d["full", 1] / "distill")),
        ("test", str(d["full", 1] / "distill")),
    ]
    assert "decoder fit: exit 3" in (d["n4", 0] / "decoder" / "FAILED").read_text()
    assert not (d["n4", 0] / "distill").exists()
    for key in (("n4", 1), ("full", 0), ("full", 1)):
        assert {p.name for p in (d[key] / "decoder").glob("*.done")} == {"fit.done"}
        assert {p.name for p in (d[key] / "distill").glob("*.done")} == {"fit.done", "test.done"}
    results = {r.name: r for r in collect_results(out)}
    assert results["n4"].seeds == {0: "failed", 1: "ok"} and results["full"].seeds == {0: "ok", 1: "ok"}
    assert any("decoder fit: exit 3" in n for n in results["n4"].notes)
    assert results["full"].result_dirs[1] == d["full", 1] / "distill"

    # The distill stage on its own (e.g. submitted without the chain) refuses to start without its decoder.
    monkeypatch.delenv("FAKE_FAIL")
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "0", "GSV3D_SWEEP_LOCAL": "1"}
    proc = subprocess.run(["bash", str(out / "distill.sbatch")], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "stage decoder of this task has not finished" in proc.stderr
    # Rerun: only the failed task's stages run again, the finished phases are skipped.
    log.unlink()
    assert sweep_tool.main([str(f), "--local", "--no-validate", "--out", str(out)]) == 0
    calls = [tuple(json.loads(ln)) for ln in log.read_text().splitlines()]
    assert calls == [("fit", str(d["n4", 0] / "decoder")), ("fit", str(d["n4", 0] / "distill")),
                     ("test", str(d["n4", 0] / "distill"))]


# ------------------------------------------------------------------------------------ report: paired bootstrap


def test_paired_bootstrap_known_difference_and_identity():
    import random

    rng = random.Random(1)
    diffs = [-1.0 + rng.gauss(0.0, 0.3) for _ in range(40)]
    mean, lo, hi = paired_bootstrap(diffs)
    assert lo < mean < hi < 0.0 and mean == pytest.approx(sum(diffs) / 40)
    assert -1.25 < lo and hi < -0.75
    assert paired_bootstrap(diffs) == (mean, lo, hi)  # fixed RNG seed: the same interval every time
    assert paired_bootstrap(diffs, seed=1) != (mean, lo, hi)
    assert paired_bootstrap([0.0] * 7) == (0.0, 0.0, 0.0)
    noise = [rng.gauss(0.0, 1.0) for _ in range(40)]
    m, lo0, hi0 = paired_bootstrap([x - sum(noise) / 40 for x in noise])  # mean 0: the interval straddles 0
    assert lo0 < 0.0 < hi0
    with pytest.raises(ValueError, match="no differences"):
        paired_bootstrap([])


def test_paired_differences_pair_by_uid_within_seed():
    full = {0: {"a": {"psnr": 20.0}, "b": {"psnr": 22.0}, "c": {"psnr": 21.0}},
            1: {"a": {"psnr": 19.0}, "b": {"psnr": 23.0}}}
    row = {0: {"b": {"psnr": 21.0}, "a": {"psnr": 18.0}, "z": {"psnr": 5.0}},   # z: not in Full, left out
           1: {"a": {"psnr": 18.0}, "b": {"psnr": float("nan")}},                # NaN: left out
           2: {"a": {"psnr": 0.0}}}                                             # no Full seed 2: left out
    diffs, seeds = paired_differences(row, full, "psnr")
    assert diffs == {"a": pytest.approx((-2.0 + -1.0) / 2), "b": -1.0} and seeds == 2


def _put_task(root: Path, run: str, seed: int, stage: str, psnr_by_uid: dict[str, float],
              consistency: float | None = None, copy_psnr: float | None = None) -> None:
    """A task's metrics.json and per-object CSV; ``consistency`` adds the 3D consistency (ours, no GT: per object
    the PSNR + this offset), ``copy_psnr`` the model-free baselines (as `gsv3d test` of a distill stage writes)."""
    d = root / run / f"seed{seed}" / stage
    d.mkdir(parents=True, exist_ok=True)
    mean = sum(psnr_by_uid.values()) / len(psnr_by_uid)
    values = {"psnr": mean, "ssim": 0.8, "lpips": 0.1, "fid": 50.0, "kid": 0.2}
    if consistency is not None:
        values["consistency_psnr"] = mean + consistency
    metrics: dict = {k: {"value": v, "num_objects": len(psnr_by_uid), "num_views": 4} for k, v in values.items()}
    if copy_psnr is not None:
        metrics["baselines"] = {"copy_input": {"psnr": {"value": copy_psnr, "num_objects": 1, "num_views": 4},
                                               "ssim": {"value": 0.6, "num_objects": 1, "num_views": 4}},
                                "mean_image": {"psnr": {"value": copy_psnr - 2.0, "num_objects": 1, "num_views": 4}}}
    (d / "metrics.json").write_text(json.dumps(metrics))
    extra = {} if consistency is None else {"consistency_psnr": consistency}
    (d / PER_OBJECT_FILE).write_text(per_object_csv({u: {"psnr": p, "ssim": 0.8, **{k: p + v for k, v in extra.items()}}
                                                     for u, p in psnr_by_uid.items()}))


def test_report_chained_table_with_paired_comparison(tmp_path, capsys):
    root = tmp_path / "abl"
    runs = ["no_rgb", "n4", "full"]
    tasks = [{"index": i, "run": r, "seed": s, "run_dir": str(root / r / f"seed{s}"),
              "result_dir": str(root / r / f"seed{s}" / "distill")}
             for i, (r, s) in enumerate((r, s) for r in runs for s in (0, 1))]
    labels = {"no_rgb": "w/o RGB loss", "n4": "N = 4", "full": "Full Model"}
    root.mkdir()
    (root / "sweep.json").write_text(json.dumps({
        "name": "abl", "seeds": [0, 1], "runs": [{"name": r, "label": labels[r]} for r in runs], "tasks": tasks,
        "stages": [{"name": "decoder", "depends_on": None}, {"name": "distill", "depends_on": "decoder"}],
        "result_stage": "distill"}))
    uids = [f"obj{i:02d}" for i in range(12)]
    for s in (0, 1):
        base = {u: 18.0 + 0.5 * i + 0.1 * s for i, u in enumerate(uids)}
        _put_task(root, "full", s, "distill", base, consistency=5.0, copy_psnr=12.0 + s)
        _put_task(root, "n4", s, "distill", dict(base), consistency=5.0)  # identical to Full, object by object
        _put_task(root, "no_rgb", s, "distill", {u: v - 1.0 - 0.05 * (i % 3) for i, (u, v) in
                                                  enumerate(reversed(list(base.items())))}, consistency=4.0)
    results = collect_results(root)
    comparison = paired_comparison(results)
    assert set(comparison) == {"no_rgb", "n4"}
    d = comparison["no_rgb"]["psnr"]
    assert d.num_objects == 12 and d.num_seeds == 2 and d.excludes_zero and d.hi < -0.9 and d.lo > -1.15
    same = comparison["n4"]["psnr"]
    assert (same.mean, same.lo, same.hi) == (0.0, 0.0, 0.0) and not same.excludes_zero
    assert comparison["no_rgb"]["chamfer"] is None  # a column the CSVs do not have

    md = format_table(results)
    ours = [ln for ln in md.splitlines() if ln.startswith("| ") and "(paper)" not in ln]
    assert [ln.split("|")[1].strip() for ln in ours] == [
        "Method", "w/o RGB loss", "N = 4", "Full Model", "copy the input image (no model)",
        "mean training image (no model)", "Difference", "w/o RGB loss − Full Model", "N = 4 − Full Model"]
    # the model-free rows (Full's seeds) and the 3D consistency (ours, no GT) column of each row
    cells = {ln.split("|")[1].strip(): [c.strip() for c in ln.strip().strip("|").split("|")[1:]] for ln in ours}
    assert cells["Method"][-1] == "3D consistency (ours, no GT) PSNR↑"
    assert cells["copy the input image (no model)"][:3] == ["12.500 ± 0.707", "0.600 ± 0.000", "–"]
    assert cells["copy the input image (no model)"][-1] == cells["mean training image (no model)"][-1] == "–"
    assert cells["N = 4"][-1] == cells["Full Model"][-1] and float(cells["Full Model"][-1].split()[0]) > 23
    assert cells["Difference"][-2] == "Δ3D consistency (ours, no GT) PSNR↑"  # paired, as every per-object column
    assert "| w/o RGB loss (paper) " in md and "| Full Model (paper) " in md  # the paper's row beside ours
    paired_rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.strip().strip("|").split("|")[1:]]
                   for ln in ours[-2:]}
    assert paired_rows["N = 4 − Full Model"][0] == "0.000 [0.000, 0.000]"
    assert re.fullmatch(r"-1\.\d{3} \[-1\.\d{3}, -[01]\.\d{3}\]\*", paired_rows["w/o RGB loss − Full Model"][0])
    assert paired_rows["w/o RGB loss − Full Model"][-1] == "12 × 2"
    assert "stage distill" in md and "bootstrap" in md and "RNG seed 0" in md
    assert report_tool.main([str(root)]) == 0 and capsys.readouterr().out == md  # the CLI prints the same


def test_report_tiny_difference_is_not_printed_as_zero(tmp_path):
    """A real difference below the column's decimals (e.g. a 1-step LoRA) is shown in e-notation, not 0.000*."""
    root = tmp_path / "abl"
    uids = {f"o{i}": 20.0 + i for i in range(6)}
    _put_task(root, "full", 0, "distill", uids)
    _put_task(root, "no_rgb", 0, "distill", {u: v + 2e-6 * (1 + (i % 2)) for i, (u, v) in enumerate(uids.items())})
    row = next(ln for ln in format_table(collect_results(root)).splitlines() if ln.startswith("| w/o RGB loss − "))
    psnr = row.split("|")[2].strip()
    assert re.fullmatch(r"\d\.\de-06 \[\d\.\de-06, \d\.\de-06\]\*", psnr), psnr
    assert row.split("|")[3].strip() == "0.000 [0.000, 0.000]"  # SSIM identical: a true zero, no star


def test_report_without_reference_or_csvs_has_no_paired_table(tmp_path):
    root = tmp_path / "abl"
    _put_task(root, "no_rgb", 0, "distill", {"a": 1.0})
    md = format_table(collect_results(root))  # no manifest: scans <run>/seed<k>/<stage>/metrics.json
    assert "| w/o RGB loss " in md and "Paired comparison" not in md


# ------------------------------------------------------------------------------------------- the repo's files


def test_repo_chained_sweep_files():
    """configs/sweeps/ablations{,_tiny}.yaml: the paper's protocol: decoder -> distill, the stage-2 ablations in
    the distill stage only, N and DINO in both, every run composes with the real stage classes."""
    for name in ("ablations", "ablations_tiny"):
        sweep = load_sweep(REPO / "configs" / "sweeps" / f"{name}.yaml", root=REPO)
        assert [s.name for s in sweep.stages] == ["decoder", "distill"] and sweep.result_stage.name == "distill"
        assert [r.label for r in sweep.runs] == ["w/o RGB loss", "w/o Depth loss", "N = 8", "N = 4",
                                                 "w/o DINO encoder", "Full Model"]
        ov = {r.name: {s: [p.name for p in r.overlays_for(s)] for s in ("decoder", "distill")} for r in sweep.runs}
        assert ov["no_rgb"] == {"decoder": [], "distill": ["distill_no_rgb.yaml"]}
        assert ov["no_depth"] == {"decoder": [], "distill": ["distill_no_depth.yaml"]}
        assert ov["n8"] == {"decoder": ["n8.yaml"], "distill": ["n8.yaml"]}
        assert ov["no_dino"] == {"decoder": ["no_dino.yaml"], "distill": ["distill_no_dino.yaml"]}
        assert sweep.stages[1].overrides["model.init_args.decoder_ckpt"] == "{run_dir}/decoder/checkpoints/last.ckpt"
        assert {b.parent.name for b in sweep.stages[0].base} >= {"decoder"}
        assert {b.parent.name for b in sweep.stages[1].base} >= {"distill"}
    validate_configs(sweep)  # the tiny one with the real classes (the paper-scale one: tests/test_sweep.py)


# ------------------------------------------------------------------------------------------- end to end, slow


@pytest.mark.slow  # two chains of real tiny stages on CPU (~2-3 min on 2 cores)
def test_tiny_chain_end_to_end(tmp_path, monkeypatch):
    """A 2-row chain on the real tiny configs: decoder -> distill -> `gsv3d test` of the distill checkpoint, through
    `gsv3d sweep --local`; `gsv3d report` then prints both rows, scored end to end, and the paired comparison."""
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(REPO)  # the configs' relative paths (callbacks/, datamodules/) as `make paper-tiny` runs
    f = write_sweep_file(tmp_path / "t.yaml", f"""
        name: tiny_chain
        stages:
          - name: decoder
            base: [configs/decoder/tiny.yaml, configs/trainer/cpu.yaml]
            overrides: {{trainer.max_steps: 2, model.init_args.heldout_eval: false}}
          - name: distill
            base: [configs/distill/tiny.yaml, configs/trainer/cpu.yaml]
            overrides:
              model.init_args.decoder_ckpt: "{{run_dir}}/decoder/checkpoints/last.ckpt"
              model.init_args.val_sample_steps: 2
              model.init_args.test_variants: [distilled]
              trainer.max_steps: 1
        overrides:
          data.init_args.toy_objects: 8
          data.init_args.cache_dir: {tmp_path}/toy_cache
          trainer.enable_progress_bar: false
          trainer.enable_model_summary: false
        runs:
          - name: no_rgb
            overlays: {{distill: [configs/ablations/distill_no_rgb.yaml]}}
          - name: full
        """)
    out = tmp_path / "runs" / "tiny_chain"
    start = time.monotonic()
    assert sweep_tool.main([str(f), "--local", "--out", str(out)]) == 0
    proc = subprocess.run([str(Path(sys.executable).parent / "gsv3d"), "report", str(out), "--strict"],
                          capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    md = proc.stdout
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.strip().strip("|").split("|")[1:]]
            for ln in md.splitlines() if ln.startswith("| ")}
    for label in ("w/o RGB loss", "Full Model"):
        assert 0.0 < float(rows[label][0]) < 100.0, (label, rows[label])  # one seed: a plain PSNR
        assert f"{label} (paper)" in rows
    assert "w/o RGB loss − Full Model" in rows and "stage distill" in md
    # w/o RGB changes only stage 2: its decoder is Full's, trained once in Full's folder (identical resolved config)
    full_dec = out / "full" / "seed0" / "decoder"
    assert (full_dec / "fit.done").exists() and not (full_dec / "test.done").exists()
    assert not (out / "no_rgb" / "seed0" / "decoder" / "fit.done").exists()
    for run in ("no_rgb", "full"):
        task = out / run / "seed0"
        metrics = json.loads((task / "distill" / "metrics.json").read_text())
        # scored end to end: `gsv3d test` of this task's distill checkpoint
        assert Path(metrics["meta"]["ckpt_path"]).parent == task / "distill" / "checkpoints"
        assert "distill" in str(metrics["meta"].get("config"))  # the distill config, not the decoder's
        with open(task / "distill" / PER_OBJECT_FILE, newline="") as fh:
            assert len(list(csv.DictReader(fh))) >= 1
    saved = sorted((out / "no_rgb" / "seed0" / "distill").glob("csv/*/config.yaml"))[0].read_text()
    assert "lambda_rgb: 0.0" in saved and f"{full_dec}/checkpoints/last.ckpt" in saved
    print(f"2-row tiny chain end to end: {elapsed:.0f} s")
