"""`gsv3d sweep`: sweep-file loading and validation, task expansion, the sbatch script, --local runs."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gsv3d_pl.config import parse_config
from gsv3d_pl.sweep import SweepError, expand_tasks, load_sweep, render_sbatch, validate_configs, write_sweep
from gsv3d_pl.tools import sweep as sweep_tool

REPO = Path(__file__).resolve().parents[1]
ABLATIONS = ("full", "no_rgb", "no_depth", "n8", "n4", "no_dino")

# A stand-in stage with the keys the ablations change (lambda_rgb, lambda_depth, dino, decoder.init_args.dino_dim,
# data.init_args.num_input_views), so the sweep machinery is tested without the real models. Its one weight w
# grows by exactly 1 per optimizer step (loss = -w, SGD lr 1): the final w counts the steps that reached the
# final weights, which is how the requeue test proves no step was applied twice or lost.
STANDIN_SRC = '''
import os, time
import torch
import lightning.pytorch as pl

from gsv3d_pl.io import write_json_atomic


class Decoder(torch.nn.Module):
    def __init__(self, width: int = 4, dino_dim: int | None = 8):
        super().__init__()
        self.width, self.dino_dim = width, dino_dim


class Counter(pl.LightningModule):
    def __init__(self, decoder: torch.nn.Module | None = None, lambda_rgb: float = 1.0, lambda_depth: float = 1.0,
                 dino: str | None = "tiny", step_sleep: float = 0.0, lr: float = 1.0):
        super().__init__()
        self.save_hyperparameters(ignore=["decoder"])
        self.decoder = decoder
        self.w = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx):
        time.sleep(self.hparams.step_sleep)
        os.makedirs(self.trainer.default_root_dir, exist_ok=True)
        with open(os.path.join(self.trainer.default_root_dir, "steps.log"), "a") as f:
            f.write(f"{self.global_step} {os.environ.get('SLURM_RESTART_COUNT', '0')}\\n")
        return -self.w + 0.0 * batch.sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def test_step(self, batch, batch_idx):
        return None

    def on_test_epoch_end(self):
        dm = self.trainer.datamodule
        dino = self.hparams.dino is not None and getattr(self.decoder, "dino_dim", None) is not None
        noise = float(torch.rand(()))  # differs per seed_everything: a non-zero std over seeds
        psnr = 20.0 + self.hparams.lambda_rgb + 0.5 * self.hparams.lambda_depth + 0.1 * dm.num_input_views
        psnr += 1.0 * dino + 0.1 * noise
        values = {"psnr": psnr, "ssim": 0.8 + 0.01 * noise, "lpips": 0.05, "fid": 50.0 - psnr, "kid": 0.2,
                  "clip_iqa": 0.8, "chamfer": 0.1, "iou": 0.7, "fscore": 0.6}
        out = {k: {"value": v, "num_objects": 2, "num_views": 4} for k, v in values.items()}
        out["meta"] = {"fscore_tau": 0.05, "smoke": True, "ckpt_path": self.trainer.ckpt_path, "config": None,
                       "w": float(self.w)}
        write_json_atomic(os.path.join(self.trainer.default_root_dir, "metrics.json"), out)


class Data(pl.LightningDataModule):
    def __init__(self, num_input_views: int = 6, length: int = 1000):
        super().__init__()
        self.num_input_views, self.length = num_input_views, length

    def _loader(self):
        return torch.utils.data.DataLoader(torch.zeros(self.length, 2), batch_size=1)

    def train_dataloader(self):
        return self._loader()

    def test_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(2, 2), batch_size=1)
'''

STANDIN_BASE = """
trainer:
  accelerator: cpu
  max_steps: {max_steps}
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{save_last: true}}
model:
  class_path: sweep_standin.Counter
  init_args:
    step_sleep: {step_sleep}
    decoder:
      class_path: sweep_standin.Decoder
      init_args: {{width: 4}}
data:
  class_path: sweep_standin.Data
  init_args: {{num_input_views: 6}}
"""


def make_standin(tmp: Path, max_steps: int = 3, step_sleep: float = 0.0) -> Path:
    """Write the stand-in module + base config into ``tmp``; put the module on this process's and children's path."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "sweep_standin.py").write_text(STANDIN_SRC)
    base = tmp / "standin_base.yaml"
    base.write_text(STANDIN_BASE.format(max_steps=max_steps, step_sleep=step_sleep))
    if str(tmp) not in sys.path:
        sys.path.insert(0, str(tmp))
    return base


