"""Cluster launchers: script syntax, Slurm node lists and rendezvous, DeepSpeed hostfiles, the sbatch
preemption path (with stub srun / torchrun / scontrol), and graceful preemption of the trainer."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fastgrpo.launch import (
    LaunchError,
    deepspeed_hostfile,
    expand_nodelist,
    export_lines,
    master_port_for,
    parse_hostfile,
    parse_tasks_per_node,
    read_hostfile,
    slurm_rendezvous,
)
from fastgrpo.launch import main as launch_main
from fastgrpo.preemption import PreemptionGuard

REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = REPO / "launchers"
SCRIPTS = sorted([*LAUNCHERS.glob("*.sh"), *LAUNCHERS.glob("*.sbatch")])


# ---- scripts ------------------------------------------------------------------------------------


def test_the_expected_scripts_exist():
    names = {p.name for p in SCRIPTS}
    assert {"torchrun.sh", "deepspeed.sh", "slurm_1node.sbatch", "slurm_multinode.sbatch"} <= names, names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], check=False, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", ["slurm_1node.sbatch", "slurm_multinode.sbatch"])
def test_sbatch_headers(name):
    text = (LAUNCHERS / name).read_text()
    lines = text.splitlines()
    # sbatch stops reading #SBATCH lines at the first command: all of them must come first.
    first_cmd = next(i for i, ln in enumerate(lines) if ln.strip() and not ln.startswith("#"))
    directives = [ln for ln in lines if ln.startswith("#SBATCH")]
    assert all(lines.index(d) < first_cmd for d in directives)
    for d in ("--signal=B:USR1@300", "--requeue", "--open-mode=append"):
        assert f"#SBATCH {d}" in directives, d
    assert "checkpoint.resume=auto" in text and "MLFLOW_TRACKING_URI" in text
    for var in ("NCCL_SOCKET_IFNAME", "NCCL_IB_HCA", "NCCL_DEBUG", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
                "FASTGRPO_PG_TIMEOUT_S"):
        assert var in text, var
    assert "--output=\"logs/%x-%j-%t.out\"" in text


def test_deepspeed_script_arguments_parse_with_deepspeeds_runner():
    """The flags deepspeed.sh passes are the runner's: --module runs `python -m fastgrpo.cli.train`,
    --no_local_rank keeps `--local_rank=N` (which Hydra rejects) out of the arguments."""
    text = (LAUNCHERS / "deepspeed.sh").read_text()
    for flag in ("--module", "--no_local_rank", "--hostfile", "--master_port", "fastgrpo.cli.train"):
        assert flag in text, flag
    from deepspeed.launcher.runner import parse_args

    a = parse_args(["--module", "--no_local_rank", "--master_port", "29500", "--hostfile",
                    str(LAUNCHERS / "hostfile"), "--launcher", "pdsh", "fastgrpo.cli.train", "trainer.steps=3",
                    "model=small"])
    assert a.module and a.no_local_rank and a.master_port == 29500
    assert a.user_script == "fastgrpo.cli.train" and a.user_args == ["trainer.steps=3", "model=small"]


def test_torchrun_accepts_the_launch_arguments():
    from torch.distributed.run import get_args_parser

    env = fake_slurm_env(proc_id=2)
    args = slurm_rendezvous(env)["torchrun_args"]
    a = get_args_parser().parse_args([*args, "--max-restarts=0",
                                      "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
                                      "--shutdown-timeout=270", "-m", "fastgrpo.cli.train", "x=1"])
    assert (a.nnodes, a.nproc_per_node, a.node_rank) == ("2", "2", 1)
    assert (a.rdzv_backend, a.rdzv_endpoint, a.rdzv_id) == ("c10d", "gpu-01:24242", "4242")
    assert "SIGUSR1" in a.signals_to_handle and a.module and a.training_script == "fastgrpo.cli.train"


# ---- node lists ---------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, hosts", [
    ("gpu-[01-03,07]", ["gpu-01", "gpu-02", "gpu-03", "gpu-07"]),
    ("node[1,3-4]", ["node1", "node3", "node4"]),
    ("a,b", ["a", "b"]),
    ("single", ["single"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[08-10]", ["n08", "n09", "n10"]),
    ("gpu-[01-02],cpu-[1-2]", ["gpu-01", "gpu-02", "cpu-1", "cpu-2"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("a.b.c,x[3]", ["a.b.c", "x3"]),
])
def test_expand_nodelist(spec, hosts):
    assert expand_nodelist(spec) == hosts


@pytest.mark.parametrize("spec, match", [
    ("", "empty"),
    ("gpu-[01-03", "unbalanced"),
    ("gpu-01]", "unbalanced"),
    ("gpu-[3-1]", "backwards"),
    ("gpu-[a-b]", "bad range"),
    ("gpu-[[1-2]]", "nested"),
    ("a,,b", "empty entry"),
])
def test_expand_nodelist_errors(spec, match):
    with pytest.raises(LaunchError, match=match):
        expand_nodelist(spec)


def test_tasks_per_node():
    assert parse_tasks_per_node("2(x2)") == [2, 2]
    assert parse_tasks_per_node("8(x3),4") == [8, 8, 8, 4]
    assert parse_tasks_per_node("1") == [1]
    with pytest.raises(LaunchError, match="SLURM_TASKS_PER_NODE"):
        parse_tasks_per_node("2x2")


# ---- rendezvous ---------------------------------------------------------------------------------


def fake_slurm_env(proc_id: int, nodes: int = 2, per_node: int = 2, job_id: str = "4242", **extra) -> dict:
    """What srun sets for task ``proc_id`` of ``nodes`` x ``per_node`` tasks (block distribution)."""
    return {
        "SLURM_JOB_ID": job_id, "SLURM_JOB_NODELIST": f"gpu-[01-{nodes:02d}]", "SLURM_NNODES": str(nodes),
        "SLURM_NTASKS": str(nodes * per_node), "SLURM_NTASKS_PER_NODE": str(per_node),
        "SLURM_TASKS_PER_NODE": f"{per_node}(x{nodes})", "SLURM_GPUS_ON_NODE": str(per_node),
        "SLURM_PROCID": str(proc_id), "SLURM_NODEID": str(proc_id // per_node),
        "SLURM_LOCALID": str(proc_id % per_node), **extra,
    }


def test_rendezvous_two_nodes_two_tasks_each():
    port = master_port_for("4242")
    assert port == 24242 and 1024 < port < 32768  # below the Linux ephemeral range
    expected = [  # RANK, LOCAL_RANK, NODE_RANK for tasks 0..3
        ("0", "0", "0"), ("1", "1", "0"), ("2", "0", "1"), ("3", "1", "1"),
    ]
    for task, (rank, local_rank, node_rank) in enumerate(expected):
        r = slurm_rendezvous(fake_slurm_env(task))
        assert {k: r[k] for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                                  "LOCAL_WORLD_SIZE", "NODE_RANK")} == {
            "MASTER_ADDR": "gpu-01", "MASTER_PORT": "24242", "RANK": rank, "LOCAL_RANK": local_rank,
            "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "NODE_RANK": node_rank}, task
        assert r["hosts"] == ["gpu-01", "gpu-02"]
        assert r["torchrun_args"] == [
            "--nnodes", "2", "--nproc_per_node", "2", "--node_rank", node_rank, "--rdzv_backend", "c10d",
            "--rdzv_endpoint", "gpu-01:24242", "--rdzv_id", "4242"], task
        # the eval-able form
        lines = export_lines(r).splitlines()
        assert lines[0] == "export MASTER_ADDR=gpu-01" and f"export RANK={rank}" in lines and len(lines) == 7


def test_rendezvous_one_task_per_node_running_torchrun():
    # srun --ntasks-per-node=1 on 2 nodes with 8 GPUs each: the task's own ranks are node ranks.
    for node in (0, 1):
        env = fake_slurm_env(node, nodes=2, per_node=1, SLURM_GPUS_ON_NODE="8", SLURM_JOB_NODELIST="n[7,9]")
        r = slurm_rendezvous(env)
        assert r["NODE_RANK"] == str(node) and r["LOCAL_WORLD_SIZE"] == "1" and r["WORLD_SIZE"] == "2"
        assert r["torchrun_args"] == ["--nnodes", "2", "--nproc_per_node", "8", "--node_rank", str(node),
                                      "--rdzv_backend", "c10d", "--rdzv_endpoint", "n7:24242", "--rdzv_id", "4242"]


def test_rendezvous_overrides_and_fallbacks():
    env = fake_slurm_env(0, MASTER_PORT="31000")
    assert slurm_rendezvous(env)["MASTER_PORT"] == "31000"
    assert slurm_rendezvous(env, nproc_per_node=4)["torchrun_args"][3] == "4"
    # a non-numeric job id still gives a port in the range, the same one every time
    p1, p2 = master_port_for("123_4"), master_port_for("123_4")
    assert p1 == p2 and 20000 <= p1 < 30000
    # uneven layout: 3 tasks on node 0, 1 on node 1 (SLURM_TASKS_PER_NODE decides)
    env = fake_slurm_env(3, SLURM_TASKS_PER_NODE="3,1", SLURM_NODEID="1", SLURM_LOCALID="0")
    del env["SLURM_NTASKS_PER_NODE"]
    r = slurm_rendezvous(env)
    assert (r["RANK"], r["LOCAL_WORLD_SIZE"], r["NODE_RANK"]) == ("3", "1", "1")
    # no tasks-per-node variables: NTASKS / NNODES
    env = fake_slurm_env(1)
    del env["SLURM_TASKS_PER_NODE"], env["SLURM_NTASKS_PER_NODE"]
    assert slurm_rendezvous(env)["LOCAL_WORLD_SIZE"] == "2"
    # GPUs unknown: no torchrun arguments (the CLI explains)
    env = fake_slurm_env(0)
    del env["SLURM_GPUS_ON_NODE"]
    assert slurm_rendezvous(env)["torchrun_args"] is None
    assert slurm_rendezvous({**env, "SLURM_GPUS_PER_NODE": "h100:8"})["nproc_per_node"] == 8


@pytest.mark.parametrize("change, match", [
    ({"SLURM_PROCID": None}, r"missing Slurm variable\(s\): SLURM_PROCID"),
    ({"SLURM_JOB_NODELIST": None}, "SLURM_JOB_NODELIST"),
    ({"SLURM_LOCALID": None, "SLURM_NODEID": None}, "SLURM_NODEID; SLURM_LOCALID"),
    ({"SLURM_PROCID": "x"}, r"SLURM_PROCID='x' is not an integer"),
    ({"SLURM_NNODES": "3"}, "names 2 host.*SLURM_NNODES=3"),
    ({"SLURM_PROCID": "4"}, "SLURM_PROCID=4 is outside"),
    ({"SLURM_LOCALID": "2"}, "SLURM_LOCALID=2 is outside"),
    ({"SLURM_TASKS_PER_NODE": "2(x3)"}, "do not cover"),
    ({"SLURM_TASKS_PER_NODE": "1(x2)"}, "sum to 2, not SLURM_NTASKS=4"),
    ({"SLURM_JOB_NODELIST": "gpu-[02-01]"}, "SLURM_JOB_NODELIST.*backwards"),
    ({"MASTER_PORT": "70000"}, "MASTER_PORT=70000"),
])
def test_rendezvous_errors_name_the_variable(change, match):
    env = fake_slurm_env(1)
    for k, v in change.items():
        if v is None:
            env.pop(k)
        else:
            env[k] = v
    with pytest.raises(LaunchError, match=match):
        slurm_rendezvous(env)


def test_cli(capsys):
    env = fake_slurm_env(3)
    assert launch_main(["slurm-env"], env=env) == 0
    out = capsys.readouterr().out
    exported = dict(line.removeprefix("export ").split("=", 1) for line in out.splitlines())
    assert exported == {"MASTER_ADDR": "gpu-01", "MASTER_PORT": "24242", "RANK": "3", "LOCAL_RANK": "1",
                        "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "NODE_RANK": "1"}
    assert launch_main(["torchrun-args"], env=env) == 0
    assert shlex.split(capsys.readouterr().out) == slurm_rendezvous(env)["torchrun_args"]
    assert launch_main(["torchrun-args", "--nproc-per-node", "8"], env=env) == 0
    assert "--nproc_per_node 8" in capsys.readouterr().out
    assert launch_main(["hostfile"], env=env) == 0
    assert capsys.readouterr().out == "gpu-01 slots=2\ngpu-02 slots=2\n"
    assert launch_main(["expand-nodelist", "x[1-2]"], env={}) == 0
    assert capsys.readouterr().out.split() == ["x1", "x2"]
    # errors: exit code 2 and a message naming the problem, nothing on stdout
    assert launch_main(["slurm-env"], env={}) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and "SLURM_PROCID" in cap.err
    no_gpus = {k: v for k, v in env.items() if k != "SLURM_GPUS_ON_NODE"}
    assert launch_main(["torchrun-args"], env=no_gpus) == 2
    assert "SLURM_GPUS_ON_NODE" in capsys.readouterr().err


# ---- hostfiles ----------------------------------------------------------------------------------


def test_hostfile_round_trip(tmp_path):
    text = deepspeed_hostfile(["gpu-01", "gpu-02", "10.0.0.3"], 8)
    assert text == "gpu-01 slots=8\ngpu-02 slots=8\n10.0.0.3 slots=8\n"
    assert parse_hostfile(text) == {"gpu-01": 8, "gpu-02": 8, "10.0.0.3": 8}
    assert list(parse_hostfile(text)) == ["gpu-01", "gpu-02", "10.0.0.3"]  # order = rank order
    uneven = deepspeed_hostfile(["a", "b"], [8, 4])
    assert parse_hostfile(uneven) == {"a": 8, "b": 4}
    assert parse_hostfile(deepspeed_hostfile(["a", "b"], {"b": 2, "a": 1})) == {"a": 1, "b": 2}
    # comments, blank lines and inline comments are ignored
    commented = "# cluster A\n\n  a slots=4   # first\n\tb\tslots=2\n"
    assert parse_hostfile(commented) == {"a": 4, "b": 2}
    # the example hostfile parses, with our parser and with DeepSpeed's
    from deepspeed.launcher.runner import fetch_hostfile

    example = LAUNCHERS / "hostfile"
    assert read_hostfile(example) == dict(fetch_hostfile(str(example))) == {"node-01": 8, "node-02": 8}
    f = tmp_path / "hf"
    f.write_text(uneven)
    assert dict(fetch_hostfile(str(f))) == {"a": 8, "b": 4}


@pytest.mark.parametrize("text, match", [
    ("a slots=4\nb slots 4\n", r"hf:2: bad entry 'b slots 4'"),
    ("a slots=4\nb\n", r"hf:2: bad entry 'b'"),
    ("a slots=x\n", r"hf:1: bad entry"),
    ("a slots = 4\n", r"hf:1: bad entry"),
    ("a slots=0\n", r"hf:1: host 'a' has slots=0"),
    ("a slots=4\n# c\nb slots=4\na slots=2\n", r"hf:4: host 'a' is already listed on line 1"),
    ("# only comments\n\n", r"hf: no 'HOST slots=N' entries"),
])
def test_hostfile_errors_name_the_line(text, match):
    with pytest.raises(LaunchError, match=match):
        parse_hostfile(text, source="hf")


def test_hostfile_write_errors(tmp_path):
    with pytest.raises(LaunchError, match="at least one host"):
        deepspeed_hostfile([], 8)
    with pytest.raises(LaunchError, match="listed twice"):
        deepspeed_hostfile(["a", "a"], 8)
    with pytest.raises(LaunchError, match="positive integer"):
        deepspeed_hostfile(["a"], 0)
    with pytest.raises(LaunchError, match="2 hosts but 1 slot counts"):
        deepspeed_hostfile(["a", "b"], [8])
    with pytest.raises(LaunchError, match="bad host name"):
        deepspeed_hostfile(["a b"], 8)
    with pytest.raises(LaunchError, match="no slot count"):
        deepspeed_hostfile(["a", "b"], {"a": 1})
    with pytest.raises(LaunchError, match="cannot read hostfile"):
        read_hostfile(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.write_text("a slots=1\nb slots=\n")
    assert launch_main(["check-hostfile", str(bad)]) == 2


# ---- the sbatch preemption path, with stub srun / torchrun / scontrol ----------------------------

STUBS = {
    # srun: run the command once (one node), forward SIGUSR1 to it like the real srun does
    "srun": """#!/usr/bin/env bash
        while [[ $# -gt 0 && "$1" == -* ]]; do shift; done
        "$@" & child=$!
        trap 'kill -USR1 $child 2>/dev/null' USR1
        while :; do wait $child && rc=0 || rc=$?; kill -0 $child 2>/dev/null || exit $rc; done
    """,
    # torchrun: record the arguments; in "wait" mode run until SIGUSR1, then exit 0 like the trainer
    "torchrun": """#!/usr/bin/env bash
        printf '%s\\n' "$@" > "$STUB_DIR/torchrun.args"
        if [[ "$STUB_MODE" == exit ]]; then exit 0; fi
        trap 'echo USR1 > "$STUB_DIR/torchrun.signal"; exit 0' USR1
        touch "$STUB_DIR/torchrun.ready"
        for _ in $(seq 600); do sleep 0.05; done
        exit 3
    """,
    "scontrol": """#!/usr/bin/env bash
        echo "$@" >> "$STUB_DIR/scontrol.calls"
    """,
    "python": f"""#!/usr/bin/env bash
        exec {shlex.quote(sys.executable)} "$@"
    """,
}


def _stub_env(tmp_path: Path, mode: str, **slurm) -> dict:
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir()
    for name, body in STUBS.items():
        p = stub_dir / name
        p.write_text(textwrap.dedent(body).lstrip())
        p.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "NCCL_"))}
    env.update({"PATH": f"{stub_dir}:{env['PATH']}", "VENV": "", "STUB_DIR": str(stub_dir), "STUB_MODE": mode,
                "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_JOB_NAME": "fg", **slurm})
    return env


def test_multinode_sbatch_forwards_usr1_and_requeues(tmp_path):
    env = _stub_env(tmp_path, "wait", **fake_slurm_env(0, per_node=1, SLURM_GPUS_ON_NODE="8"))
    proc = subprocess.Popen(["bash", str(LAUNCHERS / "slurm_multinode.sbatch"), "trainer.steps=7"], env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stub = tmp_path / "bin"
    deadline = time.monotonic() + 20
    while not (stub / "torchrun.ready").exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "torchrun stub never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 does
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert (stub / "torchrun.signal").read_text().strip() == "USR1", out
    args = (stub / "torchrun.args").read_text().splitlines()
    assert args[:12] == ["--nnodes", "2", "--nproc_per_node", "8", "--node_rank", "0", "--rdzv_backend", "c10d",
                         "--rdzv_endpoint", "gpu-01:24242", "--rdzv_id", "4242"], args
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in args
    i = args.index("-m")
    assert args[i:] == ["-m", "fastgrpo.cli.train", "trainer.output_dir=outputs/fg-4242", "checkpoint.resume=auto",
                        "trainer.steps=7"]
    assert (stub / "scontrol.calls").read_text().split() == ["requeue", "4242"]
    assert "requeueing job 4242" in out


def test_1node_sbatch_runs_torchrun_standalone_and_does_not_requeue(tmp_path):
    env = _stub_env(tmp_path, "exit", SLURM_JOB_ID="77", SLURM_GPUS_ON_NODE="8")
    proc = subprocess.run(["bash", str(LAUNCHERS / "slurm_1node.sbatch"), "model=small"], check=False, env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    args = (tmp_path / "bin" / "torchrun.args").read_text().splitlines()
    assert args[:3] == ["--standalone", "--nnodes=1", "--nproc-per-node=8"], args
    assert args[-4:] == ["fastgrpo.cli.train", "trainer.output_dir=outputs/fg-77", "checkpoint.resume=auto",
                         "model=small"]
    assert not (tmp_path / "bin" / "scontrol.calls").exists()


# ---- preemption ----------------------------------------------------------------------------------


def test_guard_records_the_signal_and_restores_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    guard = PreemptionGuard()
    with guard:
        assert guard.installed and not guard.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing, kills nothing
        deadline = time.monotonic() + 5
        while not guard.requested and time.monotonic() < deadline:
            time.sleep(0.01)
        assert guard.received == signal.SIGUSR1 and guard.should_stop()
    assert signal.getsignal(signal.SIGUSR1) is before and not guard.installed


_AGREE_WORKER = """
import os, sys, torch.distributed as dist
from fastgrpo.preemption import PreemptionGuard
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
g = PreemptionGuard()
first = g.should_stop()          # nobody signalled
if rank == 1:
    g.received = 15              # as if SIGTERM had reached rank 1 only
second = g.should_stop()
print(f"{rank}:{first}:{second}")
dist.destroy_process_group()
"""


def test_every_rank_agrees_to_stop(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _AGREE_WORKER, str(r), str(tmp_path / "store")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sorted(o.strip() for o, _ in outs) == ["0:False:True", "1:False:True"]


@pytest.fixture
def one_thread():
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared machine: one thread is fastest
    yield
    torch.set_num_threads(old)


def test_trainer_preempted_mid_run_checkpoints_and_resumes(tmp_path, one_thread):
    """SIGUSR1 during step 2 of 3: the step finishes, step 2 is checkpointed, the MLflow run ends KILLED
    (tag fastgrpo.preempted=true), handlers are restored; resume=auto runs step 3 and finishes."""
    from mlflow import MlflowClient
    from test_trainer_e2e import compose_config  # the real Hydra config with the e2e tests' TINY overrides

    from fastgrpo.trainer import GRPOTrainer, Preempted

    opts = ("trainer.steps=3", "warmup.enabled=false", "algo.kl_beta=0", "trainer.eval_size=4",
            "rollout.max_new_tokens=8", "checkpoint.keep_last=5")
    before = signal.getsignal(signal.SIGUSR1)
    trainer = GRPOTrainer(compose_config(tmp_path, *opts))
    real_step = trainer.train_step

    def step_then_signal():
        if trainer.step == 1:  # inside step 2
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_step()

    trainer.train_step = step_then_signal
    with pytest.raises(Preempted) as info:
        trainer.run()
    assert (info.value.step, info.value.signal) == (2, "SIGUSR1")
    assert trainer.step == 2
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002"]
    assert info.value.checkpoint == ckpts / "step_00000002"
    assert not (tmp_path / "run" / "summary.json").exists()
    assert signal.getsignal(signal.SIGUSR1) is before
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "KILLED"
    assert run.data.tags["fastgrpo.preempted"] == "true" and run.data.tags["fastgrpo.preempted_at_step"] == "2"

    resumed = GRPOTrainer(compose_config(tmp_path, *opts, "checkpoint.resume=auto"))
    summary = resumed.run()
    assert summary["steps"] == 3
    assert sorted(h["step"] for h in resumed.history if "reward/mean" in h) == [1, 2, 3]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002", "step_00000003"]
    run = client.get_run(run.info.run_id)  # the same MLflow run, continued and finished
    assert run.info.status == "FINISHED" and run.data.tags["fastgrpo.preempted"] == "false"
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_cli_exits_cleanly_when_preempted(tmp_path, monkeypatch):
    """fastgrpo-train turns Preempted into a normal return (exit code 0: torchrun must not see a failure)."""
    import fastgrpo.trainer as trainer_mod
    from fastgrpo.cli import train as cli

    class PreemptedTrainer:
        def __init__(self, cfg):
            self.cfg = cfg

        def run(self):
            raise trainer_mod.Preempted(2, "SIGUSR1", tmp_path / "ckpt")

    monkeypatch.setattr(trainer_mod, "GRPOTrainer", PreemptedTrainer)
    monkeypatch.setattr(sys, "argv", ["fastgrpo-train", f"trainer.output_dir={tmp_path / 'run'}",
                                      "tracking.enabled=false", "hydra/job_logging=none",
                                      "hydra/hydra_logging=none", "hydra.output_subdir=null"])
    assert cli.main() is None  # no SystemExit
