"""On a real single-node SLURM cluster (scripts/slurm_local.sh: Debian's slurm-wlm + munge, started here and
stopped at the end, also on failure): `gsv3d sweep --submit`, requeue on SIGUSR1 with resume from Lightning's
HPC checkpoint, a chained sweep's dependent array jobs (aftercorr) through a requeue, then `gsv3d report` on the
tiny ablation sweep."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_sweep import REPO, make_standin, write_sweep_file

pytestmark = pytest.mark.slurm

SCRIPT = REPO / "scripts" / "slurm_local.sh"
BIN = Path(sys.executable).parent
HAVE_SLURM = all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in ("slurmctld", "slurmd", "munged", "sbatch"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A private cluster (own state dir, ports, munge key); yields the environment for its clients and jobs."""
    if not HAVE_SLURM:
        pytest.skip("needs Debian's slurm-wlm and munge: apt-get install -y slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster runs as root (SlurmUser=root)")
    state = tmp_path_factory.mktemp("slurm")
    env = {
        **os.environ,
        "SLURM_LOCAL_DIR": str(state),
        "SLURM_LOCAL_CTLD_PORT": str(_free_port()),
        "SLURM_LOCAL_SLURMD_PORT": str(_free_port()),
    }
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_") or k.startswith("SLURM_LOCAL_")}
    env["SLURM_CONF"] = str(state / "etc" / "slurm.conf")
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"  # jobs inherit the submitter's env: `gsv3d` is the venv's
    try:
        subprocess.run(["bash", str(SCRIPT), "start"], env=env, check=True, timeout=120)
        yield env
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, check=False, timeout=120)


def _sh(args: list[str], env: dict, **kw) -> str:
    return subprocess.run(args, env=env, check=True, capture_output=True, text=True, **kw).stdout