@pytest.fixture
def standin(tmp_path, monkeypatch):
    base = make_standin(tmp_path / "standin")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "standin"), str(REPO)]))
    yield base
    sys.path.remove(str(tmp_path / "standin"))
    sys.modules.pop("sweep_standin", None)


def fake_executable(path: Path, script: str, monkeypatch: pytest.MonkeyPatch | None = None) -> Path:
    """Write an executable script at ``path``; given ``monkeypatch``, put its folder first on PATH."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    path.chmod(0o755)
    if monkeypatch is not None:
        monkeypatch.setenv("PATH", f"{path.parent}{os.pathsep}{os.environ['PATH']}")
    return path


def write_sweep_file(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def ablation_sweep(tmp_path: Path, base: Path, extra: str = "", slurm: str = "") -> Path:
    runs = "\n".join(f"  - name: {n}\n    overlays: [{REPO}/configs/ablations/{n}.yaml]" for n in ABLATIONS)
    text = f"name: abl\nbase: {base}\nseeds: [0, 1]\nmax_parallel: 3\n{extra}runs:\n{runs}\n{slurm}"
    return write_sweep_file(tmp_path / "abl.yaml", text)


# ------------------------------------------------------------------------------------------------- overlays


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


@pytest.mark.parametrize(
    "overlay, expected",
    [
        ("full", {}),
        ("no_rgb", {"model.init_args.lambda_rgb": 0.0}),
        ("no_depth", {"model.init_args.lambda_depth": 0.0}),
        ("n8", {"data.init_args.num_input_views": 8}),
        ("n4", {"data.init_args.num_input_views": 4}),
        ("no_dino", {"model.init_args.dino": None, "model.init_args.decoder.init_args.dino_dim": None}),
    ],
)
def test_overlay_changes_only_its_keys(standin, overlay, expected):
    """Composed with --config base --config overlay (no class_path in the overlay: subclass mode merges into the
    base's classes), each ablation changes exactly its keys and nothing else."""
    base_cfg = _flatten(parse_config(["--config", str(standin)]).as_dict())
    cfg = _flatten(parse_config(["--config", str(standin), "--config", str(REPO / f"configs/ablations/{overlay}.yaml")])
                   .as_dict())
    changed = {k: v for k, v in cfg.items() if base_cfg.get(k, "<absent>") != v and k != "config"}
    assert changed == expected
    assert cfg["model.class_path"] == "sweep_standin.Counter"
    assert cfg["model.init_args.decoder.class_path"] == "sweep_standin.Decoder"


# ----------------------------------------------------------------------------------------- script generation


def _task_block(script: str, index: int) -> str:
    m = re.search(rf"^  {index}\) RUN_DIR=(.*?)\n     ARGS=\((.*?)\) ;;$", script, re.M | re.S)
    assert m, f"task {index} not in script"
    return m.group(0)


@pytest.mark.parametrize("gpus, ntasks", [(4, 4), (0, 1)])
def test_sbatch_script_layout(standin, tmp_path, gpus, ntasks):
    sweep_file = ablation_sweep(tmp_path, standin, slurm=f"slurm:\n  gpus_per_node: {gpus}\n  nodes: 2\n"
                                "  partition: gpu\n  account: proj1\n  mem: 64G\n  time: '24:00:00'\n"
                                "  cpus_per_task: 6\n  extra: ['--qos=high', '#SBATCH --constraint=a100']\n")
    sweep = load_sweep(sweep_file)
    out = tmp_path / "runs" / "abl"
    tasks = expand_tasks(sweep, out)
    script = render_sbatch(sweep, tasks, out)
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)=?(.*)$", script, re.M))

    assert len(tasks) == 12  # 6 runs x 2 seeds, run-major
    assert sbatch["array"] == "0-11%3"
    assert sbatch["ntasks-per-node"] == str(ntasks)
    assert sbatch["nodes"] == "2"
    assert sbatch["signal"] == "SIGUSR1@120"
    assert "requeue" in sbatch and sbatch["open-mode"] == "append"
    assert sbatch["partition"] == "gpu" and sbatch["account"] == "proj1" and sbatch["mem"] == "64G"
    assert sbatch["time"] == "24:00:00" and sbatch["cpus-per-task"] == "6"
    assert sbatch["qos"] == "high" and sbatch["constraint"] == "a100"
    assert ("gpus-per-node" in sbatch) == (gpus > 0)
    # Lightning's ranks come from srun tasks: every training/testing command is launched by srun.
    launches = [ln.strip() for ln in script.splitlines() if re.search(r"\bgsv3d (fit|test)\b", ln)
                and not ln.lstrip().startswith(("#", "echo"))]
    assert len(launches) == 2 and all(ln.startswith("srun ") for ln in launches)
    fit_line = next(ln for ln in launches if " fit " in ln)
    assert "--ckpt_path" not in fit_line  # fit must leave the resume to SLURMEnvironment's hpc_ckpt
    for t in tasks:
        assert f"--trainer.devices={ntasks}" in t.args  # == --ntasks-per-node
        assert "--trainer.num_nodes=2" in t.args
        assert f"--trainer.default_root_dir={t.run_dir}" in t.args
        assert f"--seed_everything={t.seed}" in t.args
        assert t.run_dir == (out / t.run / f"seed{t.seed}").resolve()
        assert shlex.quote(str(t.run_dir)) in _task_block(script, t.index)
    assert [(t.run, t.seed) for t in tasks[:3]] == [("full", 0), ("full", 1), ("no_rgb", 0)]
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # valid bash


