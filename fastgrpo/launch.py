"""Cluster launch helpers: Slurm rendezvous, DeepSpeed hostfiles.

Everything here is a pure function of its inputs (an environment mapping, a list of hosts, a
file's text), so it is tested without a cluster. ``python -m fastgrpo.launch`` exposes it to the
shell scripts in ``launchers/``:

    python -m fastgrpo.launch slurm-env          # export lines for one srun task per GPU (eval them)
    python -m fastgrpo.launch torchrun-args      # torchrun arguments for one srun task per node
    python -m fastgrpo.launch hostfile           # a DeepSpeed hostfile for the Slurm allocation
    python -m fastgrpo.launch check-hostfile F   # validate a hostfile (errors name the line)
    python -m fastgrpo.launch expand-nodelist 'gpu-[01-03,07]'

Two srun styles are covered (see launchers/README.md):

* **one task per GPU** (``srun --ntasks-per-node=G python -m fastgrpo.cli.train``): every task
  evaluates ``slurm-env`` and gets RANK = SLURM_PROCID, LOCAL_RANK = SLURM_LOCALID, WORLD_SIZE =
  SLURM_NTASKS, and MASTER_ADDR / MASTER_PORT for ``init_process_group(init_method="env://")``.
  Every task must see all of its node's GPUs (no per-task GPU binding): LOCAL_RANK picks the device.
* **one task per node running torchrun** (``srun --ntasks-per-node=1 torchrun $(... torchrun-args)``):
  ``--nnodes N --nproc_per_node G --node_rank i --rdzv_backend c10d --rdzv_endpoint host:port
  --rdzv_id jobid``; torchrun sets the per-process variables itself. With the c10d rendezvous,
  torchrun assigns node ranks in arrival order; ``--node_rank`` only matters to a static rendezvous.

Graceful preemption (``PreemptionGuard``) lives in :mod:`fastgrpo.preemption`.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# MASTER_PORT = PORT_BASE + job id % PORT_SPAN: below the Linux ephemeral range (32768-60999, where
# outgoing connections take their ports) and above the well-known / registered ports most
# services use; two jobs sharing a node collide only if their ids differ by a multiple of 10000.
PORT_BASE = 20000
PORT_SPAN = 10000

# The per-process variables torchrun / the deepspeed launcher would set, in the order printed.
ENV_KEYS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK")


class LaunchError(ValueError):
    """A launch environment or hostfile that cannot work; the message names the culprit."""


# ---- Slurm node lists ---------------------------------------------------------------------------


def _split_top_level(spec: str, what: str) -> list[str]:
    """Split on commas outside brackets: ``a[1,3],b`` -> ``["a[1,3]", "b"]``."""
    parts, depth, cur = [], 0, []
    for ch in spec:
        if ch == "[":
            depth += 1
            if depth > 1:
                raise LaunchError(f"{what}: nested '[' in {spec!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise LaunchError(f"{what}: unbalanced ']' in {spec!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise LaunchError(f"{what}: unbalanced '[' in {spec!r}")
    parts.append("".join(cur))
    return parts


def _expand_range_list(body: str, spec: str, what: str) -> list[str]:
    """``01-03,07`` -> ``["01", "02", "03", "07"]`` (the width of the lower bound is kept)."""
    out: list[str] = []
    for item in body.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise LaunchError(f"{what}: bad range {item!r} in {spec!r} (expected N or N-M)")
        lo_s, hi_s = m.group(1), m.group(2)
        lo, hi = int(lo_s), int(hi_s) if hi_s is not None else int(lo_s)
        if hi < lo:
            raise LaunchError(f"{what}: range {item!r} in {spec!r} runs backwards")
        width = len(lo_s)
        out.extend(str(i).zfill(width) for i in range(lo, hi + 1))
    return out


def _expand_one(item: str, spec: str, what: str) -> list[str]:
    m = re.search(r"\[([^\[\]]*)\]", item)
    if m is None:
        if "]" in item or "[" in item:
            raise LaunchError(f"{what}: unbalanced brackets in {spec!r}")
        return [item]
    head, tail = item[: m.start()], item[m.end():]
    return [head + v + rest for v in _expand_range_list(m.group(1), spec, what)
            for rest in _expand_one(tail, spec, what)]


def expand_nodelist(spec: str, what: str = "node list") -> list[str]:
    """Expand a Slurm host list like ``scontrol show hostnames`` does.

    ``gpu-[01-03,07]`` -> gpu-01 gpu-02 gpu-03 gpu-07; ``node[1,3-4]`` -> node1 node3 node4;
    ``a,b`` -> a b; ``rack[1-2]-n[1-2]`` -> rack1-n1 rack1-n2 rack2-n1 rack2-n2. Zero padding follows
    the lower bound (``[08-10]`` -> 08 09 10, ``[8-10]`` -> 8 9 10).
    """
    spec = (spec or "").strip()
    if not spec:
        raise LaunchError(f"{what} is empty")
    hosts: list[str] = []
    for item in _split_top_level(spec, what):
        item = item.strip()
        if not item:
            raise LaunchError(f"{what}: empty entry in {spec!r}")
        hosts.extend(_expand_one(item, spec, what))
    for h in hosts:
        if not h or any(c.isspace() for c in h):
            raise LaunchError(f"{what}: bad host name {h!r} in {spec!r}")
    return hosts


def parse_tasks_per_node(spec: str, what: str = "SLURM_TASKS_PER_NODE") -> list[int]:
    """``2(x3),1`` -> ``[2, 2, 2, 1]`` (Slurm's run-length format for tasks per node)."""
    out: list[int] = []
    for item in (spec or "").split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise LaunchError(f"{what}={spec!r}: bad entry {item!r} (expected N or N(xM))")
        out.extend([int(m.group(1))] * (int(m.group(2)) if m.group(2) else 1))
    return out


# ---- Slurm rendezvous ----------------------------------------------------------------------------


def _first(env: Mapping[str, str], *names: str) -> str | None:
    for n in names:
        v = env.get(n)
        if v is not None and str(v).strip() != "":
            return str(v).strip()
    return None


def _int(name: str, value: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise LaunchError(f"{name}={value!r} is not an integer") from None


def master_port_for(job_id: str, env: Mapping[str, str] | None = None) -> int:
    """``$MASTER_PORT`` if set, else ``PORT_BASE + job_id % PORT_SPAN`` (a non-numeric id: its CRC32)."""
    if env is not None and _first(env, "MASTER_PORT") is not None:
        port = _int("MASTER_PORT", _first(env, "MASTER_PORT"))
        if not 1 <= port <= 65535:
            raise LaunchError(f"MASTER_PORT={port} is not a TCP port (1-65535)")
        return port
    key = int(job_id) if str(job_id).isdigit() else zlib.crc32(str(job_id).encode())
    return PORT_BASE + key % PORT_SPAN


def _gpus_on_node(env: Mapping[str, str]) -> int | None:
    v = _first(env, "FASTGRPO_NPROC_PER_NODE")
    if v is not None:
        return _int("FASTGRPO_NPROC_PER_NODE", v)
    v = _first(env, "SLURM_GPUS_ON_NODE")
    if v is not None:
        return _int("SLURM_GPUS_ON_NODE", v)
    v = _first(env, "SLURM_GPUS_PER_NODE")  # "8", "a100:8" or "gpu:a100:8"
    if v is not None:
        return _int("SLURM_GPUS_PER_NODE", v.rsplit(":", 1)[-1])
    return None


_SLURM_GROUPS = {
    "SLURM_JOB_ID": ("SLURM_JOB_ID", "SLURM_JOBID"),
    "SLURM_JOB_NODELIST": ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"),
    "SLURM_NNODES": ("SLURM_NNODES", "SLURM_JOB_NUM_NODES"),
    "SLURM_NODEID": ("SLURM_NODEID",),
    "SLURM_PROCID": ("SLURM_PROCID",),
    "SLURM_LOCALID": ("SLURM_LOCALID",),
    "SLURM_NTASKS": ("SLURM_NTASKS", "SLURM_NPROCS"),
}


def _slurm_values(env: Mapping[str, str]) -> dict[str, str]:
    """The Slurm variables :func:`slurm_rendezvous` needs (each under its canonical name); all missing
    ones are named in one :class:`LaunchError`."""
    values: dict[str, str] = {}
    missing = []
    for key, names in _SLURM_GROUPS.items():
        v = _first(env, *names)
        if v is None:
            missing.append(key if len(names) == 1 else f"{key} (or {', '.join(n for n in names if n != key)})")
        else:
            values[key] = v
    if missing:
        raise LaunchError("not inside an srun task? missing Slurm variable(s): " + "; ".join(missing))
    return values


def _tasks_per_node(env: Mapping[str, str], nnodes: int, ntasks: int) -> list[int]:
    """Tasks on each node: SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE, else SLURM_NTASKS_PER_NODE,
    else NTASKS / NNODES; checked against NNODES and NTASKS."""
    tpn_spec = _first(env, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    if tpn_spec is not None:
        per_node = parse_tasks_per_node(tpn_spec)
    elif _first(env, "SLURM_NTASKS_PER_NODE") is not None:
        per_node = [_int("SLURM_NTASKS_PER_NODE", _first(env, "SLURM_NTASKS_PER_NODE"))] * nnodes
    elif ntasks % nnodes == 0:
        per_node = [ntasks // nnodes] * nnodes
    else:
        raise LaunchError(f"SLURM_NTASKS={ntasks} is not a multiple of SLURM_NNODES={nnodes} and neither "
                          "SLURM_TASKS_PER_NODE nor SLURM_NTASKS_PER_NODE is set")
    if len(per_node) != nnodes:
        raise LaunchError(f"tasks per node {per_node} (SLURM_TASKS_PER_NODE={tpn_spec!r}) do not cover "
                          f"SLURM_NNODES={nnodes} nodes")
    if sum(per_node) != ntasks:
        raise LaunchError(f"tasks per node {per_node} sum to {sum(per_node)}, not SLURM_NTASKS={ntasks}")
    return per_node


def slurm_rendezvous(env: Mapping[str, str], nproc_per_node: int | None = None) -> dict[str, Any]:
    """The distributed launch of the current srun task, derived from Slurm's variables.

    Returns ``{"MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
    "NODE_RANK"}`` as strings (the environment of one process per task), plus ``"hosts"`` (the
    expanded node list), ``"nproc_per_node"`` (GPUs per node for torchrun; None if unknown) and
    ``"torchrun_args"`` (for one task per node running torchrun; None when ``nproc_per_node`` is
    unknown).

    Read: SLURM_JOB_ID, SLURM_STEP_NODELIST / SLURM_JOB_NODELIST / SLURM_NODELIST (the first set),
    SLURM_NNODES (or SLURM_JOB_NUM_NODES), SLURM_NODEID, SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS (or
    SLURM_NPROCS), tasks per node from SLURM_TASKS_PER_NODE (``2(x2)``; the step's, also correct for
    uneven layouts), else SLURM_NTASKS_PER_NODE, else NTASKS / NNODES; GPUs per node from
    ``nproc_per_node``, $FASTGRPO_NPROC_PER_NODE, SLURM_GPUS_ON_NODE or SLURM_GPUS_PER_NODE.
    MASTER_ADDR is the first host; MASTER_PORT see :func:`master_port_for`.
    """
    values = _slurm_values(env)
    job_id = values["SLURM_JOB_ID"]
    hosts = expand_nodelist(values["SLURM_JOB_NODELIST"], "SLURM_JOB_NODELIST")
    nnodes = _int("SLURM_NNODES", values["SLURM_NNODES"])
    node_id = _int("SLURM_NODEID", values["SLURM_NODEID"])
    proc_id = _int("SLURM_PROCID", values["SLURM_PROCID"])
    local_id = _int("SLURM_LOCALID", values["SLURM_LOCALID"])
    ntasks = _int("SLURM_NTASKS", values["SLURM_NTASKS"])
    if len(hosts) != nnodes:
        raise LaunchError(f"SLURM_JOB_NODELIST={values['SLURM_JOB_NODELIST']!r} names {len(hosts)} host(s) "
                          f"but SLURM_NNODES={nnodes}")
    per_node = _tasks_per_node(env, nnodes, ntasks)
    if not 0 <= node_id < nnodes:
        raise LaunchError(f"SLURM_NODEID={node_id} is outside 0..{nnodes - 1} (SLURM_NNODES={nnodes})")
    if not 0 <= proc_id < ntasks:
        raise LaunchError(f"SLURM_PROCID={proc_id} is outside 0..{ntasks - 1} (SLURM_NTASKS={ntasks})")
    local_world = per_node[node_id]
    if not 0 <= local_id < local_world:
        raise LaunchError(f"SLURM_LOCALID={local_id} is outside 0..{local_world - 1} "
                          f"({local_world} task(s) on node {node_id})")

    master_addr = hosts[0]
    master_port = master_port_for(job_id, env)
    gpus = nproc_per_node if nproc_per_node is not None else _gpus_on_node(env)
    if gpus is not None and gpus < 1:
        raise LaunchError(f"{gpus} processes per node: need at least 1")
    torchrun_args = None
    if gpus is not None:
        torchrun_args = ["--nnodes", str(nnodes), "--nproc_per_node", str(gpus), "--node_rank", str(node_id),
                         "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{master_addr}:{master_port}",
                         "--rdzv_id", str(job_id)]
    return {
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        "RANK": str(proc_id),
        "LOCAL_RANK": str(local_id),
        "WORLD_SIZE": str(ntasks),
        "LOCAL_WORLD_SIZE": str(local_world),
        "NODE_RANK": str(node_id),
        "hosts": hosts,
        "nproc_per_node": gpus,
        "torchrun_args": torchrun_args,
    }


def export_lines(rdzv: Mapping[str, Any]) -> str:
    """``export MASTER_ADDR=...`` lines (shell-quoted) for ``eval "$(python -m fastgrpo.launch slurm-env)"``."""
    return "".join(f"export {k}={shlex.quote(str(rdzv[k]))}\n" for k in ENV_KEYS)


# ---- the environment of one training process ---------------------------------------------------

_HOW_TO_LAUNCH = ("start one process per rank with torchrun, the deepspeed launcher or srun + "
                  "eval \"$(python -m fastgrpo.launch slurm-env)\" (they set RANK, LOCAL_RANK, MASTER_ADDR and "
                  "MASTER_PORT), or unset WORLD_SIZE to run one process")


def check_process_env(env: Mapping[str, str]) -> dict[str, int]:
    """Validate the variables a training process reads (what torchrun / the deepspeed launcher /
    ``slurm-env`` set) before anything is built; :class:`LaunchError` names the variable.

    WORLD_SIZE, LOCAL_WORLD_SIZE and $FASTGRPO_PG_TIMEOUT_S must be integers >= 1 when set; with
    WORLD_SIZE > 1, RANK (0..WORLD_SIZE-1), MASTER_ADDR and MASTER_PORT (1-65535) must be set and
    LOCAL_RANK, when set, be >= 0. Returns ``{"world_size", "rank", "local_rank"}``.
    """
    def number(name: str, default: int, low: int) -> int:
        if name not in env:
            return default
        value = _int(name, str(env[name]).strip())
        if value < low:
            raise LaunchError(f"{name}={value} must be >= {low}")
        return value

    world = number("WORLD_SIZE", 1, 1)
    number("LOCAL_WORLD_SIZE", 1, 1)
    number("FASTGRPO_PG_TIMEOUT_S", 1800, 1)
    local_rank = number("LOCAL_RANK", 0, 0)
    if world == 1:
        return {"world_size": 1, "rank": number("RANK", 0, 0), "local_rank": local_rank}
    missing = [n for n in ("RANK", "MASTER_ADDR", "MASTER_PORT") if _first(env, n) is None]
    if missing:
        raise LaunchError(f"WORLD_SIZE={world} but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                          f"not set: {_HOW_TO_LAUNCH}")
    rank = number("RANK", 0, 0)
    if rank >= world:
        raise LaunchError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
    port = number("MASTER_PORT", 0, 1)
    if port > 65535:
        raise LaunchError(f"MASTER_PORT={port} is not a TCP port (1-65535)")
    return {"world_size": world, "rank": rank, "local_rank": local_rank}


# ---- DeepSpeed hostfiles -------------------------------------------------------------------------

_HOST_RE = re.compile(r"[A-Za-z0-9_.:\-]+")


def deepspeed_hostfile(hosts: Sequence[str], slots: int | Sequence[int] | Mapping[str, int]) -> str:
    """A DeepSpeed / MPI-style hostfile: one ``host slots=N`` line per host, in order.

    ``slots``: one number for every host, a sequence (one per host) or a mapping host -> slots.
    """
    hosts = list(hosts)
    if not hosts:
        raise LaunchError("a hostfile needs at least one host")
    if isinstance(slots, Mapping):
        unknown = [h for h in hosts if h not in slots]
        if unknown:
            raise LaunchError(f"no slot count for host(s) {unknown}")
        counts = [slots[h] for h in hosts]
    elif isinstance(slots, int):
        counts = [slots] * len(hosts)
    else:
        counts = list(slots)
        if len(counts) != len(hosts):
            raise LaunchError(f"{len(hosts)} hosts but {len(counts)} slot counts")
    seen: set[str] = set()
    lines = []
    for h, n in zip(hosts, counts):
        if not isinstance(h, str) or not _HOST_RE.fullmatch(h):
            raise LaunchError(f"bad host name {h!r}")
        if h in seen:
            raise LaunchError(f"host {h!r} is listed twice")
        seen.add(h)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise LaunchError(f"host {h!r}: slots must be a positive integer, got {n!r}")
        lines.append(f"{h} slots={n}\n")
    return "".join(lines)


def parse_hostfile(text: str, source: str = "hostfile") -> dict[str, int]:
    """Parse ``host slots=N`` lines (``#`` comments and blank lines ignored) into {host: slots}.

    As strict as DeepSpeed's own parser (``slots=N`` with no spaces around ``=``), plus: N >= 1 and
    no host twice. Errors name ``source:line``.
    """
    out: dict[str, int] = {}
    first_line: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+)\s+slots=(\d+)", line)
        if not m:
            raise LaunchError(f"{source}:{lineno}: bad entry {raw.strip()!r}: expected 'HOST slots=N'")
        host, n = m.group(1), int(m.group(2))
        if not _HOST_RE.fullmatch(host):
            raise LaunchError(f"{source}:{lineno}: bad host name {host!r}")
        if n < 1:
            raise LaunchError(f"{source}:{lineno}: host {host!r} has slots={n}; need at least 1")
        if host in out:
            raise LaunchError(f"{source}:{lineno}: host {host!r} is already listed on line {first_line[host]}")
        out[host], first_line[host] = n, lineno
    if not out:
        raise LaunchError(f"{source}: no 'HOST slots=N' entries")
    return out


def read_hostfile(path: str | Path) -> dict[str, int]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise LaunchError(f"cannot read hostfile {p}: {e.strerror or e}") from None
    return parse_hostfile(text, source=str(p))


# ---- CLI ------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    import os

    env = os.environ if env is None else env
    p = argparse.ArgumentParser(prog="python -m fastgrpo.launch", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("slurm-env", help="export lines for one srun task per GPU (eval them)")
    t = sub.add_parser("torchrun-args", help="torchrun arguments for one srun task per node")
    t.add_argument("--nproc-per-node", type=int, default=None,
                   help="default: $FASTGRPO_NPROC_PER_NODE, $SLURM_GPUS_ON_NODE, $SLURM_GPUS_PER_NODE")
    h = sub.add_parser("hostfile", help="a DeepSpeed hostfile for the Slurm allocation (or --hosts)")
    h.add_argument("--hosts", default=None, help="a host list (Slurm syntax); default $SLURM_JOB_NODELIST")
    h.add_argument("--slots", type=int, default=None, help="GPUs per host; default $SLURM_GPUS_ON_NODE")
    c = sub.add_parser("check-hostfile", help="validate a hostfile; prints host and slot counts")
    c.add_argument("path")
    e = sub.add_parser("expand-nodelist", help="one host per line, like scontrol show hostnames")
    e.add_argument("nodelist", nargs="?", default=None, help="default $SLURM_JOB_NODELIST")
    a = p.parse_args(argv)
    try:
        if a.cmd == "slurm-env":
            sys.stdout.write(export_lines(slurm_rendezvous(env)))
        elif a.cmd == "torchrun-args":
            r = slurm_rendezvous(env, nproc_per_node=a.nproc_per_node)
            if r["torchrun_args"] is None:
                raise LaunchError("GPUs per node unknown: set SLURM_GPUS_ON_NODE (sbatch --gpus-per-node), "
                                  "FASTGRPO_NPROC_PER_NODE or pass --nproc-per-node")
            print(shlex.join(r["torchrun_args"]))
        elif a.cmd == "hostfile":
            spec = a.hosts or _first(env, "SLURM_JOB_NODELIST", "SLURM_NODELIST")
            if spec is None:
                raise LaunchError("no hosts: pass --hosts or run inside a Slurm job (SLURM_JOB_NODELIST)")
            slots = a.slots if a.slots is not None else _gpus_on_node(env)
            if slots is None:
                raise LaunchError("slots unknown: pass --slots or set SLURM_GPUS_ON_NODE")
            sys.stdout.write(deepspeed_hostfile(expand_nodelist(spec, "--hosts" if a.hosts else
                                                                "SLURM_JOB_NODELIST"), slots))
        elif a.cmd == "check-hostfile":
            pool = read_hostfile(a.path)
            print(f"{a.path}: {len(pool)} host(s), {sum(pool.values())} slot(s): "
                  + ", ".join(f"{k}={v}" for k, v in pool.items()))
        elif a.cmd == "expand-nodelist":
            spec = a.nodelist or _first(env, "SLURM_JOB_NODELIST", "SLURM_NODELIST")
            if spec is None:
                raise LaunchError("no node list given and SLURM_JOB_NODELIST is not set")
            print("\n".join(expand_nodelist(spec)))
    except LaunchError as err:
        print(f"fastgrpo.launch {a.cmd}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