def _wait_job(job: str, env: dict, timeout: float, log_dir: Path) -> None:
    """Until no task of array ``job`` is pending/running; fails with the task logs on timeout."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not _sh(["squeue", "-h", "-j", job, "-o", "%i %T"], env).strip():
            return
        time.sleep(2)
    logs = "\n".join(f"== {p}\n{p.read_text()[-3000:]}" for p in sorted(log_dir.glob("*.out")))
    subprocess.run(["scancel", job], env=env, check=False)
    pytest.fail(f"array job {job} not finished after {timeout:.0f}s:\n{_sh(['squeue'], env)}\n{logs}")


def _jobcomp(env: dict) -> list[dict[str, str]]:
    path = Path(env["SLURM_LOCAL_DIR"]) / "log" / "jobcomp.log"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        rows.append(dict(kv.split("=", 1) for kv in line.split() if "=" in kv))
    return rows


def _submit(sweep_file: Path, out: Path, env: dict) -> str:
    proc = subprocess.run([str(BIN / "gsv3d"), "sweep", str(sweep_file), "--submit", "--out", str(out)], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip()
    assert job.isdigit(), proc.stdout
    return job


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_requeue_resumes_from_hpc_checkpoint(cluster, tmp_path):
    """SIGUSR1 to the running steps -> Lightning saves hpc_ckpt_1.ckpt and requeues; the task restarts in the same
    folder, resumes there and finishes at max_steps. The stand-in's weight counts applied steps: w == max_steps
    means no step was applied twice and none was lost."""
    max_steps = 20  # ~14 s of 0.7 s steps: room for a slow scancel on a loaded machine to land mid-run
    standin_dir = tmp_path / "standin"
    base = make_standin(standin_dir, max_steps=max_steps, step_sleep=0.7)
    env = {**cluster, "PYTHONPATH": os.pathsep.join([str(standin_dir), str(REPO)])}
    sweep_file = write_sweep_file(tmp_path / "rq.yaml", f"""
        name: requeue
        base: {base}
        runs:
          - name: full
            overlays: [{REPO}/configs/ablations/full.yaml]
        slurm: {{partition: debug, cpus_per_task: 1, time: "00:20:00"}}
        """)
    out = tmp_path / "requeue"
    job = _submit(sweep_file, out, env)
    run_dir = out / "full" / "seed0"
    steps_log = run_dir / "steps.log"

    end = time.monotonic() + 240
    while time.monotonic() < end and (not steps_log.exists() or len(steps_log.read_text().split("\n")) < 4):
        time.sleep(0.5)
    assert steps_log.exists(), f"training never started: {[p.read_text() for p in (out / 'slurm').glob('*')]}"
    # To the job steps (the srun'd Lightning process), as #SBATCH --signal=SIGUSR1@120 does near the time limit.
    _sh(["scancel", "--signal=USR1", f"{job}_0"], env)
    _wait_job(job, env, 600, out / "slurm")

    log = (out / "slurm").glob("*.out")
    log_text = "\n".join(p.read_text() for p in log)
    assert "(restart 1)" in log_text, log_text[-3000:]
    hpc = _ckpt(run_dir / "hpc_ckpt_1.ckpt")
    resumed_at = hpc["global_step"]
    assert 0 < resumed_at < max_steps
    assert not (run_dir / "hpc_ckpt_2.ckpt").exists()

    rows = [tuple(map(int, ln.split())) for ln in steps_log.read_text().splitlines()]
    first = [s for s, r in rows if r == 0]
    second = [s for s, r in rows if r == 1]
    assert first == list(range(len(first))) and len(first) >= resumed_at  # trained up to (or just past) the save
    assert second == list(range(resumed_at, max_steps))  # resumed exactly at the checkpoint, no gap, no repeat
    assert len(first) - resumed_at <= 2  # at most the step in flight when SIGUSR1/SIGTERM came was redone

    last = _ckpt(run_dir / "checkpoints" / "last.ckpt")
    assert last["global_step"] == max_steps
    assert float(last["state_dict"]["w"]) == float(max_steps)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["meta"]["w"] == float(max_steps)  # the test phase evaluated the final weights
    assert Path(metrics["meta"]["ckpt_path"]) == run_dir / "checkpoints" / "last.ckpt"
    states = [r["JobState"] for r in _jobcomp(env) if r.get("ArrayJobId") == job]
    assert states and states[-1] == "COMPLETED", states


# Stage 2 of the stand-in chain: it must find stage 1's checkpoint at start-up (as DistillStage does) and records
# the weight it read there, so the test sees the hand-off through the run folder.
CHAIN_STAGE2_SRC = '''
import json, os
import torch
from sweep_standin import Counter

from gsv3d_pl.io import write_json_atomic


class Stage2(Counter):
    def __init__(self, decoder_ckpt: str, decoder: torch.nn.Module | None = None, lambda_rgb: float = 1.0,
                 lambda_depth: float = 1.0, dino: str | None = "tiny", step_sleep: float = 0.0, lr: float = 1.0):
        if not os.path.isfile(decoder_ckpt):
            raise FileNotFoundError(f"stage 1 checkpoint {decoder_ckpt} not found")
        super().__init__(decoder, lambda_rgb, lambda_depth, dino, step_sleep, lr)
        self.upstream_w = float(torch.load(decoder_ckpt, map_location="cpu", weights_only=True)["state_dict"]["w"])

    def on_test_epoch_end(self):
        super().on_test_epoch_end()
        path = os.path.join(self.trainer.default_root_dir, "metrics.json")
        data = json.load(open(path))
        data["meta"]["upstream_w"] = self.upstream_w
        write_json_atomic(path, data)
'''


def _wait_lines(path: Path, n: int, timeout: float, log_dir: Path) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and (not path.exists() or len(path.read_text().splitlines()) < n):
        time.sleep(0.5)
    assert path.exists(), [p.read_text()[-2000:] for p in log_dir.glob("*")]


def test_chain_aftercorr_and_requeue(cluster, tmp_path):
    """A 2-row chained sweep of stand-in stages: two array jobs, stage 2 submitted with --dependency=aftercorr.
    SIGUSR1 to a stage-1 task (which has a dependent) and later to a stage-2 task: each is requeued and resumes
    from its own hpc_ckpt in its stage folder; every stage-2 task started after its own stage-1 task completed
    (after the requeue) and read that task's final checkpoint; `gsv3d report` prints both rows from stage 2."""
    dec_steps, max_steps = 12, 20  # 0.7 s steps: room for a signal to land mid-run in both stages
    standin_dir = tmp_path / "standin"
    base = make_standin(standin_dir, max_steps=max_steps, step_sleep=0.7)
    (standin_dir / "chain_stage2.py").write_text(CHAIN_STAGE2_SRC)
    stage2 = standin_dir / "stage2.yaml"
    stage2.write_text(base.read_text().replace("sweep_standin.Counter", "chain_stage2.Stage2"))
    env = {**cluster, "PYTHONPATH": os.pathsep.join([str(standin_dir), str(REPO)])}
    sweep_file = write_sweep_file(tmp_path / "chain.yaml", f"""
        name: chain
        dedupe: false             # both rows train their (identical) decoder: task k of distill after task k
        stages:
          - name: decoder
            base: {base}
            overrides: {{trainer.max_steps: {dec_steps}}}
          - name: distill
            base: {stage2}
            overrides: {{model.init_args.decoder_ckpt: "{{run_dir}}/decoder/checkpoints/last.ckpt"}}
        runs:
          - name: no_rgb
            overlays: {{distill: [{REPO}/configs/ablations/distill_no_rgb.yaml]}}
          - name: full
        slurm: {{partition: debug, cpus_per_task: 1, time: "00:20:00"}}
        """)
    out = tmp_path / "chain"
    proc = subprocess.run([str(BIN / "gsv3d"), "sweep", str(sweep_file), "--submit", "--out", str(out)], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    jobs = proc.stdout.split()
    assert len(jobs) == 2 and all(j.isdigit() for j in jobs), proc.stdout
    deps = _sh(["scontrol", "show", "job", jobs[1]], env)
    assert f"Dependency=aftercorr:{jobs[0]}" in deps, deps  # stage 1 takes > 8 s: stage 2 is still waiting

    task0 = out / "no_rgb" / "seed0"
    _wait_lines(task0 / "decoder" / "steps.log", 3, 300, out / "slurm")
    _sh(["scancel", "--signal=USR1", f"{jobs[0]}_0"], env)  # requeue an upstream task: its dependent must wait
    _wait_lines(task0 / "distill" / "steps.log", 4, 600, out / "slurm")
    _sh(["scancel", "--signal=USR1", f"{jobs[1]}_0"], env)
    for job in jobs:
        _wait_job(job, env, 600, out / "slurm")

    proc = subprocess.run([str(BIN / "gsv3d"), "report", str(out), "--strict"], env=env, capture_output=True,
                          text=True, timeout=120)
    logs = "\n".join(p.read_text()[-2000:] for p in (out / "slurm").glob("*.out"))
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.strip().strip("|").split("|")[1:]]
            for ln in proc.stdout.splitlines() if ln.startswith("| ")}
    assert 0.0 < float(rows["w/o RGB loss"][0]) < float(rows["Full Model"][0])  # lambda_rgb 0 lowers the stand-in
    assert "stage distill" in proc.stdout

    comp = {(r["ArrayJobId"], r.get("ArrayTaskId")): r for r in _jobcomp(env) if r.get("ArrayJobId") in jobs}
    for k, run in enumerate(("no_rgb", "full")):
        task = out / run / "seed0"
        up, down = comp[(jobs[0], str(k))], comp[(jobs[1], str(k))]  # the last record: after any requeue
        assert up["JobState"] == down["JobState"] == "COMPLETED"
        assert down["StartTime"] >= up["EndTime"], (up, down)  # aftercorr: task k after task k
        assert float(_ckpt(task / "decoder" / "checkpoints" / "last.ckpt")["state_dict"]["w"]) == dec_steps
        metrics = json.loads((task / "distill" / "metrics.json").read_text())
        assert metrics["meta"]["upstream_w"] == float(dec_steps)  # read this task's final stage-1 checkpoint
        assert metrics["meta"]["w"] == float(max_steps)  # no step lost or applied twice across the requeue
    for stage in ("decoder", "distill"):  # each stage requeued and resumed in its own folder
        assert (task0 / stage / "hpc_ckpt_1.ckpt").is_file()
        restarts = [int(ln.split()[1]) for ln in (task0 / stage / "steps.log").read_text().splitlines()]
        assert restarts[0] == 0 and restarts[-1] == 1, stage
        assert "(restart 1)" in "\n".join(p.read_text() for p in (out / "slurm").glob(f"{stage}_*_0.out"))


