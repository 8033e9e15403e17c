"""MLflow experiment tracking (rank 0 only), with names MLflow and every backend store accept.

Design choices (see DESIGN.md sections 5 and 6):

* **Explicit run ids, no fluent state.** Everything goes through :class:`mlflow.MlflowClient`
  with the run id this tracker created, never through ``mlflow.start_run``'s process-global
  active run, so two trackers in one process (tests, a warm-up run then a GRPO run) never
  collide and nothing leaks between them.
* **Only rank 0 talks to MLflow.** Other ranks, and ``TrackingConfig.enabled = False``, get a
  tracker with the same methods that does nothing (``tracker.active`` is False).
* **Tracking URI**: ``cfg.uri``, else ``$MLFLOW_TRACKING_URI``, else
  ``sqlite:///<cwd>/mlflow.db`` (absolute path, resolved when the tracker is built). The MLflow
  file store is in maintenance mode, so for sqlite stores the experiment is created with an
  explicit artifact location (``cfg.artifact_location`` or ``<cwd>/mlartifacts``, as a
  ``file://`` URI). For a tracking server, the server decides unless ``artifact_location`` is set.
* **Metric names** are passed through :func:`sanitize_metric_name` (``reward/mean`` ->
  ``reward.mean``, ``loss(pg)@k/1`` -> ``loss_pg_k.1``). Two raw names that map to one sanitized
  name are reported once with a warning.
* **Non-finite values** are logged as they are: MLflow's SQL store keeps NaN exactly (a loss
  that went NaN is information, and a gap would hide it) and stores +/-inf as +/-1.79e308
  (float max). ``tracker.nonfinite_counts`` counts them per (sanitized) name and a warning is
  printed the first time a name has one. Values that are not numbers (None, strings) are skipped
  with a one-time warning.
* **Failures after start**: a tracking-server hiccup must not kill a multi-hour training run, so
  once a run is started, errors from log_* calls are caught, counted (``tracker.errors``) and
  warned about (the first few), unless the tracker is ``strict`` (tests). Errors while starting
  (bad URI, permissions) always raise: they are configuration errors and should fail fast.
"""

from fastgrpo.tracking.names import (
    MAX_METRICS_PER_BATCH,
    MAX_NAME_LENGTH,
    MAX_PARAM_VALUE_LENGTH,
    MAX_PARAMS_PER_BATCH,
    MAX_TAG_VALUE_LENGTH,
    RUN_STATUSES,
    flatten_config,
    resolve_artifact_location,
    resolve_tracking_uri,
    sanitize_metric_name,
)
from fastgrpo.tracking.tracker import Tracker

__all__ = [
    "MAX_METRICS_PER_BATCH",
    "MAX_NAME_LENGTH",
    "MAX_PARAMS_PER_BATCH",
    "MAX_PARAM_VALUE_LENGTH",
    "MAX_TAG_VALUE_LENGTH",
    "RUN_STATUSES",
    "Tracker",
    "flatten_config",
    "resolve_artifact_location",
    "resolve_tracking_uri",
    "sanitize_metric_name",
]
