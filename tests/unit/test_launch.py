"""SLURM launcher: shard ranges, sbatch parameters per stage kind, requeue callables (no SLURM needed)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from pipeline import launch, slurm
from pipeline.config import load_config
from pipeline.errors import ConfigError
from training import launch as train_launch

SAMPLE = [
    "run.name=cc3m",
    "launcher.kind=slurm",
    "launcher.slurm.partition=gpu",
    "launcher.slurm.cpu_partition=cpu",
    "launcher.slurm.account=proj42",
    "launcher.slurm.time_min=2880",
    "launcher.slurm.stage_time_min=120",
    "launcher.slurm.nodes=2",
    "launcher.slurm.gpus_per_node=4",
    "launcher.slurm.cpus_per_task=6",
    "launcher.slurm.mem_gb=120",
    "launcher.slurm.array_parallelism=16",
    "launcher.slurm.extra_sbatch=['--exclusive', '#SBATCH --mail-type=END']",
    "launcher.slurm.setup=['source /opt/venv/bin/activate']",
]


def sample_cfg(tmp_path: Path, *extra: str):
    return load_config(None, [f"run.root={tmp_path / 'runs'}", *SAMPLE, *extra])


def fake_slurm_bin(tmp_path: Path, monkeypatch) -> Path:
    """``srun``/``sbatch`` stand-ins so that submitit's SlurmExecutor can be built here."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("srun", "sbatch"):
        (bin_dir / name).write_text("#!/bin/bash\necho 'Submitted batch job 1'\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return bin_dir


# --------------------------------------------------------------------------- shard ranges


@pytest.mark.parametrize(
    "indices, per_job, expected",
    [
        ([0, 1, 2, 3, 4, 5], 2, [(0, 2), (2, 4), (4, 6)]),
        ([0, 1, 2, 3, 4], 2, [(0, 2), (2, 4), (4, 5)]),
        ([0, 5], 2, [(0, 6)]),
        ([1, 2, 4, 7, 8], 2, [(1, 3), (4, 8), (8, 9)]),
        ([], 16, []),
    ],
)
def test_split_ranges(indices, per_job, expected):
    assert launch.split_ranges(indices, per_job) == expected


def test_split_ranges_cover_each_unfinished_shard_exactly_once():
    rng = random.Random(0)
    for _ in range(50):
        todo = sorted(rng.sample(range(200), rng.randint(1, 120)))
        per = rng.randint(1, 20)
        ranges = launch.split_ranges(todo, per)
        covered = [i for lo, hi in ranges for i in range(lo, hi) if i in set(todo)]
        assert covered == todo
        assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        assert all(sum(lo <= i < hi for i in todo) <= per for lo, hi in ranges)


# --------------------------------------------------------------------------- parameters


def test_extra_sbatch_parsing():
    parsed = slurm.parse_extra_sbatch(["--exclusive", "#SBATCH --mail-type=END", " --gpus-per-node=2 "])
    assert parsed == {"exclusive": True, "mail_type": "END", "gpus_per_node": "2"}
    with pytest.raises(ConfigError, match="launcher.slurm.extra_sbatch: 'qos high'"):
        slurm.parse_extra_sbatch(["qos high"])


def test_executor_parameters_per_stage_kind(tmp_path):
    cfg = sample_cfg(tmp_path)
    prep = slurm.executor_parameters(cfg, "prep")
    assert "gpus_per_node" not in prep  # CPU-only array
    assert prep["slurm_partition"] == "cpu" and prep["timeout_min"] == 120
    assert (prep["nodes"], prep["tasks_per_node"]) == (1, 1)
    for stage in ("embed", "assign", "cluster", "ensemble"):
        p = slurm.executor_parameters(cfg, stage)
        assert (p["nodes"], p["tasks_per_node"], p["gpus_per_node"]) == (1, 1, 1), stage
        assert p["slurm_partition"] == "gpu" and p["timeout_min"] == 120
    train = slurm.executor_parameters(cfg, "train")
    assert (train["nodes"], train["tasks_per_node"], train["gpus_per_node"]) == (2, 4, 4)
    assert train["timeout_min"] == 2880 and train["mem_gb"] == 120 and train["cpus_per_task"] == 6
    assert train["slurm_account"] == "proj42" and train["slurm_array_parallelism"] == 16
    assert train["slurm_additional_parameters"] == {"exclusive": True, "mail_type": "END"}
    assert train["slurm_setup"] == ["source /opt/venv/bin/activate"]
    with pytest.raises(slurm.StageError, match="unknown stage 'trian'"):
        slurm.executor_parameters(cfg, "trian")


def test_unset_options_are_left_out(tmp_path):
    p = slurm.executor_parameters(load_config(None, [f"run.root={tmp_path}"]), "embed")
    assert not {
        "mem_gb",
        "slurm_partition",
        "slurm_account",
        "slurm_qos",
        "slurm_additional_parameters",
    } & set(p)


def test_slurm_executor_parameters_and_script(tmp_path, monkeypatch):
    fake_slurm_bin(tmp_path, monkeypatch)
    cfg = sample_cfg(tmp_path)
    ex = slurm.make_executor(cfg, "train", dependency="afterok:77")
    assert ex.cluster == "slurm"
    params = ex._executor.parameters
    assert params["nodes"] == 2 and params["ntasks_per_node"] == 4 and params["gpus_per_node"] == 4
    assert params["time"] == 2880 and params["mem"] == "120GB" and params["partition"] == "gpu"
    assert params["additional_parameters"]["dependency"] == "afterok:77"
    assert ex._executor.max_num_timeout == cfg.launcher.slurm.max_requeue
    real = ex._executor._make_submission_file_text(ex._executor._submitit_command_str, "x")
    # the dry-run rendering is what would really be submitted
    assert real == slurm.render_sbatch(cfg, "train", dependency="afterok:77")
    for line in [
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --cpus-per-task=6",
        "#SBATCH --time=2880",
        "#SBATCH --account=proj42",
        "#SBATCH --dependency=afterok:77",
        "#SBATCH --exclusive",
        "#SBATCH --mail-type=END",
        "#SBATCH --job-name=cc3m-train",
        "source /opt/venv/bin/activate",
    ]:
        assert line in real.splitlines(), line


def test_render_array_without_slurm(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    cfg = sample_cfg(tmp_path)
    script = slurm.render_sbatch(cfg, "prep", array_size=21).splitlines()
    assert "#SBATCH --array=0-20%16" in script
    assert "#SBATCH --partition=cpu" in script and "#SBATCH --time=120" in script
    assert not any("gpus" in line for line in script)
    assert f"#SBATCH --output={tmp_path}/runs/cc3m/_slurm/prep/%A_%a_0_log.out" in script
    single = slurm.render_sbatch(cfg, "cluster")
    assert "--array" not in single and "#SBATCH --gpus-per-node=1" in single.splitlines()


def test_make_executor_without_slurm_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(slurm.LaunchError, match="no sbatch/srun on PATH") as err:
        slurm.make_executor(sample_cfg(tmp_path), "prep")
    assert "\n" not in str(err.value)
    local = slurm.make_executor(sample_cfg(tmp_path), "train", cluster="local")
    assert local.cluster == "local" and local._executor.parameters["tasks_per_node"] == 4


def test_log_folder(tmp_path):
    assert slurm.log_folder(sample_cfg(tmp_path), "embed") == tmp_path / "runs" / "cc3m" / "_slurm" / "embed"
    cfg = sample_cfg(tmp_path, f"launcher.folder={tmp_path / 'logs'}")
    assert slurm.log_folder(cfg, "train") == tmp_path / "logs" / "train"


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("launcher.slurm.shards_per_job=0", "launcher.slurm.shards_per_job: must be > 0"),
        ("launcher.slurm.mem_gb=-1", "launcher.slurm.mem_gb: must be >= 0"),
        ("launcher.dry_run=maybe", "launcher.dry_run: expected true/false"),
    ],
)
def test_launcher_config_errors_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [override])


