"""Preflight checks for a (multi-node) launch: every problem found, one clear line each, exit code 2.

Two moments, because not everything is checkable from both:

- **Before the launch**, on the launching node: ``python launcher/preflight.py --hostfile H --config C``
  reads the hostfile in DeepSpeed's format (``host slots=N``), resolves every host, tries each remote
  host's ssh port (pdsh, openmpi and mpich start ranks over ssh), checks the master address resolves
  and, when it is this machine, that its port is free, checks the world size (sum of slots) against
  ``parallel.tensor x pipeline`` (and ``expert``), and this node's free memory against
  ``training.memory``'s per-rank estimate.
- **Inside a run** (``launcher/pretrain.py``), before the process group forms, each non-main rank
  waits a bounded time for a TCP connection to MASTER_ADDR:MASTER_PORT (``master_problems``): an
  unreachable master is then one line after two minutes instead of a rendezvous timeout after thirty.
  Once the group exists, before data or model are built, ``check_run`` gathers every rank's host and
  free memory to the main rank, which checks world size and memory and broadcasts the verdict.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.parallel import groups
from hybrid_pretrain.parallel.engine import resolve_precision
from hybrid_pretrain.parallel.groups import launched_rank
from hybrid_pretrain.training.config import load_config
from hybrid_pretrain.training.flops import full_parameter_count
from hybrid_pretrain.training.memory import estimate_memory, format_bytes

DEFAULT_MASTER_PORT = 29500  # deepspeed.constants.TORCH_DISTRIBUTED_DEFAULT_PORT
SSH_LAUNCHERS = ("pdsh", "openmpi", "mpich", "mvapich")


class PreflightError(ConfigError):
    """All problems found, one per line; a ConfigError so launchers report it and exit with status 2."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"preflight found {len(self.problems)} problem(s):\n{lines}")


def read_hostfile(path: str | Path) -> tuple[dict[str, int], list[str]]:
    """Hosts and slots from a DeepSpeed hostfile, and one problem line per bad line (all of them, not the first)."""
    # optional: DeepSpeed only on engine paths (importing it probes accelerators and logs)
    from deepspeed.launcher.runner import _parse_hostfile  # DeepSpeed's own parser: the format it launches with

    path = Path(path)
    if not path.is_file():
        return {}, [f"hostfile {path} does not exist; expected lines like 'worker-0 slots=8'"]
    hosts: dict[str, int] = {}
    problems = []
    ds_logger = logging.getLogger("DeepSpeed")
    level, ds_logger.level = ds_logger.level, logging.CRITICAL  # it logs every bad file before raising
    try:
        for number, raw in enumerate(path.read_text().splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            try:
                ((host, slots),) = _parse_hostfile([line]).items()
            except ValueError:
                problems.append(f"hostfile {path} line {number}: '{line}' is not 'HOST slots=N'")
                continue
            if host in hosts:
                problems.append(f"hostfile {path} line {number}: host '{host}' is listed twice")
            elif slots < 1:
                problems.append(f"hostfile {path} line {number}: host '{host}' has slots={slots}; expected >= 1")
            else:
                hosts[host] = slots
    finally:
        ds_logger.level = level
    if not hosts and not problems:
        problems.append(f"hostfile {path} lists no hosts; expected lines like 'worker-0 slots=8'")
    return hosts, problems


def _addresses(host: str) -> set[str]:
    return {info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}


def _local_addresses() -> set[str]:
    local = {"127.0.0.1", "::1"}
    for addrs in psutil.net_if_addrs().values():
        local.update(a.address.split("%")[0] for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6))
    return local


def is_local(host: str) -> bool:
    """Whether ``host`` names this machine (so no ssh is involved and its ports can be bound here)."""
    try:
        return bool(_addresses(host) & _local_addresses())
    except OSError:
        return False


