"""The /proc readers of mergekit_expert.memory and the per-stage clock built on them."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from mergekit_expert import memory

MIB = 2**20
linux = pytest.mark.skipif(sys.platform != "linux", reason="/proc is Linux's")


@linux
def test_status_fields_of_this_and_of_no_process():
    fields = memory.status_bytes(os.getpid(), ("VmRSS", "VmHWM", "NoSuchField"))
    assert set(fields) == {"VmRSS", "VmHWM"}
    assert 0 < fields["VmRSS"] <= fields["VmHWM"]
    assert memory.peak_rss_bytes() > 0
    assert fields["VmRSS"] % 1024 == 0, "the kernel's kB, in bytes"
    assert memory.status_bytes(2**22 + 12345, ("VmRSS",)) == {}  # above pid_max


@linux
def test_the_stage_reset_is_opt_in_and_forgets_an_earlier_peak(monkeypatch):
    monkeypatch.delenv(memory.STAGE_PEAKS, raising=False)
    assert not memory.reset_stage_peak()
    big = torch.ones(100 * MIB // 4)  # 100 MiB of float32, touched
    del big
    before = memory.stage_peak_bytes()
    monkeypatch.setenv(memory.STAGE_PEAKS, "1")
    assert memory.reset_stage_peak()
    # The reset puts VmHWM back to the current RSS: ~100 MiB below the peak.
    assert before - memory.stage_peak_bytes() > 80 * MIB


@linux
def test_each_stage_reports_its_own_peak(monkeypatch):
    monkeypatch.setenv("MERGEKIT_EXPERT_STAGE_PEAKS", "1")
    clock = memory.StageClock()
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
    clock = memory.StageClock()
    with clock.stage("only"):
        pass
    assert "stage_peak_rss_mib" not in clock.stages["only"]
    assert clock.stages["only"]["peak_rss_mib"] > 0
