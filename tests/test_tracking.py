"""Tracking (MLflow, sqlite store) and training-curve plots."""

from __future__ import annotations

import math
import uuid
from pathlib import Path

import pytest

from fastgrpo.config import FastGRPOConfig, TrackingConfig
from fastgrpo.plots import plot_training_curves
from fastgrpo.tracking import (
    MAX_PARAM_VALUE_LENGTH,
    Tracker,
    flatten_config,
    resolve_artifact_location,
    resolve_tracking_uri,
    sanitize_metric_name,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---- one sqlite store for the whole module (creating its tables costs ~1.5 s) ----------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    uri = "sqlite:///" + str((root / "mlflow.db").resolve())
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return {"uri": uri, "root": root, "client": client, "artifacts": str(root / "artifacts")}


def _cfg(store, **kw) -> TrackingConfig:
    kw.setdefault("experiment", f"exp-{uuid.uuid4().hex[:8]}")
    return TrackingConfig(uri=store["uri"], artifact_location=store["artifacts"], **kw)


# ---- names and params ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("loss(pg)@k/1", "loss_pg_k.1"),
        ("reward/mean", "reward.mean"),
        ("time/generation_share", "time.generation_share"),
        ("a//b", "a.b"),
        ("/leading/slash/", "leading.slash"),
        ("acc@8 (eval)", "acc_8_eval"),
        ("x:y", "x_y"),
        ("kl-k3", "kl-k3"),
        ("λ/β", "unnamed"),
        ("", "unnamed"),
        ("()@", "unnamed"),
        ("..", "unnamed"),
        ("already_fine.name-1", "already_fine.name-1"),
        ("a_/_b", "a.b"),
    ],
)
def test_sanitize_metric_name(raw, expected):
    out = sanitize_metric_name(raw)
    assert out == expected
    assert sanitize_metric_name(out) == out  # idempotent


def test_sanitize_is_accepted_by_mlflow_and_long_names_stay_distinct():
    from mlflow.utils.validation import _validate_metric_name

    weird = ["loss(pg)@k/1", "a b:c", "../x", "x/../y", "名前", "_", "-x-", "a" * 400 + "1", "a" * 400 + "2"]
    outs = [sanitize_metric_name(w) for w in weird]
    for o in outs:
        _validate_metric_name(o)  # raises if MLflow would reject it
        assert 0 < len(o) <= 250
    assert outs[-1] != outs[-2]
    assert sanitize_metric_name(123) == "123"


def test_flatten_nested_config():
    cfg = FastGRPOConfig()
    cfg.backend.deepspeed.config = {"zero": {"stage": 3, "offload": None}, "empty": []}
    cfg.data.system_prompt = "x" * (MAX_PARAM_VALUE_LENGTH + 500)
    flat = flatten_config(cfg)
    assert flat["algo.clip_eps_low"] == "0.1"
    assert flat["algo.group_size"] == "8"
    assert flat["model.path"] == "tiny"
    assert flat["data.synthetic.max_steps"] == "8"
    assert flat["reward.functions.0.name"] == "accuracy"
    assert flat["reward.functions.1.weight"] == "0.2"
    assert flat["optim.betas.1"] == "0.999"
    assert flat["backend.deepspeed.config.zero.stage"] == "3"
    assert flat["backend.deepspeed.config.zero.offload"] == "None"
    assert flat["backend.deepspeed.config.empty"] == "[]"
    assert flat["checkpoint.dir"] == "None"
    sp = flat["data.system_prompt"]
    assert len(sp) == MAX_PARAM_VALUE_LENGTH and sp.endswith("chars]") and "truncated" in sp
    assert all(isinstance(v, str) for v in flat.values())
    assert flatten_config({"a": [1, {"b": 2}]}) == {"a.0": "1", "a.1.b": "2"}


