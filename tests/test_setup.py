"""The installation itself: the pieces the rest relies on are real and complete."""

import subprocess
import sys

import pytest


def test_fastdtw_uses_c_extension():
    import fastdtw
    import fastdtw._fastdtw as cext

    assert fastdtw.fastdtw is cext.fastdtw, "fastdtw resolves to the pure-Python implementation"


@pytest.mark.parametrize("tool", ["sumo", "netconvert", "netgenerate"])
def test_sumo_binaries_present(tool):
    from reled_hpc.sim.sumo_tools import binary

    out = subprocess.run([str(binary(tool)), "--version"], capture_output=True, text=True, check=True)
    assert "Eclipse SUMO" in out.stdout


def test_missing_sumo_binary_is_a_clear_error():
    from reled_hpc.errors import SetupError
    from reled_hpc.sim.sumo_tools import binary

    with pytest.raises(SetupError, match="no-such-tool"):
        binary("no-such-tool")


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["map", "--help"],
        ["map", "build", "--help"],
        ["map", "info", "--help"],
        ["run-policy", "--help"],
        ["demo", "--help"],
    ],
)
def test_cli_help(cli, args):
    res = cli(*args)
    assert res.returncode == 0, res.stderr
    assert "usage: reled-hpc" in res.stdout


def test_bench_module_help():
    res = subprocess.run([sys.executable, "-m", "reled_hpc.bench", "env", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--agents" in res.stdout


def test_env_benchmark_prints_one_json_object():
    """The benchmark runs and reports its fields (figures are read by people, not asserted)."""
    import json

    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "reled_hpc.bench",
            "env",
            "--map",
            "grid",
            "--agents",
            "10",
            "--steps",
            "60",
            "--repeats",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for key in (
        "agents",
        "sim_steps",
        "decisions",
        "decisions_per_s",
        "sim_steps_per_s",
        "raw_sumo_steps_per_s",
        "overhead_ratio",
        "peak_rss_mb",
        "sumo_step_ratio",
        "sumo_step_ratio_interleaved",
    ):
        assert key in out
    assert out["agents"] == 10 and out["sim_steps"] == 60 and out["raw_sim_steps"] == 60
    # the step timer sees SUMO's steps in both runs; the controlled run also spends time around them
    assert 0 < out["controlled_sumo_step_s"] < out["controlled_wall_s"] and out["controlled_python_s"] > 0
    assert 0 < out["raw_sumo_step_s"] <= out["raw_wall_s"]
    assert len(out["interleaved_python_ms_per_step"]) == 1 and out["interleaved_python_ms_per_step"][0] > 0
    # with one round the paired ratio is that round's, the same as the ratio of the (only) minima
    assert out["overhead_ratio_paired_all"] == [out["overhead_ratio_paired_median"]]
    assert out["overhead_ratio_paired_median"] == pytest.approx(out["overhead_ratio"], abs=2e-3)


@pytest.mark.parametrize("side", ["controlled", "raw"])
def test_env_benchmark_runs_one_side_alone(side):
    """--only runs one side (for a profiler attached to the process) and reports it without ratios."""
    import json

    cmd = [sys.executable, "-m", "reled_hpc.bench", "env", "--map", "grid", "--agents", "10", "--steps", "60"]
    cmd += ["--repeats", "2", "--only", side, "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["only"] == side and out["sim_steps"] == 60 and len(out["wall_s_all"]) == 2
    assert 0 < out["sumo_step_s"] <= out["wall_s"] == min(out["wall_s_all"])
    assert "overhead_ratio" not in out
