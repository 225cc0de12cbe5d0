"""Preflight: every problem found and named on its own line, exit code 2; a sound launch passes."""

from __future__ import annotations

import shutil
import socket

import psutil
import pytest

from hybrid_pretrain.launcher import preflight
from hybrid_pretrain.tests.procs import DEBUG_CONFIG, REPO, SMALL_DATA, _free_port, run_python
from hybrid_pretrain.training.config import ParallelConfig


def test_hostfile_in_deepspeed_format_reports_every_bad_line(tmp_path):
    good = tmp_path / "good"
    good.write_text("# cluster\nworker-0 slots=8\n\nworker-1 slots=8\n")
    assert preflight.read_hostfile(good) == ({"worker-0": 8, "worker-1": 8}, [])

    bad = tmp_path / "bad"
    bad.write_text("worker-0 slots=8\nworker-1 8\nworker-0 slots=4\nworker-2 slots=0\nworker-3 gpus=2\n")
    hosts, problems = preflight.read_hostfile(bad)
    assert hosts == {"worker-0": 8}
    assert len(problems) == 4
    assert "line 2: 'worker-1 8' is not 'HOST slots=N'" in problems[0]
    assert "line 3: host 'worker-0' is listed twice" in problems[1]
    assert "line 4" in problems[2] and "slots=0" in problems[2]
    assert "line 5" in problems[3]

    assert "does not exist" in preflight.read_hostfile(tmp_path / "missing")[1][0]
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    assert "lists no hosts" in preflight.read_hostfile(empty)[1][0]


def test_unresolvable_and_unreachable_hosts():
    problems = preflight.host_problems({"localhost": 2, "no-such-host.invalid": 2}, "pdsh")
    assert len(problems) == 1 and "'no-such-host.invalid' does not resolve" in problems[0]
    # 192.0.2.1 is TEST-NET-1 (RFC 5737): never routed, so its ssh port cannot answer.
    problems = preflight.host_problems({"192.0.2.1": 2}, "openmpi", timeout=0.5)
    assert len(problems) == 1 and "ssh port 22 unreachable" in problems[0]
    assert preflight.host_problems({"192.0.2.1": 2}, "slurm") == []  # srun needs no ssh


def test_master_port_in_use_and_master_unreachable(monkeypatch):
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        problems = preflight.master_address_problems("127.0.0.1", port)
        assert len(problems) == 1 and f"master port {port} on 127.0.0.1 is already in use" in problems[0]
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(port))
        monkeypatch.setenv("RANK", "1")
        assert preflight.master_problems(wait_s=1) == []  # something listens: reachable
    assert preflight.master_address_problems("127.0.0.1", port) == []  # free again
    assert "does not resolve" in preflight.master_address_problems("no-such-host.invalid", 29500)[0]
    problems = preflight.master_problems(wait_s=1)  # nobody listens now
    assert len(problems) == 1 and f"rank 1 on {socket.gethostname()} cannot reach MASTER_ADDR=127.0.0.1:{port}" \
        in problems[0]
    monkeypatch.setenv("RANK", "0")
    assert preflight.master_problems(wait_s=1) == []  # rank 0 hosts the store


def test_world_size_against_parallel_sizes():
    assert preflight.parallel_problems(ParallelConfig(tensor=2, pipeline=2), 8) == []
    problems = preflight.parallel_problems(ParallelConfig(tensor=2, pipeline=2, expert=4), 12, num_experts=6)
    assert len(problems) == 2
    assert "parallel.expert (4) does not divide the data-parallel size 3" in problems[0]
    assert "model.num_experts (6) is not divisible by parallel.expert (4)" in problems[1]
    assert "world size 6 is not a multiple of parallel.tensor (2) x parallel.pipeline (2) = 4" in \
        preflight.parallel_problems(ParallelConfig(tensor=2, pipeline=2), 6)[0]


def test_memory_against_estimate_per_gpu_and_per_host():
    gib = 2**30
    gpus = [{"host": "a", "rank": 0, "kind": "gpu", "free": 40 * gib, "device": 0},
            {"host": "a", "rank": 1, "kind": "gpu", "free": 10 * gib, "device": 1}]
    problems = preflight.memory_problems(gpus, 20 * gib)
    assert problems == ["rank 1 on a (GPU 1): 10.0 GiB free, estimate needs 20.0 GiB per rank"]
    cpus = [{"host": "b", "rank": r, "kind": "cpu", "free": 30 * gib} for r in range(2)]
    assert preflight.memory_problems(cpus, 10 * gib) == []
    problems = preflight.memory_problems(cpus, 20 * gib)
    assert "host b: 30.0 GiB RAM available, 2 rank(s) need about 40.0 GiB" in problems[0]