def test_chain_shared_decoder_on_slurm(cluster, tmp_path):
    """w/o RGB changes only stage 2, so its decoder is Full's (identical resolved config): it is left out of the
    decoder array, and w/o RGB's distill is its own array job with --dependency=afterok:<decoder job>_<Full's task>.
    SIGUSR1 requeues Full's decoder while both distill tasks wait: neither is cancelled, both start after it
    completed (after the requeue) and read its final checkpoint; the report names the shared stage."""
    dec_steps = 12
    standin_dir = tmp_path / "standin"
    base = make_standin(standin_dir, max_steps=20, step_sleep=0.7)
    (standin_dir / "chain_stage2.py").write_text(CHAIN_STAGE2_SRC)
    stage2 = standin_dir / "stage2.yaml"
    stage2.write_text(base.read_text().replace("sweep_standin.Counter", "chain_stage2.Stage2"))
    env = {**cluster, "PYTHONPATH": os.pathsep.join([str(standin_dir), str(REPO)])}
    sweep_file = write_sweep_file(tmp_path / "shared.yaml", f"""
        name: shared
        stages:
          - name: decoder
            base: {base}
            overrides: {{trainer.max_steps: {dec_steps}}}
            test: false
          - name: distill
            base: {stage2}
            overrides:
              model.init_args.decoder_ckpt: "{{run_dir}}/decoder/checkpoints/last.ckpt"
              trainer.max_steps: 3
              model.init_args.step_sleep: 0.0
        runs:
          - name: no_rgb
            overlays: {{distill: [{REPO}/configs/ablations/distill_no_rgb.yaml]}}
          - name: full
            overlays: {{decoder: [{REPO}/configs/ablations/full.yaml]}}
        slurm: {{partition: debug, cpus_per_task: 1, time: "00:20:00"}}
        """)
    out = tmp_path / "shared"
    proc = subprocess.run([str(BIN / "gsv3d"), "sweep", str(sweep_file), "--submit", "--out", str(out)], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "no_rgb/decoder = full/decoder (identical resolved config; seed 0)" in proc.stderr
    jobs = proc.stdout.split()
    assert len(jobs) == 3 and all(j.isdigit() for j in jobs), proc.stdout  # decoder [1]; distill [1]; distill [0]
    dec_job, full_dis, rgb_dis = jobs
    assert f"Dependency=afterok:{dec_job}_1" in _sh(["scontrol", "show", "job", rgb_dis], env)
    assert f"Dependency=aftercorr:{dec_job}" in _sh(["scontrol", "show", "job", full_dis], env)

    full = out / "full" / "seed0"
    _wait_lines(full / "decoder" / "steps.log", 3, 300, out / "slurm")
    _sh(["scancel", "--signal=USR1", f"{dec_job}_1"], env)  # requeue the shared decoder: its dependents wait
    for job in jobs:
        _wait_job(job, env, 600, out / "slurm")

    proc = subprocess.run([str(BIN / "gsv3d"), "report", str(out), "--strict"], env=env, capture_output=True,
                          text=True, timeout=120)
    logs = "\n".join(p.read_text()[-2000:] for p in (out / "slurm").glob("*.out"))
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs
    assert "w/o RGB loss/decoder = Full Model/decoder (identical resolved config; seed 0)" in proc.stdout
    comp = {(r["ArrayJobId"], r.get("ArrayTaskId")): r for r in _jobcomp(env) if r.get("ArrayJobId") in jobs}
    up = comp[(dec_job, "1")]  # the last record: after the requeue
    assert (dec_job, "0") not in comp  # w/o RGB's decoder never ran
    for down in (comp[(full_dis, "1")], comp[(rgb_dis, "0")]):
        assert up["JobState"] == down["JobState"] == "COMPLETED"
        assert down["StartTime"] >= up["EndTime"], (up, down)
    assert (full / "decoder" / "hpc_ckpt_1.ckpt").is_file()  # the requeue happened
    assert not (out / "no_rgb" / "seed0" / "decoder").exists()
    for run in ("no_rgb", "full"):
        metrics = json.loads((out / run / "seed0" / "distill" / "metrics.json").read_text())
        assert metrics["meta"]["upstream_w"] == float(dec_steps)  # Full's final decoder, after the requeue


@pytest.mark.slow
def test_ablations_tiny_sweep_end_to_end(cluster, tmp_path):
    """configs/sweeps/ablations_tiny.yaml cut to 2 rows (w/o RGB loss, Full) and fewer steps, submitted to the
    cluster (decoder -> distill chains, two array jobs, the real tiny models). SIGUSR1 reaches row 0's decoder
    while it trains: it is requeued, resumes from its hpc_ckpt and finishes; its distill task starts only after
    that. Both rows of the report have numbers from the end-to-end test of their distill stage, and Full's test
    also scored the undistilled pipeline (Table 1). The 6-row sweep is `make paper-tiny`."""
    import yaml

    sweep = yaml.safe_load((REPO / "configs" / "sweeps" / "ablations_tiny.yaml").read_text())
    sweep["runs"] = [r for r in sweep["runs"] if r["name"] in ("no_rgb", "full")]
    sweep["dedupe"] = False  # row 0 trains its own decoder (Full's, identical): the one SIGUSR1 reaches below
    steps = {"decoder": 80, "distill": 6}  # ~0.3 s decoder steps: a window of ~20 s for the signal
    for stage in sweep["stages"]:
        stage["overrides"].update({"trainer.max_steps": steps[stage["name"]],
                                   "trainer.val_check_interval": steps[stage["name"]]})
    sweep["overrides"]["data.init_args.toy_objects"] = 16
    sweep["overrides"]["data.init_args.cache_dir"] = str(tmp_path / "toy_cache")
    sweep_file = tmp_path / "ablations_tiny2.yaml"
    sweep_file.write_text(yaml.safe_dump(sweep, sort_keys=False))
    env = {**cluster, "PYTHONPATH": str(REPO)}
    out = tmp_path / "ablations_tiny"
    proc = subprocess.run([str(BIN / "gsv3d"), "sweep", str(sweep_file), "--submit", "--out", str(out)], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    jobs = proc.stdout.split()
    assert len(jobs) == 2 and all(j.isdigit() for j in jobs), proc.stdout
    # The TensorBoard event file is written at the start of fit, just before Lightning installs its SIGUSR1
    # handler; 2 s later the decoder is in its sanity check or training steps.
    dec0 = out / "no_rgb" / "seed0" / "decoder"
    end = time.monotonic() + 600
    while time.monotonic() < end and not list(dec0.glob("tb/*/events.out.tfevents.*")):
        time.sleep(0.2)
    assert list(dec0.glob("tb/*/events.out.tfevents.*")), [p.read_text()[-2000:] for p in (out / "slurm").glob("*")]
    time.sleep(2.0)
    _sh(["scancel", "--signal=USR1", f"{jobs[0]}_0"], env)
    for job in jobs:
        _wait_job(job, env, float(os.environ.get("GSV3D_SLURM_SWEEP_TIMEOUT", 1800)), out / "slurm")

    proc = subprocess.run([str(BIN / "gsv3d"), "report", str(out), "--strict"], env=env, capture_output=True,
                          text=True, timeout=120)
    logs = "\n".join(p.read_text()[-2000:] for p in (out / "slurm").glob("*.out"))
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs
    table = proc.stdout.split("Paired comparison")[0]  # the main table (the paired one follows it)
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.strip().strip("|").split("|")[1:]]
            for ln in table.splitlines() if ln.startswith("| ") and "Method" not in ln and "(paper)" not in ln
            and "(no model)" not in ln}
    assert list(rows) == ["w/o RGB loss", "Full Model"], proc.stdout
    assert "| copy the input image (no model)" in table and "| mean training image (no model)" in table
    for label, cells in rows.items():
        psnr = float(cells[0])  # one seed: a plain number
        assert 0.0 < psnr < 100.0, (label, cells)
    for run in ("no_rgb", "full"):
        run_dir = out / run / "seed0"
        assert (run_dir / "decoder" / "fit.done").exists() and not (run_dir / "decoder" / "test.done").exists()
        assert (run_dir / "distill" / "fit.done").exists() and (run_dir / "distill" / "test.done").exists()
        assert _ckpt(run_dir / "decoder" / "checkpoints" / "last.ckpt")["global_step"] == steps["decoder"]
        assert _ckpt(run_dir / "distill" / "checkpoints" / "last.ckpt")["global_step"] == steps["distill"]
    # the requeued decoder resumed in its own folder, and its distill task waited for the run after the requeue
    assert (dec0 / "hpc_ckpt_1.ckpt").is_file()
    assert "(restart 1)" in "\n".join(p.read_text() for p in (out / "slurm").glob("decoder_*_0.out"))
    comp = {(r["ArrayJobId"], r.get("ArrayTaskId")): r for r in _jobcomp(env) if r.get("ArrayJobId") in jobs}
    up, down = comp[(jobs[0], "0")], comp[(jobs[1], "0")]  # the last records: after the requeue
    assert up["JobState"] == down["JobState"] == "COMPLETED" and down["StartTime"] >= up["EndTime"], (up, down)
    variants = json.loads((out / "full" / "seed0" / "distill" / "metrics.json").read_text())["variants"]
    assert set(variants) == {"undistilled", "distilled"}  # Full is Table 1's two rows of ours too