def test_uri_resolution(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = resolve_tracking_uri(None)
    assert default == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert default.startswith("sqlite:////")  # absolute path
    assert resolve_artifact_location(default) == (tmp_path.resolve() / "mlartifacts").as_uri()
    assert resolve_artifact_location(default, "rel/arts") == (tmp_path.resolve() / "rel/arts").as_uri()
    assert resolve_artifact_location(default, "s3://bucket/x") == "s3://bucket/x"
    assert resolve_artifact_location("http://server:5000") is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env-server:5000")
    assert resolve_tracking_uri(None) == "http://env-server:5000"
    assert resolve_tracking_uri("sqlite:////x/y.db") == "sqlite:////x/y.db"  # cfg wins over env


# ---- a real sqlite store -------------------------------------------------------------------------


def test_run_round_trip(store, tmp_path):
    cfg = _cfg(store)
    run_dir = tmp_path / "run"
    tracker = Tracker.from_config(cfg, run_dir, rank=0, strict=True)
    assert tracker.active and tracker.run_id is None
    full = FastGRPOConfig()
    steps = [1, 2, 3]
    values = {1: 0.1, 2: 0.25, 3: 0.5}
    with tracker.start("round-trip", full):
        for s in steps:
            tracker.log_metrics(
                {"reward/mean": values[s], "loss(pg)@k/1": -s, "nan_metric": float("nan")}, step=s
            )
        tracker.log_metrics({"inf_metric": float("inf"), "skipped": "text", "none": None}, step=3)
        tracker.set_tags({"host/name": "laptop"})
        note = tmp_path / "note.txt"
        note.write_text("hello")
        tracker.log_artifact(note)
        tracker.log_artifact(note, "sub")
        tracker.log_dict({"a": 1, "p": Path("/x")}, "resolved_config.json")
        png = plot_training_curves([{"step": s, "reward/mean": values[s]} for s in steps], tmp_path / "c.png")
        tracker.log_image(png)
    run_id = tracker.run_id
    assert run_id and not tracker.running

    client = store["client"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "round-trip"
    assert run.info.artifact_uri.startswith(Path(store["artifacts"]).resolve().as_uri())
    assert run.data.params["algo.clip_eps_low"] == "0.1"
    assert run.data.params["reward.functions.0.name"] == "accuracy"
    assert run.data.tags["host.name"] == "laptop"
    assert "fastgrpo.version" in run.data.tags

    hist = sorted(client.get_metric_history(run_id, "reward.mean"), key=lambda m: m.step)
    assert [m.step for m in hist] == steps
    assert [m.value for m in hist] == [values[s] for s in steps]
    hist = sorted(client.get_metric_history(run_id, "loss_pg_k.1"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in hist] == [(1, -1.0), (2, -2.0), (3, -3.0)]
    # NaN is kept as NaN; +inf is stored by MLflow as float max; both are counted.
    assert all(math.isnan(m.value) for m in client.get_metric_history(run_id, "nan_metric"))
    assert client.get_metric_history(run_id, "inf_metric")[0].value > 1e308
    assert tracker.nonfinite_counts == {"nan_metric": 3, "inf_metric": 1}
    assert client.get_metric_history(run_id, "skipped") == []

    root = {f.path for f in client.list_artifacts(run_id)}
    assert {"note.txt", "sub", "resolved_config.json", "plots"} <= root
    assert [f.path for f in client.list_artifacts(run_id, "plots")] == ["plots/c.png"]
    info = (run_dir / "mlflow_run.json").read_text()
    assert run_id in info


def test_resume_same_run(store, tmp_path):
    cfg = _cfg(store)
    t1 = Tracker.from_config(cfg, tmp_path, strict=True)
    t1.start("r", {"a": 1, "b": 2})
    t1.log_metrics({"m": 1.0}, step=1)
    t1.finish("KILLED")
    t2 = Tracker.from_config(cfg, tmp_path, strict=True)
    with t2.start("r", {"a": 1, "b": 3, "c": 4}, run_id=t1.run_id):
        t2.log_metrics({"m": 2.0}, step=2)
    run = store["client"].get_run(t1.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"a": "1", "b": "2", "c": "4"}
    assert run.data.tags["resume.changed_param.b"] == "2 -> 3"
    assert [m.step for m in store["client"].get_metric_history(t1.run_id, "m")] == [1, 2]


def test_two_trackers_in_one_process(store, tmp_path):
    a = Tracker.from_config(_cfg(store), tmp_path / "a", strict=True).start("a")
    b = Tracker.from_config(_cfg(store), tmp_path / "b", strict=True).start("b")
    a.log_metrics({"x": 1.0}, step=0)
    b.log_metrics({"x": 2.0}, step=0)
    a.finish()
    b.finish("KILLED")
    c = store["client"]
    assert a.run_id != b.run_id
    assert c.get_metric_history(a.run_id, "x")[0].value == 1.0
    assert c.get_metric_history(b.run_id, "x")[0].value == 2.0
    assert c.get_run(b.run_id).info.status == "KILLED"


def test_name_collisions_and_extra_params(store, tmp_path, caplog):
    tracker = Tracker.from_config(_cfg(store), tmp_path, strict=True)
    with tracker.start("collide", {"opts": {"a/b": 1, "a.b": 2}}):
        with caplog.at_level("WARNING", logger="fastgrpo.tracking"):
            tracker.log_metrics({"loss(pg)": 1.0, "loss_pg": 2.0}, step=0)
        tracker.log_params({"late": {"x": 3}})
    assert "both map to 'loss_pg'" in caplog.text
    c = store["client"]
    assert [m.value for m in c.get_metric_history(tracker.run_id, "loss_pg")] == [1.0]
    assert c.get_run(tracker.run_id).data.params == {"opts.a.b": "1", "late.x": "3"}


def test_context_manager_marks_failed(store, tmp_path):
    tracker = Tracker.from_config(_cfg(store), tmp_path, strict=True)
    with pytest.raises(RuntimeError, match="boom"), tracker.start("fails", {"x": 1}):
        tracker.log_metrics({"loss": 1.0}, step=0)
        raise RuntimeError("boom")
    assert store["client"].get_run(tracker.run_id).info.status == "FAILED"
    tracker.finish()  # idempotent after the run ended
    assert store["client"].get_run(tracker.run_id).info.status == "FAILED"
    with pytest.raises(ValueError):
        tracker.finish("DONE")


def test_rank1_and_disabled_log_nothing(store, tmp_path):
    cfg = _cfg(store)
    for t in (
        Tracker.from_config(cfg, tmp_path, rank=1),
        Tracker.from_config(_cfg(store, enabled=False), tmp_path),
    ):
        assert not t.active
        with t.start("nothing", {"a": 1}):
            t.log_metrics({"x": 1.0}, step=0)
            t.log_params({"b": 2})
            t.set_tags({"t": 1})
            t.log_dict({"a": 1}, "a.json")
            t.log_artifact(tmp_path)
            t.log_image(tmp_path / "none.png")
            t.log_figure(tmp_path / "none.png")
        assert t.run_id is None and t.client is None
    assert store["client"].get_experiment_by_name(cfg.experiment) is None
    assert not (tmp_path / "mlflow_run.json").exists()


def test_env_var_override(store, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    cfg = TrackingConfig(uri=None, artifact_location=store["artifacts"], experiment="env-exp")
    tracker = Tracker.from_config(cfg, tmp_path, strict=True)
    assert tracker.tracking_uri == store["uri"]
    with tracker.start("from-env"):
        tracker.log_metrics({"x": 1.0}, step=0)
    exp = store["client"].get_experiment_by_name("env-exp")
    assert exp is not None
    assert store["client"].get_run(tracker.run_id).info.experiment_id == exp.experiment_id


def test_default_sqlite_store_in_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = Tracker.from_config(TrackingConfig(), tmp_path / "run", strict=True)
    assert tracker.tracking_uri.startswith("sqlite:////")
    with tracker.start("default"):
        tracker.log_dict({"a": 1}, "a.json")
    assert (tmp_path / "mlflow.db").exists()
    assert list((tmp_path / "mlartifacts").rglob("a.json"))


def test_log_errors_do_not_raise_unless_strict(store, tmp_path):
    tracker = Tracker.from_config(_cfg(store), tmp_path).start("errors")
    tracker.log_artifact(tmp_path / "does-not-exist.txt")
    assert tracker.errors == 1
    tracker.finish()
    strict = Tracker.from_config(_cfg(store), tmp_path, strict=True).start("strict")
    with pytest.raises(Exception, match="does-not-exist"):
        strict.log_artifact(tmp_path / "does-not-exist.txt")
    strict.finish()


# ---- plots ---------------------------------------------------------------------------------------


def _png_ok(path: Path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == PNG_MAGIC


def test_plot_training_curves(tmp_path):
    history = []
    for s in range(1, 11):
        row = {
            "step": s,
            "reward/mean": 0.1 * s,
            "reward/accuracy": 0.05 * s,
            "time/generation_share": 0.9,
            "rollout/mean_accepted_len": 2.0 + 0.1 * s,
        }
        if s % 5 == 0:
            row["eval/accuracy"] = 0.06 * s
        history.append(row)
    history[3]["reward/mean"] = float("nan")  # skipped, not a crash
    out = plot_training_curves(history, tmp_path / "sub" / "curves.png")
    assert out == tmp_path / "sub" / "curves.png" and _png_ok(out)


def test_plot_missing_keys_and_empty(tmp_path):
    partial = plot_training_curves(
        [{"reward/mean": 0.5}, {"reward/mean": 0.7, "other": "x"}], tmp_path / "p.png"
    )
    assert _png_ok(partial)
    empty = plot_training_curves([], tmp_path / "e.png")
    assert _png_ok(empty)