def test_run_folders_stable_across_regeneration(standin, tmp_path, monkeypatch):
    """The same sweep written again (another cwd, later) gives every task the same folder and arguments, so a
    requeued task, or a resubmitted sweep, finds its checkpoints."""
    sweep_file = ablation_sweep(tmp_path, standin)
    out = tmp_path / "runs" / "abl"
    _, _, first = write_sweep(load_sweep(sweep_file), out)
    monkeypatch.chdir(tmp_path)
    _, tasks_txt, again = write_sweep(load_sweep(sweep_file), Path("runs/abl"))
    assert [(t.run_dir, t.args) for t in first] == [(t.run_dir, t.args) for t in again]
    rows = [ln.split("\t") for ln in tasks_txt.read_text().splitlines() if not ln.startswith("#")]
    assert len(rows) == 12 and [r[0] for r in rows] == [str(i) for i in range(12)]
    assert [shlex.split(r[4]) for r in rows] == [list(t.args) for t in first]
    manifest = json.loads((out / "sweep.json").read_text())
    assert [r["label"] for r in manifest["runs"]] == ["Full Model", "w/o RGB loss", "w/o Depth loss", "N = 8",
                                                      "N = 4", "w/o DINO encoder"]


FAKE_GSV3D = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if "fit" in sys.argv[1:3]:
    root = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--trainer.default_root_dir=")][0]
    os.makedirs(os.path.join(root, "checkpoints"), exist_ok=True)
    open(os.path.join(root, "checkpoints", "last.ckpt"), "w").close()