# --------------------------------------------------------------------------- requeue


def test_stage_task_checkpoint_resubmits_same_range(tmp_path):
    task = launch.StageTask(sample_cfg(tmp_path), "embed", (32, 48))
    delayed = task.checkpoint()
    assert isinstance(delayed.function, launch.StageTask) and delayed.function is not task
    assert (delayed.function.stage, delayed.function.shard_range) == ("embed", (32, 48))
    assert delayed.args == () and delayed.kwargs == {}


def test_train_task_checkpoint_resumes_from_latest(tmp_path):
    task = train_launch.TrainTask(sample_cfg(tmp_path), "3", resume="none")
    delayed = task.checkpoint()
    assert (delayed.function.expert, delayed.function.resume) == ("3", "latest")


def test_job_ids_are_described_by_array():
    ids = ["4101_0", "4101_1", "4102_0", "77"]
    assert slurm._describe_ids(ids) == "array 4101 (2 task(s)), array 4102 (1 task(s)), 77"
    assert slurm._describe_ids(["DEBUG_1_0", "DEBUG_2_0"]) == "DEBUG_1_0, DEBUG_2_0"


def test_expert_selection(tmp_path):
    cfg = sample_cfg(tmp_path, "train.baselines=[dense, random_split]")
    assert train_launch.requested_runs(cfg, "all", 4) == ["0", "1", "2", "3", "dense", *[f"random_split_{k}" for k in range(4)]]
    assert train_launch.requested_runs(cfg, "experts", 4) == ["0", "1", "2", "3"]
    assert train_launch.requested_runs(cfg, "seed", 4) == [] and train_launch.requested_runs(cfg, "02", 4) == ["2"]
    assert train_launch.requested_runs(cfg, "baselines", 2) == ["dense", "random_split_0", "random_split_1"]
    with pytest.raises(ConfigError, match=r"--expert 4: out of range; the run has experts 0..3"):
        train_launch.requested_runs(cfg, "4", 4)


