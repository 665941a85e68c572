"""Every path tinkerd keeps under its data directory (`--data-dir`, default ~/.cache/tinkerd).

```
DATA_DIR/
  tinkerd.sqlite3            the Store (SQLite, unless --store names another; `store.db` owns this name)
  models/                    converted base models (default --model-cache)
  checkpoints/<run>/<kind>/<name>/   save_state, sampler and external weights (a checkpoint row each)
  archives/                  .tar.gz downloads, swept after their links expire
  unloaded/<run>/            the exact state of a parked run (lifecycle)
  snapshots/<run>/<seq_id>/  restore points of the request journal (journal; the folder keeps its
                             older name so data dirs of earlier versions still recover)
  adapters/<run>/v<N>.<gen>/ adapter versions written for an out-of-process sampler (vLLM, FSDP groups)
  jobs/<job>/                a task-level job's data.jsonl, its checked rows.json and runner.log
  files/<file-id>            an uploaded file's bytes (POST /api/v1/files; a row each in the Store)
```
Run ids hold ':' (`<session>:train:<n>`), which becomes '_' in folder names. Knows the layout, not
what is written inside.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def _folder(model_id: str) -> str:
    return model_id.replace(":", "_")


@dataclass(frozen=True)
class DataDir:
    root: Path

    @property
    def models(self) -> Path:
        return self.root / "models"

    def checkpoint(self, model_id: str, kind: str, name: str) -> Path:
        return self.root / "checkpoints" / _folder(model_id) / kind / name

    @property
    def archives(self) -> Path:
        return self.root / "archives"

    @property
    def parked_root(self) -> Path:
        return self.root / "unloaded"

    def parked(self, model_id: str) -> Path:
        """Where the state of a run unloaded after its session lapsed waits for the session to come back."""
        return self.parked_root / _folder(model_id)

    @property
    def restore_points_root(self) -> Path:
        return self.root / "snapshots"  # the on-disk name of earlier versions, kept

    def restore_points(self, model_id: str) -> Path:
        """A run's restore points, one folder per seq_id, and the pointer to the newest."""
        return self.restore_points_root / _folder(model_id)

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    @property
    def files(self) -> Path:
        return self.root / "files"

    @property
    def versions(self) -> Path:
        """Adapter versions written as folders for an out-of-process sampler."""
        return self.root / "adapters"
