"""The models a worker process runs, loaded once per process from the configured references.

References come from `RADAI_SEGMENT_MODEL` and `RADAI_SCREEN_MODEL`: `NAME@VERSION` from the
registry shipped in `ml/models/`, or `torchscript:PATH` for an external model with its card beside
it. `RADAI_DEVICE` places them: `cuda` needs a GPU, `auto` uses one when torch sees it.
`RADAI_TORCH_THREADS` sets torch's threads per worker process; unset, each process takes its
share of the host's cores among the live worker processes there (`workers/host_share.py`).
Once loaded, a process's models stay on their device for every later task.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import SimpleITK as sitk
import torch

from ml.runtime import registry
from ml.runtime.registry import LoadedModel
from workers.host_share import host_cores


@dataclass(frozen=True)
class ModelSet:
    segmenter: LoadedModel
    screener: LoadedModel
    device: str

    @property
    def versions(self) -> dict[str, str]:
        return {
            self.segmenter.name: self.segmenter.version,
            self.screener.name: self.screener.version,
        }

    @property
    def pipeline_tag(self) -> str:
        """Short tag of the model versions for the job key (the column holds 32 characters)."""
        return f"{self.segmenter.version}+{self.screener.version}"[:24]


_lock = threading.Lock()
_cache: dict[tuple[str, str, str], ModelSet] = {}


def torch_threads(setting: int, processes: int, cores: int | None = None) -> int:
    """Threads for torch in one worker process: the setting, or else the host's cores shared
    among the worker processes there (`processes`, at least one each). Without this every
    process takes every core and two workers on two cores ran at 0.9x of one
    (docs/PERFORMANCE.md)."""
    if setting > 0:
        return setting
    cores = cores or host_cores()
    return max(1, cores // max(1, processes))


def set_torch_threads(n: int) -> None:
    """Torch's threads, and SimpleITK's (follow-up registration), which would take every core."""
    torch.set_num_threads(n)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)


def resolve_device(device: str) -> str:
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("RADAI_DEVICE=cuda but torch sees no CUDA device")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_models(segment_ref: str, screen_ref: str, device: str = "auto") -> ModelSet:
    """Load (once per process) and check that each model does the task it is configured for."""
    key = (segment_ref, screen_ref, device)
    with _lock:
        if key not in _cache:
            where = resolve_device(device)
            seg = registry.load(segment_ref)
            scr = registry.load(screen_ref)
            for model, task in ((seg, "segment"), (scr, "screen")):
                if model.task != task:
                    raise registry.ModelError(f"{model.ref} is a {model.task} model, not {task}")
                model.net.to(where)
            _cache[key] = ModelSet(seg, scr, where)
        return _cache[key]


_graders: dict[tuple[str, str], LoadedModel] = {}


def load_grader(ref: str, device: str = "auto") -> LoadedModel | None:
    """The malignancy model of `RADAI_MALIGNANCY_MODEL` (loaded once per process); None when the
    setting is empty or `none`."""
    if not ref or ref.lower() == "none":
        return None
    key = (ref, device)
    with _lock:
        if key not in _graders:
            model = registry.load(ref)
            if model.task != "malignancy":
                raise registry.ModelError(f"{model.ref} is a {model.task} model, not malignancy")
            model.net.to(resolve_device(device))
            _graders[key] = model
        return _graders[key]
