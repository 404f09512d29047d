"""How `train` hands its MLflow run to the later stages: the run's id in a small JSON file (models/run.json, and
the checkpoint's run.json), and logging into that run afterwards: `evaluate`'s metrics and tags, `render`'s files
and images, waiting for a tracker that is away as the training run does."""
from __future__ import annotations

import json
import time
from pathlib import Path

from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image

from vaelab.data import NOT_FOUND, DamagedInput
from vaelab.stages import StageError
from vaelab.store import open_client, patiently, redacted, store_lock, tracking_uri, transient
from vaelab.tracking import metric_name

IMAGE_STEPS = 60  # snapshot epochs a run logs as images, per key: the store's budget (docs/development.md)


def write_run_id(path: Path, run_id: str) -> None:
    path.write_text(json.dumps({"run_id": run_id}) + "\n")


def read_run_id(path: Path, required: bool = False) -> str | None:
    """The MLflow run id that `write_run_id` recorded in `path`. If the file is missing or is not such a record:
    None (train's checkpoint: a new run starts), or with `required` a DamagedInput that names the file and the cure
    (models/run.json, read by evaluate and render)."""
    try:
        saved = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        problem = NOT_FOUND
    except IsADirectoryError:
        problem = "is a folder, not a file"
    except OSError as error:
        problem = f"cannot be read ({error.strerror})"
    except UnicodeDecodeError:
        problem = "is not JSON (a binary file)"
    except ValueError:  # json.JSONDecodeError
        problem = "is not valid JSON (truncated or damaged)"
    else:
        run_id = saved.get("run_id") if isinstance(saved, dict) else None
        if isinstance(run_id, str) and run_id.isprintable() and run_id.strip():
            return run_id
        problem = "is JSON without a run_id"
    if required:
        raise DamagedInput(path, problem, "train")
    return None


def image_steps(snapshots: int, at_most: int = IMAGE_STEPS) -> list[int]:
    """Which of `snapshots` snapshots (their indices) a run logs as MLflow images: all, or `at_most` spread evenly
    from the first to the last, so that a run's images stay within the store's budget (docs/development.md)."""
    if snapshots <= at_most:
        return list(range(snapshots))
    return sorted({round(i * (snapshots - 1) / (at_most - 1)) for i in range(at_most)})


def _logged_images(client: MlflowClient, run_id: str) -> set[tuple[str, int]]:
    """The (key, step) of the images the run holds: MLflow names each file images/<key>+step+<step>+..., a '/' in
    the key as '~'."""
    names = [Path(item.path).name for item in client.list_artifacts(run_id, "images")]
    return {(key.replace("~", "/"), int(step)) for key, _, step, *_ in (name.split("+") for name in names)}


def add_to_run(run_id_file: Path, waiting: str, metrics: dict[str, float] | None = None,
               artifacts: dict[Path, str | None] | None = None, tags: dict[str, str] | None = None,
               images: dict[str, list[tuple[int, Image.Image]]] | None = None) -> None:
    """Log a later stage's metrics (at step 0, under `metric_name`), tags (settings of that stage: unlike params
    they may change when the stage runs again), files or folders (to their artifact paths) and images (per key,
    (step, image) pairs: MLflow's chart view shows each key as a card with a slider over the steps) into the run
    recorded by `train`, waiting for a tracker that is away as `TrainingRun.end` does. A retry resends the
    same metrics, with the same timestamps, which the store keeps once, and sends only the images the run does
    not hold yet. A missing or damaged `run_id_file` is a
    DamagedInput: the stages check it before their work with `read_run_id(..., required=True)`."""
    run_id = read_run_id(run_id_file, required=True)
    client = open_client()
    now = int(time.time() * 1000)
    batch = [Metric(metric_name(k), float(v), now, 0) for k, v in (metrics or {}).items()]

    def log() -> None:
        try:
            client.get_run(run_id)
        except MlflowException as error:
            if transient(error):
                raise
            store = redacted(tracking_uri())
            raise StageError(f"MLflow run {run_id} (from {run_id_file}) is not in the store {store}; "
                             "re-train to create it there: dvc repro --force train") from None
        with store_lock():
            if batch or tags:
                client.log_batch(run_id, metrics=batch, tags=[RunTag(k, v) for k, v in (tags or {}).items()])
            for path, artifact_path in (artifacts or {}).items():
                (client.log_artifacts if path.is_dir() else client.log_artifact)(run_id, str(path), artifact_path)
            held = _logged_images(client, run_id) if images else set()
            for key, series in (images or {}).items():
                for step, image in series:
                    if (key, step) not in held:
                        client.log_image(run_id, image, key=key, step=step, synchronous=True)

    patiently(log, waiting, run_id)