sys.exit(int(os.environ.get("FAKE_RC", "0")))
"""


def test_quoting_survives_spaces_and_quotes(standin, tmp_path, monkeypatch):
    """Override values with spaces, quotes and $ reach `gsv3d fit` / `gsv3d test` as single, unchanged arguments,
    also with a space in the output folder; test gets --ckpt_path <run>/checkpoints/last.ckpt."""
    fake = fake_executable(tmp_path / "bin dir" / "gsv3d", FAKE_GSV3D)
    log = tmp_path / "argv.jsonl"
    monkeypatch.setenv("FAKE_LOG", str(log))
    tricky = "a b 'c' \"d\" $HOME `x` ;&"
    sweep_file = write_sweep_file(tmp_path / "q.yaml", f"""
        base: {standin}
        overrides:
          model.init_args.dino: {json.dumps(tricky)}
        runs:
          - name: r
            overrides: {{trainer.max_steps: 2, trainer.logger: {{class_path: x, init_args: {{name: "n m"}}}}}}
        slurm:
          command: {json.dumps(shlex.quote(str(fake)) + " --quiet")}
        """)
    sweep = load_sweep(sweep_file)
    script, _, tasks = write_sweep(sweep, tmp_path / "out dir" / "q")
    assert sweep_tool.main([str(sweep_file), "--local", "--no-validate", "--out", str(tmp_path / "out dir" / "q")]) == 0
    calls = [json.loads(ln) for ln in log.read_text().splitlines()]
    assert [c[:2] for c in calls] == [["--quiet", "fit"], ["--quiet", "test"]]
    assert calls[0][2:] == list(tasks[0].args)
    assert calls[1][2:] == [*tasks[0].args, "--ckpt_path", str(tasks[0].run_dir / "checkpoints" / "last.ckpt")]
    assert f"--model.init_args.dino={tricky}" in calls[0]
    assert '--trainer.logger={"class_path": "x", "init_args": {"name": "n m"}}' in calls[0]
    assert (tasks[0].run_dir / "fit.done").exists() and (tasks[0].run_dir / "test.done").exists()
    # A second --local run skips the finished phases (what a requeue after the end of fit would do).
    assert sweep_tool.main([str(sweep_file), "--local", "--no-validate", "--out", str(tmp_path / "out dir" / "q")]) == 0
    assert len(log.read_text().splitlines()) == 2


def test_failed_task_leaves_marker(standin, tmp_path, monkeypatch):
    fake = fake_executable(tmp_path / "gsv3d", FAKE_GSV3D)
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "argv.jsonl"))
    monkeypatch.setenv("FAKE_RC", "3")
    sweep_file = write_sweep_file(tmp_path / "f.yaml", f"base: {standin}\nruns: [{{name: r}}]\n"
                                  f"slurm: {{command: {fake}}}\n")
    assert sweep_tool.main([str(sweep_file), "--local", "--no-validate", "--out", str(tmp_path / "f")]) == 1
    failed = (tmp_path / "f" / "r" / "seed0" / "FAILED").read_text()
    assert "exit 3" in failed and "fit" in failed
    assert not (tmp_path / "f" / "r" / "seed0" / "fit.done").exists()


def test_dry_run_prints_script(standin, tmp_path, capsys):
    sweep_file = ablation_sweep(tmp_path, standin)
    assert sweep_tool.main([str(sweep_file), "--dry-run", "--no-validate", "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert printed == (tmp_path / "o" / "sweep.sbatch").read_text()
    assert printed.startswith("#!/bin/bash") and "#SBATCH --array=0-11%3" in printed


# -------------------------------------------------------------------------------------------------- bad input


def _bad(tmp_path, text):
    return write_sweep_file(tmp_path / "bad.yaml", text)


def test_unknown_overlay_names_line(standin, tmp_path):
    f = _bad(tmp_path, f"""
        base: {standin}
        runs:
          - name: ok
          - name: typo
            overlays:
              - configs/ablations/no_rbg.yaml
        """)
    msg = rf"{re.escape(str(f))}:6: config file 'configs/ablations/no_rbg.yaml' not found"
    with pytest.raises(SweepError, match=msg):
        load_sweep(f, root=REPO)


@pytest.mark.parametrize("text, message", [
    ("base: BASE\nseed: [0, 1]\nruns: [{name: a}]\n", r"bad.yaml:2: unknown key 'seed' .*did you mean 'seeds'"),
    ("base: BASE\nruns: [{name: a}]\nslurm:\n  partition: x\n  gpus_per_nod: 2\n",
     r"bad.yaml:5: unknown key 'gpus_per_nod'.*gpus_per_node"),
    ("base: BASE\nruns:\n  - name: a\n    overlay: [x.yaml]\n",
     r"bad.yaml:4: unknown key 'overlay' in runs\[0\].*overlays"),
    ("base: BASE\nseeds: [0]\nruns: []\n", r"bad.yaml:3: `runs` is empty"),
    ("base: BASE\nruns:\n  - name: a\n    overrides:\n      trainer.devices: 4\n",
     r"bad.yaml:5: `trainer.devices` is set by the sweep.*gpus_per_node"),
    ("base: BASE\nruns: [{name: a}, {name: a}]\n", "duplicate run name 'a'"),
    ("base: BASE\nmax_parallel: 0\nruns: [{name: a}]\n", r"bad.yaml:2: `max_parallel` must be an integer >= 1"),
], ids=["top_level_key", "slurm_key", "run_key", "zero_runs", "managed_key", "duplicate_run", "max_parallel"])
def test_bad_sweep_file_names_line(standin, tmp_path, text, message):
    """Unknown keys (with a suggestion), no runs, keys the sweep sets itself, duplicates, wrong types."""
    f = _bad(tmp_path, text.replace("BASE", str(standin)))
    with pytest.raises(SweepError, match=message):
        load_sweep(f)


def test_typo_in_override_key_names_line(standin, tmp_path):
    """A typo in a config key is caught by composing the run's config with the CLI parser (no instantiation)."""
    f = _bad(tmp_path, f"""
        base: {standin}
        overrides:
          trainer.max_steps: 5
        runs:
          - name: good
            overrides: {{model.init_args.lambda_rgb: 0.5}}
          - name: bad
            overlays: [{REPO}/configs/ablations/n4.yaml]
            overrides:
              data.init_args.num_input_views: 3
              model.init_args.lamda_rgb: 0.0
        """)
    sweep = load_sweep(f)
    with pytest.raises(SweepError, match=r"bad.yaml:11: run 'bad': override `model.init_args.lamda_rgb: 0.0`"):
        validate_configs(sweep)


