"""RADAI_TORCH_THREADS: each worker process takes its share of the cores, not all of them."""

from __future__ import annotations

import SimpleITK as sitk
import torch

from workers.app import WorkerConfig, configure
from workers.models import torch_threads


def test_default_shares_the_cores_among_pool_processes():
    assert torch_threads(0, processes=1, cores=8) == 8
    assert torch_threads(0, processes=2, cores=8) == 4
    assert torch_threads(0, processes=3, cores=2) == 1  # never zero


def test_an_explicit_setting_wins():
    assert torch_threads(3, processes=2, cores=8) == 3


def test_configure_applies_it_to_this_process(tmp_path):
    before = torch.get_num_threads()
    sitk_before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    try:
        configure(
            WorkerConfig(
                database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                broker_url="memory://",
                home=tmp_path,
                torch_threads=1,
            )
        )
        assert torch.get_num_threads() == 1
        # follow-up's registration runs under the same budget
        assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 1
    finally:
        torch.set_num_threads(before)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(sitk_before)