def tcp_reachable(host: str, port: int, timeout: float) -> str | None:
    """None if a TCP connection to host:port opens within ``timeout`` seconds, else the reason."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return e.strerror or type(e).__name__


def host_problems(hosts: dict[str, int], launcher: str, ssh_port: int = 22, timeout: float = 3.0) -> list[str]:
    """Every host resolves; remote hosts accept connections on the ssh port when the launcher uses ssh."""
    problems = []
    for host in hosts:
        try:
            _addresses(host)
        except OSError as e:
            problems.append(f"host '{host}' does not resolve ({e.strerror or e}); fix /etc/hosts or DNS, or use its IP")
            continue
        if launcher in SSH_LAUNCHERS and not is_local(host):
            reason = tcp_reachable(host, ssh_port, timeout)
            if reason:
                problems.append(f"host '{host}': ssh port {ssh_port} unreachable ({reason}); the {launcher} "
                                f"launcher starts ranks over ssh")
    return problems


def master_address_problems(addr: str, port: int) -> list[str]:
    """Before the launch: the master address resolves, and its port is free when the master is this machine."""
    if not 0 < port < 65536:
        return [f"master port {port} is not a TCP port; expected 1-65535"]
    try:
        _addresses(addr)
    except OSError as e:
        return [f"master address '{addr}' does not resolve ({e.strerror or e})"]
    if is_local(addr):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the rendezvous store: TIME_WAIT is no clash
            try:
                s.bind(("", port))
            except OSError as e:
                return [f"master port {port} on {addr} is already in use ({e.strerror}); pass --master_port with "
                        "a free port"]
    return []


def parallel_problems(parallel, world_size: int, num_experts: int | None = None) -> list[str]:
    """World size against tensor x pipeline (x expert within data parallelism), every mismatch listed."""
    problems = []
    model_parallel = parallel.tensor * parallel.pipeline
    if world_size % model_parallel:
        problems.append(f"world size {world_size} is not a multiple of parallel.tensor ({parallel.tensor}) x "
                        f"parallel.pipeline ({parallel.pipeline}) = {model_parallel}")
    else:
        dp = world_size // model_parallel
        if dp % parallel.expert:
            problems.append(f"parallel.expert ({parallel.expert}) does not divide the data-parallel size {dp} "
                            f"(world size {world_size} / tensor x pipeline {model_parallel})")
    if num_experts is not None and num_experts % parallel.expert:
        problems.append(f"model.num_experts ({num_experts}) is not divisible by parallel.expert ({parallel.expert})")
    return problems


def per_rank_estimate(cfg, world_size: int) -> float:
    """Device bytes per rank from training.memory (weights, gradients, optimizer states, activations)."""
    return per_rank_plan(cfg, world_size)["total"]


def per_rank_plan(cfg, world_size: int) -> dict[str, float]:
    """training.memory's per-rank plan: device bytes ('total') and, with offload, host RAM and NVMe bytes."""

    vocab = cfg.model.vocab_size or cfg.data.vocab_size
    model_cfg = dataclasses.replace(cfg.model, vocab_size=vocab)
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    dp = max(1, world_size // (tp * pp))
    precision = resolve_precision(cfg.train.precision)
    return estimate_memory(full_parameter_count(model_cfg), model_cfg, cfg.train, cfg.data.seq_len, vocab, dp,
                           precision, cfg.parallel.expert, tp_size=tp, pp_size=pp,
                           sequence_parallel=cfg.parallel.sequence_parallel,
                           checkpointing=cfg.parallel.activation_checkpointing,
                           cpu=not torch.cuda.is_available())  # the plan of the run on this machine


def free_memory(nvme_path: str = "") -> dict:
    """This process's view of free memory: its GPU's (torch.cuda.mem_get_info) and the host's available RAM.

    With an NVMe offload folder, also whether it can be written and its free bytes (``offload_dir_facts``).
    """

    facts = {"host": socket.gethostname(), "rank": dist.get_rank() if dist.is_initialized() else 0,
             "host_free": float(psutil.virtual_memory().available)}
    if torch.cuda.is_available():
        facts.update(kind="gpu", free=float(torch.cuda.mem_get_info()[0]), device=torch.cuda.current_device())
    else:
        facts.update(kind="cpu", free=facts["host_free"])
    if nvme_path:
        facts.update(offload_dir_facts(nvme_path))
    return facts


def memory_problems(facts: list[dict], need_per_rank: float, host_per_rank: float = 0.0) -> list[str]:
    """GPU: each rank's device against the estimate, each host's RAM against its ranks' offloaded bytes.

    CPU: device and host are one memory, so each host's available RAM against its ranks' sum of both.
    """

    problems = []
    by_host: dict[str, list[dict]] = {}
    for f in facts:
        by_host.setdefault(f["host"], []).append(f)
    parts = f" (device {format_bytes(need_per_rank)} + offloaded {format_bytes(host_per_rank)})"
    offload = parts if host_per_rank else ""
    for host, ranks in by_host.items():
        if ranks[0]["kind"] == "gpu":
            for f in ranks:
                if f["free"] < need_per_rank:
                    problems.append(f"rank {f['rank']} on {host} (GPU {f['device']}): {format_bytes(f['free'])} "
                                    f"free, estimate needs {format_bytes(need_per_rank)} per rank")
            available, each = ranks[0].get("host_free", math.inf), host_per_rank
            if host_per_rank and available < each * len(ranks):
                problems.append(f"host {host}: {format_bytes(available)} RAM available, the offload plan puts "
                                f"{format_bytes(each * len(ranks))} there ({format_bytes(each)} per rank x "
                                f"{len(ranks)}); offload more to nvme or use more nodes")
        else:
            each = need_per_rank + host_per_rank
            if ranks[0]["free"] < each * len(ranks):
                problems.append(f"host {host}: {format_bytes(ranks[0]['free'])} RAM available, {len(ranks)} rank(s) "
                                f"need about {format_bytes(each * len(ranks))} ({format_bytes(each)} each{offload})")
    return problems


# DeepSpeed's swap files live under <nvme_path>/zero_stage_3 with names fixed by rank and parameter id, so a run
# (a --resume above all) overwrites the files an earlier run left there instead of needing room for new ones.
SWAP_SUBDIR = "zero_stage_3"


def offload_dir_facts(nvme_path: str) -> dict:
    """Whether this process can write its NVMe swap files under ``nvme_path``, and the bytes it can use there: the
    disk's free space plus DeepSpeed's swap files of an earlier run in that folder, which this run overwrites."""

    path = Path(nvme_path)
    if not path.is_dir():
        return {"nvme_problem": f"train.offload.nvme_path {path} does not exist; create it on a fast local disk "
                                f"(mkdir -p {path})"}
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        return {"nvme_problem": f"train.offload.nvme_path {path} is not writable ({e.strerror}); expected a folder "
                                "this user can write"}
    reusable = sum(f.stat().st_size for f in (path / SWAP_SUBDIR).rglob("*") if f.is_file())
    return {"nvme_free": float(shutil.disk_usage(path).free + reusable)}


def async_io_problem() -> str | None:
    """NVMe offload needs DeepSpeed's async_io op, which builds only where libaio's headers are installed."""
    from deepspeed.ops.op_builder import AsyncIOBuilder  # optional: DeepSpeed only on engine paths

    if AsyncIOBuilder().is_compatible(verbose=False):
        return None
    return ("train.offload 'nvme' needs DeepSpeed's async_io op, which needs libaio: run `make setup` as root (it "
            "installs Debian's libaio-dev), or install libaio-dev (Debian/Ubuntu) or libaio-devel (RHEL/Fedora)")


def offload_problems(facts: list[dict], nvme_per_rank: float) -> list[str]:
    """Each host's NVMe folder: present, writable, and with room for its ranks' swap files."""

    problems = []
    by_host: dict[str, list[dict]] = {}
    for f in facts:
        by_host.setdefault(f["host"], []).append(f)
    for host, ranks in by_host.items():
        first = ranks[0]
        if "nvme_problem" in first:
            problems.append(f"host {host}: {first['nvme_problem']}")
        elif first["nvme_free"] < nvme_per_rank * len(ranks):
            problems.append(f"host {host}: train.offload.nvme_path has {format_bytes(first['nvme_free'])} free, the "
                            f"offload plan writes {format_bytes(nvme_per_rank * len(ranks))} "
                            f"({format_bytes(nvme_per_rank)} per rank x {len(ranks)}); free space or choose another "
                            "folder")
    return problems


def plan_problems(cfg, facts: list[dict], world_size: int) -> list[str]:
    """Memory (device, host RAM) and NVMe against the per-rank plan; the estimate knows the pattern-stack LM only."""

    problems = []
    offload = cfg.train.offload
    if offload.uses_nvme:
        aio = async_io_problem()
        problems += [aio] if aio else []
    if cfg.model.arch != "lm":
        return problems
    plan = per_rank_plan(cfg, world_size)
    problems += memory_problems(facts, plan["total"], plan.get("offloaded_host", 0.0))
    if offload.uses_nvme:
        problems += offload_problems(facts, plan["offloaded_nvme"])
    return problems


def master_problems(wait_s: float = 120.0) -> list[str]:
    """In a launched run, before the process group: can this rank open a TCP connection to the master?

    Rank 0 hosts the rendezvous store and is skipped; the others retry until ``wait_s``, since rank 0
    may still be importing. Nothing to check when the launcher set no MASTER_ADDR (MPI discovery).
    """

    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port or launched_rank() == 0:
        return []
    deadline = time.monotonic() + wait_s
    reason = None
    while time.monotonic() < deadline:
        reason = tcp_reachable(addr, int(port), timeout=5.0)
        if reason is None:
            return []
        time.sleep(1.0)
    return [f"rank {launched_rank()} on {socket.gethostname()} cannot reach MASTER_ADDR={addr}:{port} "
            f"({reason}) within {wait_s:.0f} s; check the address, the port and firewalls between the nodes"]


def check_run(cfg, world_size: int) -> None:
    """In-run preflight (a collective): every rank's free memory to the main rank, its verdict to all.

    Raises PreflightError on every rank when the main rank found problems.
    """

    facts: list = [None] * world_size
    nvme_path = cfg.train.offload.nvme_path if cfg.train.offload.uses_nvme else ""
    dist.all_gather_object(facts, free_memory(nvme_path))

    def verdict() -> list[str]:
        num_experts = cfg.model.num_experts if "E" in cfg.model.ffn else None
        problems = parallel_problems(cfg.parallel, world_size, num_experts)
        return problems or plan_problems(cfg, facts, world_size)

    problems = groups.run_on_main(verdict)
    if problems:
        raise PreflightError(problems)


def prelaunch_problems(hostfile: str, cfg, launcher: str, master_addr: str | None, master_port: int,
                       ssh_port: int = 22) -> tuple[list[str], str]:
    """Everything checkable before ``deepspeed --hostfile``: (problems, a one-line summary of the plan)."""

    hosts, problems = read_hostfile(hostfile)
    if not hosts:
        return problems, ""
    host_issues = host_problems(hosts, launcher, ssh_port)
    problems += host_issues
    first = next(iter(hosts))
    # The default master is the first host: already reported if it does not resolve.
    if master_addr or not any(p.startswith(f"host '{first}' does not resolve") for p in host_issues):
        problems += master_address_problems(master_addr or first, master_port)
    world = sum(hosts.values())
    num_experts = cfg.model.num_experts if "E" in cfg.model.ffn else None
    sizes = parallel_problems(cfg.parallel, world, num_experts)
    problems += sizes
    local = [h for h in hosts if is_local(h)]
    memory = "not checked here (this machine is not in the hostfile; the run checks every rank)"
    if not sizes and cfg.model.arch == "lm" and local:  # the estimate knows the pattern-stack LM only
        nvme_path = cfg.train.offload.nvme_path if cfg.train.offload.uses_nvme else ""
        facts = [{**free_memory(nvme_path), "rank": r} for r in range(hosts[local[0]])]
        problems += plan_problems(cfg, facts, world)
        memory = f"estimate {format_bytes(per_rank_estimate(cfg, world))} per rank"
    model_parallel = cfg.parallel.tensor * cfg.parallel.pipeline
    summary = (f"{len(hosts)} host(s), {world} ranks: TP={cfg.parallel.tensor} x PP={cfg.parallel.pipeline} x "
               f"DP={world // model_parallel if not world % model_parallel else '?'} (EP={cfg.parallel.expert}); "
               f"master {master_addr or first}:{master_port}; memory {memory}")
    return problems, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Check a multi-node launch before starting it: hostfile, host reachability, master "
                    "address/port, world size against parallel sizes, free memory against the estimate.",
        epilog="Example: python launcher/preflight.py --hostfile configs/hostfile.example --launcher pdsh "
               "--config configs/h3_hybrid_1.3b.yaml parallel.tensor=2",
    )
    parser.add_argument("--hostfile", required=True, help="DeepSpeed hostfile: one 'HOST slots=N' per line")
    parser.add_argument("--config", help="YAML run config (see configs/); defaults apply when omitted")
    parser.add_argument("--launcher", default="pdsh", choices=["pdsh", "openmpi", "mpich", "mvapich", "slurm"],
                        help="the deepspeed --launcher you will use (ssh reachability is checked for ssh launchers)")
    parser.add_argument("--master-addr", default=os.environ.get("MASTER_ADDR"),
                        help="rendezvous address (default: MASTER_ADDR, else the hostfile's first host)")
    parser.add_argument("--master-port", type=int, default=int(os.environ.get("MASTER_PORT", DEFAULT_MASTER_PORT)),
                        help=f"rendezvous port (default: MASTER_PORT, else {DEFAULT_MASTER_PORT})")
    parser.add_argument("--ssh-port", type=int, default=22, help="port tried on remote hosts (default 22)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. parallel.tensor=2")
    args = parser.parse_args(argv)

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    problems, summary = prelaunch_problems(args.hostfile, cfg, args.launcher, args.master_addr, args.master_port,
                                           args.ssh_port)
    if problems:
        print(f"error: {PreflightError(problems)}", file=sys.stderr)
        return 2
    print(f"preflight ok: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
