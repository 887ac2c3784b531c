"""Per-stage peak memory: each stage reports its own peak when asked to."""

from __future__ import annotations

import sys

import pytest
import torch

from mergekit_expert.pipeline import StageClock

MIB = 2**20


@pytest.mark.skipif(sys.platform != "linux", reason="VmHWM is Linux's")
def test_each_stage_reports_its_own_peak(monkeypatch):
    monkeypatch.setenv("MERGEKIT_EXPERT_STAGE_PEAKS", "1")
    clock = StageClock()
    with clock.stage("big"):
        big = torch.ones(300 * MIB // 4)  # 300 MiB of float32, touched
        del big
    with clock.stage("small"):
        small = torch.ones(1024)
        del small
    big, small = clock.stages["big"], clock.stages["small"]
    # The 300 MiB tensor lifts the first stage's peak; the reset at the second
    # stage's start forgets it, so the second stage's peak is ~300 MiB lower.
    assert big["stage_peak_rss_mib"] - small["stage_peak_rss_mib"] > 250


def test_stage_peaks_are_off_by_default(monkeypatch):
    monkeypatch.delenv("MERGEKIT_EXPERT_STAGE_PEAKS", raising=False)
    clock = StageClock()
    with clock.stage("only"):
        pass
    assert "stage_peak_rss_mib" not in clock.stages["only"]
    assert clock.stages["only"]["peak_rss_mib"] > 0
