"""``Tracker``: one MLflow run driven by explicit run id (see the package docstring for the design)."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastgrpo import __version__
from fastgrpo.tracking.names import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_PER_BATCH,
    MAX_TAG_VALUE_LENGTH,
    RUN_STATUSES,
    _jsonable,
    _stringify,
    _to_float,
    _truncate,
    flatten_config,
    resolve_artifact_location,
    resolve_tracking_uri,
    sanitize_metric_name,
)

logger = logging.getLogger("fastgrpo.tracking")  # the name users filter on

_MAX_WARNED_ERRORS = 5

# --------------------------------------------------------------------------------------------
# Tracker
# --------------------------------------------------------------------------------------------


class Tracker:
    """One MLflow run, driven by explicit run id. Inactive trackers accept every call and do nothing.

    Typical use::

        tracker = Tracker.from_config(cfg.tracking, run_dir, rank=rank)
        with tracker.start(run_name, flatten_config(cfg)):
            tracker.log_metrics({"reward/mean": 0.4}, step=1)
        # the run ends FINISHED, or FAILED if the block raised (KILLED on KeyboardInterrupt)
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = "fastgrpo",
        artifact_location: str | None = None,
        run_dir: Path | None = None,
        active: bool = True,
        strict: bool = False,
    ):
        self.active = bool(active)
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment
        self.artifact_location = artifact_location
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.strict = strict
        self.errors = 0
        self.nonfinite_counts: dict[str, int] = {}
        self._client = None
        self._experiment_id: str | None = None
        self._run_id: str | None = None
        self._finished = False
        self._name_map: dict[str, str] = {}  # sanitized -> first raw name seen
        self._warned: set[str] = set()

    # ---- construction ----------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: Any, run_dir: Path, rank: int = 0, strict: bool = False) -> Tracker:
        """Build the tracker for this process from a ``TrackingConfig``.

        Rank != 0 or ``cfg.enabled`` False: an inactive tracker (same methods, no effect, MLflow
        is not even imported). The URI and artifact location are resolved here, relative to the
        current working folder.
        """
        if rank != 0 or not cfg.enabled:
            return cls(experiment=cfg.experiment, run_dir=run_dir, active=False)
        uri = resolve_tracking_uri(cfg.uri)
        return cls(
            tracking_uri=uri,
            experiment=cfg.experiment,
            artifact_location=resolve_artifact_location(uri, cfg.artifact_location),
            run_dir=run_dir,
            active=True,
            strict=strict,
        )

    @classmethod
    def noop(cls) -> Tracker:
        return cls(active=False)

    # ---- properties ------------------------------------------------------------------------

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @property
    def experiment_id(self) -> str | None:
        return self._experiment_id

    @property
    def client(self):
        """The underlying ``MlflowClient`` (None for an inactive tracker)."""
        if not self.active:
            return None
        if self._client is None:
            from mlflow import MlflowClient  # lazy: MLflow is slow to import

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    @property
    def running(self) -> bool:
        return self.active and self._run_id is not None and not self._finished

    # ---- lifecycle -------------------------------------------------------------------------

    def _get_or_create_experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        client = self.client
        exp = client.get_experiment_by_name(self.experiment_name)
        if exp is None:
            try:
                return client.create_experiment(
                    self.experiment_name, artifact_location=self.artifact_location
                )
            except MlflowException:
                exp = client.get_experiment_by_name(self.experiment_name)  # created concurrently
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id

    def start(
        self,
        run_name: str | None = None,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        run_id: str | None = None,
    ) -> Tracker:
        """Create the run (or reopen ``run_id``, e.g. on resume) and log ``params``.

        ``params`` may be nested (it goes through :func:`flatten_config`); keys are sanitized.
        When reopening a run, parameters it already has with the same value are skipped and a
        changed value is reported with a warning (MLflow parameters are immutable) and recorded
        as the tag ``resume.changed_param.<key>``. Returns ``self`` so it can be used in ``with``.
        """
        if not self.active:
            return self
        if self.running:
            raise RuntimeError(f"tracker already has a running run {self._run_id}")
        from mlflow.entities import Param, RunTag

        client = self.client
        self._experiment_id = self._get_or_create_experiment()
        base_tags = {"fastgrpo.version": __version__}
        base_tags.update(tags or {})
        existing: dict[str, str] = {}
        if run_id is not None:
            run = client.get_run(run_id)
            existing = dict(run.data.params)
            client.update_run(run_id, status="RUNNING")
            self._run_id = run_id
        else:
            run = client.create_run(self._experiment_id, run_name=run_name)
            self._run_id = run.info.run_id
        self._finished = False
        try:
            new_params: dict[str, str] = {}
            changed: dict[str, str] = {}
            for sk, v in self._flat_params(params).items():
                if sk in existing:
                    if existing[sk] != v:
                        changed[sk] = f"{existing[sk]} -> {v}"
                    continue
                new_params[sk] = v
            if changed:
                logger.warning(
                    "resumed MLflow run %s: parameters changed (kept old values): %s", run_id, changed
                )
                base_tags.update({f"resume.changed_param.{k}": v for k, v in changed.items()})
            plist = [Param(k, v) for k, v in new_params.items()]
            for i in range(0, len(plist), MAX_PARAMS_PER_BATCH):
                client.log_batch(self._run_id, params=plist[i : i + MAX_PARAMS_PER_BATCH])
            self._log_tags(base_tags, RunTag)
        except BaseException:
            # Never leave a run RUNNING forever because its parameters could not be logged.
            self.finish("FAILED")
            raise
        self._write_run_file(run_name)
        return self

    def _flat_params(self, params: Any) -> dict[str, str]:
        """Flatten and sanitize; two keys that sanitize to one name keep the first (warning)."""
        out: dict[str, str] = {}
        for k, v in (flatten_config(params) if params else {}).items():
            sk = sanitize_metric_name(k)
            if sk in out:
                self._warn_once(
                    f"param-collision:{k}", "parameter %r maps to %r, already logged: skipped", k, sk
                )
                continue
            out[sk] = v
        return out

    def _write_run_file(self, run_name: str | None) -> None:
        if self.run_dir is None:
            return
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            info = {
                "tracking_uri": self.tracking_uri,
                "experiment": self.experiment_name,
                "experiment_id": self._experiment_id,
                "run_id": self._run_id,
                "run_name": run_name,
            }
            (self.run_dir / "mlflow_run.json").write_text(json.dumps(info, indent=2) + "\n")
        except OSError as e:  # informational only
            logger.warning("could not write %s/mlflow_run.json: %s", self.run_dir, e)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with FINISHED, FAILED or KILLED. Idempotent; no-op if nothing is running."""
        if status not in RUN_STATUSES:
            raise ValueError(f"status must be one of {RUN_STATUSES}, got {status!r}")
        if not self.running:
            return
        try:
            self.client.set_terminated(self._run_id, status=status)
        except Exception as e:  # noqa: BLE001 (tracking must not kill training; see module doc)
            self._failed("finish", e)
        finally:
            self._finished = True

    def __enter__(self) -> Tracker:  # noqa: PYI034
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.finish("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finish("KILLED")
        else:
            self.finish("FAILED")
        return False  # never swallow the exception

    # ---- logging ---------------------------------------------------------------------------

    def _failed(self, what: str, e: BaseException) -> None:
        self.errors += 1
        if self.strict:
            raise e
        if self.errors <= _MAX_WARNED_ERRORS:
            logger.warning("MLflow %s failed (%d so far; training continues): %r", what, self.errors, e)

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(msg, *args)

    def _name(self, raw: str) -> str:
        s = sanitize_metric_name(raw)
        first = self._name_map.setdefault(s, raw)
        if first != raw:
            self._warn_once(f"collision:{s}:{raw}", "metric names %r and %r both map to %r", first, raw, s)
        return s

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log a dict of scalars at ``step`` in one ``log_batch`` (chunked at MLflow's 1000 limit)."""
        if not self.running or not metrics:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = []
        seen: set[str] = set()
        for raw, value in metrics.items():
            v = _to_float(value)
            if v is None:
                self._warn_once(f"nonnum:{raw}", "metric %r has a non-numeric value %r: skipped", raw, value)
                continue
            name = self._name(raw)
            if name in seen:  # two raw names, one sanitized name, one step: keep the first
                continue
            seen.add(name)
            if not math.isfinite(v):
                self.nonfinite_counts[name] = self.nonfinite_counts.get(name, 0) + 1
                self._warn_once(f"nonfinite:{name}", "metric %r is non-finite (%r) at step %d", raw, v, step)
            batch.append(Metric(name, v, ts, int(step)))
        try:
            for i in range(0, len(batch), MAX_METRICS_PER_BATCH):
                self.client.log_batch(self._run_id, metrics=batch[i : i + MAX_METRICS_PER_BATCH])
        except Exception as e:  # noqa: BLE001 (tracking must not kill training; see module doc)
            self._failed("log_metrics", e)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log more parameters (nested allowed). MLflow parameters cannot change once logged."""
        if not self.running or not params:
            return
        from mlflow.entities import Param

        plist = [Param(k, v) for k, v in self._flat_params(params).items()]
        try:
            for i in range(0, len(plist), MAX_PARAMS_PER_BATCH):
                self.client.log_batch(self._run_id, params=plist[i : i + MAX_PARAMS_PER_BATCH])
        except Exception as e:  # noqa: BLE001 (tracking must not kill training; see module doc)
            self._failed("log_params", e)

    def _log_tags(self, tags: Mapping[str, Any], RunTag) -> None:
        items = [
            RunTag(
                sanitize_metric_name(k) if not str(k).startswith("mlflow.") else str(k),
                _truncate(_stringify(v), MAX_TAG_VALUE_LENGTH),
            )
            for k, v in tags.items()
        ]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self._run_id, tags=items[i : i + MAX_PARAMS_PER_BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (keys sanitized except MLflow's own ``mlflow.*`` system tags)."""
        if not self.running or not tags:
            return
        from mlflow.entities import RunTag

        try:
            self._log_tags(tags, RunTag)
        except Exception as e:  # noqa: BLE001 (tracking must not kill training; see module doc)
            self._failed("set_tags", e)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a folder's contents, under ``artifact_path`` (None: the root)."""
        if not self.running:
            return
        p = Path(path)
        try:
            if p.is_dir():
                self.client.log_artifacts(self._run_id, str(p), artifact_path)
            else:
                self.client.log_artifact(self._run_id, str(p), artifact_path)
        except Exception as e:  # noqa: BLE001 (tracking must not kill training; see module doc)
            self._failed("log_artifact", e)

    def log_dict(self, d: Mapping[str, Any], filename: str) -> None:
        """Store ``d`` as a JSON (``.json``) or YAML (``.yaml``/``.yml``) artifact."""
        if not self.running:
            return
        try:
            self.client.log_dict(self._run_id, _jsonable(d), filename)
        except Exception as e:  # noqa: BLE001 (tracking must not kill training; see module doc)
            self._failed("log_dict", e)

    def log_image(self, png_path: str | Path, artifact_path: str | None = "plots") -> None:
        """Upload an image file (e.g. from :func:`fastgrpo.plots.plot_training_curves`)."""
        self.log_artifact(png_path, artifact_path)

    def log_figure(self, figure: Any, filename: str = "plots/figure.png") -> None:
        """Upload a matplotlib figure, or an existing image file (then ``filename``'s folder is used)."""
        if not self.running:
            return
        if isinstance(figure, (str, Path)):
            folder = str(Path(filename).parent)
            self.log_artifact(figure, None if folder in ("", ".") else folder)
            return
        try:
            self.client.log_figure(self._run_id, figure, filename)
        except Exception as e:  # noqa: BLE001 (tracking must not kill training; see module doc)
            self._failed("log_figure", e)