def test_bad_overlay_content_is_reported(standin, tmp_path):
    overlay = tmp_path / "broken.yaml"
    overlay.write_text("model:\n  init_args:\n    lambda_rbg: 0.0\n")
    f = _bad(tmp_path, f"base: {standin}\nruns:\n  - name: ok\n  - name: broken\n    overlays: [{overlay}]\n")
    with pytest.raises(SweepError, match=r"bad.yaml:4: run 'broken': composing its config files failed"):
        validate_configs(load_sweep(f))


def test_cli_bad_input_writes_and_submits_nothing(standin, tmp_path, capsys, monkeypatch):
    """Fails before anything is written or submitted: sbatch is a trap that records being called."""
    fake_executable(tmp_path / "bin" / "sbatch", f"#!/bin/sh\ntouch {tmp_path}/SUBMITTED\n", monkeypatch)
    f = _bad(tmp_path, f"base: {standin}\nruns:\n  - name: a\n    overrides: {{model.init_args.lamda_rgb: 0}}\n")
    assert sweep_tool.main([str(f), "--submit", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml:4" in err and "lamda_rgb" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "SUBMITTED").exists()


def test_submit_reports_job_id(standin, tmp_path, capsys, monkeypatch):
    fake_executable(tmp_path / "bin" / "sbatch", f'#!/bin/sh\necho "$@" > {tmp_path}/sbatch_args\necho "4242;cluster"\n',
                    monkeypatch)
    f = ablation_sweep(tmp_path, standin)
    assert sweep_tool.main([str(f), "--submit", "--out", str(tmp_path / "o")]) == 0  # validates all 6 runs too
    assert capsys.readouterr().out.strip() == "4242"
    assert (tmp_path / "sbatch_args").read_text().split() == ["--parsable", str(tmp_path / "o" / "sweep.sbatch")]


# ---------------------------------------------------------------------------------- the repo's sweep files


@pytest.mark.parametrize("name", ["ablations", "ablations_tiny"])
def test_repo_sweep_files(name):
    path = REPO / "configs" / "sweeps" / f"{name}.yaml"
    try:
        sweep = load_sweep(path, root=REPO)
    except SweepError as e:
        if "not found" in str(e) and "configs/decoder/" in str(e):
            pytest.skip(f"stage config not written yet: {e}")
        raise
    assert [r.label for r in sweep.runs] == ["w/o RGB loss", "w/o Depth loss", "N = 8", "N = 4",
                                             "w/o DINO encoder", "Full Model"]
    overlays = {p.name for r in sweep.runs for st in sweep.stages for p in r.overlays_for(st.name)}
    # chained (the paper's protocol, tests/test_sweep_chain.py): the stage-2 variants of the L_3D ablations
    stage2 = {"no_rgb": "distill_no_rgb", "no_depth": "distill_no_depth"} if sweep.chained else {}
    assert overlays >= {f"{stage2.get(n, n)}.yaml" for n in ABLATIONS}
    validate_configs(sweep)  # every run (of every stage) composes with the real stage classes


def test_paths_interpolated_from_the_config_root_follow_each_task(standin, tmp_path):
    """`dirpath: ${....default_root_dir}/checkpoints` is resolved inside the config file (omegaconf), before the
    sweep's --trainer.default_root_dir: the sweep moves such paths into each task's folder, or all tasks would
    share one checkpoint folder."""
    base = tmp_path / "interp.yaml"
    base.write_text(standin.read_text().replace("trainer:\n", "trainer:\n  default_root_dir: runs/shared\n").replace(
        "init_args: {save_last: true}", 'init_args: {save_last: true, dirpath: "${....default_root_dir}/ckpts"}'
    ).replace("logger: false", 'logger:\n    - class_path: lightning.pytorch.loggers.CSVLogger\n'
                                '      init_args: {save_dir: "${....default_root_dir}", name: csv}'))
    sweep = load_sweep(write_sweep_file(tmp_path / "i.yaml", f"base: {base}\nseeds: [0, 1]\nruns: [{{name: a}}]\n"))
    assert parse_config(["--config", str(base)]).trainer.callbacks[0].init_args.dirpath == "runs/shared/ckpts"
    rerooted = validate_configs(sweep)
    assert set(rerooted["a"]) == {"trainer.callbacks", "trainer.logger"}
    for task in expand_tasks(sweep, tmp_path / "out", rerooted):
        cfg = parse_config(task.args)
        assert cfg.trainer.callbacks[0].init_args.dirpath == f"{task.run_dir}/ckpts"
        assert cfg.trainer.logger[0].init_args.save_dir == str(task.run_dir)
        assert cfg.trainer.callbacks[0].init_args.save_last is True  # the rest of the callback is unchanged


# ----------------------------------------------------------------------------------------- --local, for real


@pytest.mark.slow  # two CLI processes (fit, test): ~10 s on an idle laptop
def test_local_sweep_end_to_end(standin, tmp_path, monkeypatch):
    """`gsv3d sweep --local` with the stand-in stage: fit, then test on the last checkpoint, into the run folder."""
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    f = write_sweep_file(tmp_path / "loc.yaml", f"""
        base: {standin}
        overrides: {{trainer.max_steps: 3}}
        runs:
          - name: no_rgb
            overlays: [{REPO}/configs/ablations/no_rgb.yaml]
        """)
    out = tmp_path / "loc"
    assert sweep_tool.main([str(f), "--local", "--out", str(out)]) == 0
    run_dir = out / "no_rgb" / "seed0"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["meta"]["w"] == 3.0  # the test phase loaded the final (3-step) weights
    assert metrics["psnr"]["value"] == pytest.approx(20.0 + 0.0 + 0.5 + 0.6 + 1.0, abs=0.11)  # lambda_rgb = 0
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_requeue_signal_switch(standin, tmp_path):
    f = write_sweep_file(tmp_path / "s.yaml", f"base: {standin}\nruns: [{{name: a}}]\n"
                         "slurm: {signal: SIGHUP, signal_seconds: 300}\n")
    sweep = load_sweep(f)
    assert "#SBATCH --signal=SIGHUP@300\n" in render_sbatch(sweep, expand_tasks(sweep, tmp_path), tmp_path)
    f = write_sweep_file(tmp_path / "s.yaml", f"base: {standin}\nruns: [{{name: a}}]\nslurm:\n  signal: B:USR1\n")
    with pytest.raises(SweepError, match=r"s.yaml:4: `slurm.signal` must be a signal name"):
        load_sweep(f)


def test_local_runner_calls_the_gsv3d_of_its_own_environment(tmp_path, monkeypatch):
    """`.venv/bin/gsv3d sweep --local` with the venv not activated (as `make paper-tiny` runs it): the scripts'
    `gsv3d` must resolve to the running environment's, not fail with exit 127 or pick another install."""
    from gsv3d_pl.sweep.local import _env, _run_task

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    found = tmp_path / "which.txt"
    monkeypatch.setenv("WHICH_OUT", str(found))
    script = tmp_path / "task.sh"
    script.write_text('command -v gsv3d > "$WHICH_OUT"\n')
    assert _run_task(script, 0, _env()) == 0
    assert found.read_text().strip() == os.path.join(os.path.dirname(sys.executable), "gsv3d")
    assert "/usr/bin" in _env()["PATH"].split(os.pathsep)  # the rest of PATH is kept
    monkeypatch.setattr("sysconfig.get_path", lambda name: str(tmp_path))  # a scripts folder without gsv3d
    assert _env()["PATH"] == "/usr/bin:/bin"  # is not put ahead of the user's PATH