def test_cli_passes_a_sound_launch_and_lists_all_problems_of_a_bad_one(tmp_path, capsys):
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=2\n")
    port = str(_free_port())  # not the default 29500: other jobs on this machine may hold it
    assert preflight.main(["--hostfile", str(hosts), "--launcher", "mpich", "--master-port", port,
                           "--config", DEBUG_CONFIG, *SMALL_DATA]) == 0
    assert "preflight ok: 1 host(s), 2 ranks: TP=1 x PP=1 x DP=2" in capsys.readouterr().out

    hosts.write_text("localhost slots=3\nno-such-host.invalid slots=2\nbroken line\n")
    code = preflight.main(["--hostfile", str(hosts), "--master-port", port, "--config", DEBUG_CONFIG,
                           "parallel.expert=2", "model.ffn=DEDE",
                           "model.num_experts=4", "train.micro_batch_size=1000000"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert lines[0] == "error: preflight found 3 problem(s):", lines
    assert "line 3: 'broken line'" in lines[1]
    assert "'no-such-host.invalid' does not resolve" in lines[2]
    assert "parallel.expert (2) does not divide the data-parallel size 5" in lines[3]

    # Sizes fine, memory not: a million-sequence micro-batch needs far more RAM than any host has.
    hosts.write_text("localhost slots=2\n")
    assert preflight.main(["--hostfile", str(hosts), "--master-port", port, "--config", DEBUG_CONFIG,
                           "train.micro_batch_size=1000000"]) == 2
    assert "RAM available, 2 rank(s) need about" in capsys.readouterr().err


@pytest.mark.slow
def test_pretrain_runs_the_preflight_before_building_anything(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_python(["--config", DEBUG_CONFIG, f"run_dir={run_dir}", *SMALL_DATA, "train.micro_batch_size=1000000"])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: preflight found 1 problem(s):"], proc.stderr
    assert "RAM available, 1 rank(s) need about" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "data").exists()  # stopped before data preparation and the model


def test_offload_plan_against_host_ram_and_the_nvme_folder(tmp_path):
    gib = 2**30
    gpus = [{"host": "a", "rank": r, "kind": "gpu", "free": 40 * gib, "device": r, "host_free": 30 * gib}
            for r in range(2)]
    assert preflight.memory_problems(gpus, 20 * gib, host_per_rank=10 * gib) == []
    problems = preflight.memory_problems(gpus, 20 * gib, host_per_rank=20 * gib)
    assert problems == ["host a: 30.0 GiB RAM available, the offload plan puts 40.0 GiB there (20.0 GiB per rank x "
                        "2); offload more to nvme or use more nodes"]
    cpus = [{"host": "b", "rank": 0, "kind": "cpu", "free": 30 * gib, "host_free": 30 * gib}]
    assert "need about 40.0 GiB (40.0 GiB each (device 20.0 GiB + offloaded 20.0 GiB))" in \
        preflight.memory_problems(cpus, 20 * gib, host_per_rank=20 * gib)[0]

    missing = preflight.offload_dir_facts(str(tmp_path / "swap"))
    assert missing["nvme_problem"].startswith(f"train.offload.nvme_path {tmp_path / 'swap'} does not exist")
    facts = [{"host": "b", "rank": r, **preflight.offload_dir_facts(str(tmp_path))} for r in range(2)]
    assert preflight.offload_problems(facts, 1e6) == []
    full = preflight.offload_problems(facts, facts[0]["nvme_free"])  # two ranks' files on one disk
    assert len(full) == 1 and "train.offload.nvme_path has" in full[0] and "per rank x 2); free space" in full[0]


def test_swap_files_of_an_earlier_run_count_as_room(tmp_path):
    """A --resume writes its swap files over the ones its first run left in nvme_path: they are room, not a loss."""
    rank = tmp_path / preflight.SWAP_SUBDIR / "optimizer" / "rank0"
    rank.mkdir(parents=True)
    (rank / "0_param.tensor.swp").write_bytes(b"\0" * 50_000_000)
    (tmp_path / "unrelated.bin").write_bytes(b"\0" * 1_000_000)  # someone else's file is not room
    room = preflight.offload_dir_facts(str(tmp_path))["nvme_free"]
    free = shutil.disk_usage(tmp_path).free
    assert room - free == pytest.approx(50_000_000, abs=5_000_000)  # other writers on the disk: slack


def test_cli_refuses_an_offload_plan_that_does_not_fit(tmp_path, capsys):
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=1\n")
    port = str(_free_port())
    big = ["--config", str(REPO / "configs" / "h3_hybrid_2.7b.yaml"), *SMALL_DATA, "data.seq_len=32",
           "train.micro_batch_size=1", "train.zero_stage=3", "train.precision=bf16"]
    # 2.7 billion parameters: fp32 master weights and Adam states alone (32 GB) need more RAM than this host has.
    if psutil.virtual_memory().available > 38e9:
        pytest.skip("this host has room for a 2.7B model's optimizer states in RAM")
    assert preflight.main(["--hostfile", str(hosts), "--master-port", port, *big, "train.offload.optimizer=cpu",
                           "train.offload.params=cpu"]) == 2
    err = capsys.readouterr().err
    assert "(device " in err and " + offloaded " in err and "RAM available" in err
    assert preflight.main(["--hostfile", str(hosts), "--master-port", port, "--config", DEBUG_CONFIG, *SMALL_DATA,
                           "train.zero_stage=3", "train.offload.optimizer=nvme",
                           f"train.offload.nvme_path={tmp_path / 'nowhere'}"]) == 2
    assert f"train.offload.nvme_path {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err


def test_nvme_offload_without_libaio_says_what_to_install(monkeypatch):
    from deepspeed.ops.op_builder import AsyncIOBuilder

    monkeypatch.setattr(AsyncIOBuilder, "is_compatible", lambda self, verbose=False: False)
    problem = preflight.async_io_problem()
    assert "needs libaio: run `make setup` as root" in problem and "libaio-dev (Debian/Ubuntu)" in problem
