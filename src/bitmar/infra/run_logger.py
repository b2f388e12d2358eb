"""Run logging: metrics.jsonl (always), wandb (online/offline/disabled), training.log, figures.

Only rank 0 creates a RunLogger that writes; other ranks get `enabled=False` and every call is a no-op.
A wandb failure is logged once as a warning and wandb is switched off: it never stops training.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
from pathlib import Path
from typing import Any

LOGGER_NAME = "bitmar"


def wandb_credentials_available() -> bool:
    """True when wandb could log online without prompting (env key or `wandb login`'s netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc_path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if not netrc_path.is_file():
        return False
    try:
        return netrc.netrc(str(netrc_path)).authenticators("api.wandb.ai") is not None
    except (netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(requested: str) -> str:
    if requested == "auto":
        return "online" if wandb_credentials_available() else "offline"
    return requested


def setup_text_logging(log_file: Path | None, rank: int) -> logging.Logger:
    """Console + file logging for the `bitmar` logger; non-zero ranks only log warnings to the console."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler()
    console.setFormatter(formatter)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.addHandler(console)
    if log_file is not None and rank == 0:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(formatter)
        logger.addHandler(file_handler)
    logger.propagate = False
    return logger


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


class RunLogger:
    def __init__(
        self,
        output_dir: Path,
        *,
        enabled: bool,
        wandb_mode: str,
        project: str,
        entity: str | None,
        config: dict[str, Any],
        run_name: str | None = None,
        resume_id: str | None = None,
    ) -> None:
        self.enabled = enabled
        self.output_dir = output_dir
        self.log = logging.getLogger(LOGGER_NAME)
        self.metrics_path = output_dir / "logs" / "metrics.jsonl"
        self._wandb = None
        self.wandb_run_id: str | None = None
        self.wandb_mode = resolve_wandb_mode(wandb_mode)
        if not enabled:
            return
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        self._metrics_file = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        if self.wandb_mode != "disabled":
            self._init_wandb(project, entity, config, run_name, resume_id)

    def _init_wandb(
        self, project: str, entity: str | None, config: dict[str, Any], run_name: str | None, resume_id: str | None
    ) -> None:
        try:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(
                project=project,
                entity=entity,
                config=config,
                name=run_name,
                dir=str(self.output_dir),
                mode=self.wandb_mode,
                id=resume_id,
                resume="allow" if resume_id else None,
                settings=wandb.Settings(console="off", silent=True),
            )
            self.wandb_run_id = self._wandb.id
            self.log.info("wandb %s run %s in %s", self.wandb_mode, self._wandb.id, self.output_dir / "wandb")
        except Exception as err:  # graceful degradation: a dashboard problem must not stop training
            reason = f"{type(err).__name__}: {err}"
            self.log.warning("wandb could not start (%s); continuing with metrics.jsonl only", reason)
            self._wandb = None

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled or not metrics:
            return
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._metrics_file.write(json.dumps(record) + "\n")
        self._metrics_file.flush()
        if self._wandb is not None:
            try:
                self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)
            except Exception as err:
                self._disable_wandb(err)

    def log_figure(self, key: str, path: Path, step: int) -> None:
        """Send a saved figure to wandb (the PNG itself is already on disk under plots/)."""
        if not self.enabled or self._wandb is None:
            return
        try:
            import wandb

            self._wandb.log({key: wandb.Image(str(path))}, step=step)
        except Exception as err:
            self._disable_wandb(err)

    def log_summary(self, summary: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._wandb is not None:
            try:
                for key, value in summary.items():
                    self._wandb.summary[key] = _jsonable(value)
            except Exception as err:
                self._disable_wandb(err)

    def _disable_wandb(self, err: Exception) -> None:
        self.log.warning("wandb logging failed (%s: %s); wandb is off for the rest of the run", type(err).__name__, err)
        self._wandb = None

    def close(self) -> None:
        if not self.enabled:
            return
        self._metrics_file.close()
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception as err:
                self.log.warning("wandb finish failed: %s", err)
            self._wandb = None