def test_train_runs_reads_the_training_status(tmp_path):
    cfg = sample_cfg(tmp_path, "cluster.num_experts=2", "cluster.num_fine=8")
    assert train_launch.train_runs(cfg) == {"seed": "not started", "0": "not started", "1": "not started", "dense": "not started"}
    no_seed = sample_cfg(tmp_path, "cluster.num_experts=2", "cluster.num_fine=8", "train.seed_steps=0", "train.baselines=[]")
    assert train_launch.train_runs(no_seed) == {"0": "not started", "1": "not started"}


# --------------------------------------------------------------------------- torchrun


def test_torchrun_command_one_node_and_every_node_form():
    one = launch.torchrun_command("training.main", ["--expert", "3"], ["a=b c"], nproc_per_node=4)
    assert one == ["torchrun", "--nproc_per_node=4", "-m", "training.main", "--expert", "3", "--set", "a=b c"]
    many = launch.torchrun_command("stages.embed", [], nproc_per_node=8, nnodes=2)
    assert many[:5] == ["torchrun", "--nnodes=2", "--nproc_per_node=8", "--rdzv_backend=c10d", launch.RDZV_ENDPOINT]
    line = launch.shell_line([*many, "--set", "run.name=x;$(id)"])
    assert "--rdzv_endpoint=$HOST:29500 -m stages.embed" in line  # the host is left to the shell
    assert line.endswith("'run.name=x;$(id)'")


def test_train_torchrun_forms(tmp_path):
    cfg = sample_cfg(tmp_path, "launcher.nproc_per_node=2")
    cmd = train_launch.train_command(cfg, "c.yaml", "seed", ["x=1"], resume="none")
    assert cmd == ["torchrun", "--nproc_per_node=2", "-m", "training.main", "--config", "c.yaml", "--expert", "seed",
                   "--resume", "none", "--set", "x=1"]
    line = train_launch.cluster_command(cfg, None, "3", [])
    assert line.startswith("torchrun --nnodes=2 --nproc_per_node=4 ") and line.endswith("--expert 3 --resume latest")
