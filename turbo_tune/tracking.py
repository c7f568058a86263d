"""MLflow, the Trainer's metrics reporter: checked before the model loads, never in the way of training or of the
final save, and one MLflow run per output folder, continued when the run resumes."""

import importlib.util
import json
import logging
import os
import urllib.error
import urllib.request
from contextlib import contextmanager, suppress
from pathlib import Path

from transformers import TrainerState
from transformers.integrations import MLflowCallback

from turbo_tune.arguments import TurboTuneConfig
from turbo_tune.errors import ConfigError

logger = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"
PROBE_TIMEOUT_S = 5
# MLflow's HTTP defaults (7 retries with exponential backoff, 120 s timeout) stall a run for minutes per call once the
# server is gone; these bound a failing call to about half a minute. Variables the user sets win.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def reports_to_mlflow(config: TurboTuneConfig) -> bool:
    return "mlflow" in (config.report_to or [])


def reporting_run_id(args: TurboTuneConfig, state: TrainerState) -> str | None:
    """The MLflow run the reporting callback started (at train begin, it runs before ours), on the main process;
    None when not reporting to MLflow or when MLflow fails (it must never stop training)."""
    if not (state.is_world_process_zero and reports_to_mlflow(args)):
        return None
    try:
        import mlflow

        run = mlflow.active_run()
    except Exception:  # noqa: BLE001
        return None
    return run.info.run_id if run is not None else None


def configure_mlflow(config: TurboTuneConfig) -> None:
    """A local store in ./mlruns (SQLite: MLflow's file store is retired) unless MLFLOW_TRACKING_URI says otherwise;
    a tracking server that does not answer stops the run here, before the model loads."""
    if not reports_to_mlflow(config):
        return
    if "MLFLOW_TRACKING_URI" not in os.environ:
        store = Path("mlruns").resolve()
        store.mkdir(exist_ok=True)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
    os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", "turbo-tune")
    if importlib.util.find_spec("psutil") is not None:  # MLflow's system metrics: CPU, memory, GPU (nvidia-ml-py)
        os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true")
    for name, value in HTTP_LIMITS.items():
        os.environ.setdefault(name, value)
    uri = os.environ["MLFLOW_TRACKING_URI"]
    if uri.startswith(("http://", "https://")):
        check_reachable(uri)


def check_reachable(uri: str) -> None:
    """Any HTTP answer will do (an error status too: the server is there); no answer within seconds is a refusal."""
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise ConfigError(
            f"MLFLOW_TRACKING_URI {uri} does not answer ({reason}). Start the tracking server, point "
            "MLFLOW_TRACKING_URI at a running one, or pass --report_to none."
        ) from None


def continue_mlflow_run(output_dir: str) -> None:
    """On resume, log into the MLflow run the folder's first run started (transformers' MLflowCallback and
    mlflow.start_run take MLFLOW_RUN_ID), if it lives in the same tracking store."""
    run_file = Path(output_dir) / RUN_FILE
    if "MLFLOW_RUN_ID" in os.environ or not run_file.is_file():
        return
    saved = json.loads(run_file.read_text())
    if saved.get("tracking_uri") == os.environ.get("MLFLOW_TRACKING_URI"):
        os.environ["MLFLOW_RUN_ID"] = saved["run_id"]
        logger.info("MLflow: continuing run %s of %s.", saved["run_id"], output_dir)


class ResilientMLflowCallback(MLflowCallback):
    """transformers' MLflowCallback, except that a tracking store that fails never stops or stalls training: the
    first failure is logged once and MLflow logging stops for the rest of the run.

    Over HTTP, metrics are sent as they come (not through MLflow's background queue, which would retry every
    queued batch when the run ends and hold back the final save), with the short limits of HTTP_LIMITS.
    """

    def __init__(self) -> None:
        super().__init__()
        self._failed = False

    def setup(self, args, state, model) -> None:
        with self._guard("starting the run"):
            super().setup(args, state, model)
            self._async_log = self._async_log and not str(self._tracking_uri).startswith(("http://", "https://"))
            if state.is_world_process_zero and self._ml_flow.active_run() is not None:
                self._remember_run(Path(args.output_dir))
        self._initialized = True  # even after a failure: transformers would otherwise set up again at every log

    def on_log(self, args, state, control, logs, model=None, **kwargs) -> None:
        if not self._failed:
            with self._guard(f"logging step {state.global_step}"):
                super().on_log(args, state, control, logs, model=model, **kwargs)

    def on_save(self, args, state, control, **kwargs) -> None:
        if not self._failed:
            with self._guard(f"logging checkpoint-{state.global_step}"):
                super().on_save(args, state, control, **kwargs)

    def on_train_end(self, args, state, control, **kwargs) -> None:
        if not self._failed:
            with self._guard("ending the run"):
                super().on_train_end(args, state, control, **kwargs)

    def _remember_run(self, output_dir: Path) -> None:
        run = self._ml_flow.active_run()
        record = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                  "tracking_uri": os.environ.get("MLFLOW_TRACKING_URI")}
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / RUN_FILE).write_text(json.dumps(record) + "\n")

    @contextmanager
    def _guard(self, action: str):
        try:
            yield
        except Exception as error:  # whatever the store raises (connection, HTTP, database) must not stop training
            self._failed = True
            logger.warning("MLflow failed while %s (%s: %s); training goes on without MLflow logging. The metrics "
                           "stay in the console log and in trainer_state.json.", action, type(error).__name__,
                           str(error).splitlines()[0] if str(error) else "")
            self._abandon_run()

    def _abandon_run(self) -> None:
        """Leave MLflow's active run without waiting on the store: one attempt at marking it failed, no retries (so
        MLflow's own exit handler finds nothing left to end)."""
        previous = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        try:
            with suppress(Exception):  # the store is already known to be failing
                if self._ml_flow.active_run() is not None:
                    self._ml_flow.end_run(status="FAILED")
        finally:
            if previous is None:
                os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
            else:
                os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = previous
        self._auto_end_run = False
