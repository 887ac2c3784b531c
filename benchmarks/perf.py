"""Wall time and peak memory of calibration: per stage, the write, and a naive loop.

Three measurements on the ~97.5M-parameter random Llama of ``scale.py`` (base
and the first K = 3 of its noisy experts, float32, cached under
``bench_out/scale/``):

1. Stages. ``mergekit-expert CFG OUT --quiet`` with ``expert_merging_pp``,
   once with ``task_vectors: resident`` and once with ``streamed``, each in a
   fresh measurement process, with ``MERGEKIT_EXPERT_STAGE_PEAKS=1`` so that
   ``report.json`` holds every stage's own peak RSS (the kernel's VmHWM, reset
   at the stage start) next to its wall time.
2. The write. ``mergekit-expert CFG OUT --coefficients ART`` (the artifact of
   run 1) against ``mergekit-yaml`` with ``task_arithmetic`` (weight 0.3) on
   the same models, as whole processes, and ``run_merge`` alone timed inside a
   small child process for both methods; runs alternate, medians are reported.
   The issue's target: expert merging's write within 1.2x task arithmetic.
3. A naive calibration loop, as the paper's release does it: every forward
   builds ``base + sum_k alpha_k * tau_k`` inside the autograd graph and runs
   the model with ``torch.func.functional_call``. Same samples, teacher
   targets, objective (``mergekit_expert.train.sample_loss``), optimizer,
   schedule, batches and number of optimizer steps as stage 1 of run 1; its
   peak RSS (VmHWM reset just before the loop) and mean time per optimizer
   step against stage 1 of ours. The alignment losses at the epoch ends are
   printed side by side as a sanity check (the gradients are the same, so they
   should agree closely).

    python benchmarks/perf.py            # from the repo root; ~5 minutes on 2 cores
    python benchmarks/perf.py --smoke    # a 2-layer toy model, results under bench_out/

Writes ``benchmarks/results/perf.json`` and ``perf.md``. Only the standard
library (and ``scale.py`` beside this file) is imported at module level: this
file is also the measurement process (``perf.py _measure ...``), which must
have the CLI as its only child (``scale.measure_main``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import scale  # beside this file: the script's folder is on sys.path

ROOT = scale.ROOT
EXPERTS = 3
WRITE_TARGET = 1.2  # expert merging's write within 1.2x task_arithmetic's
STAGE_PEAKS = "MERGEKIT_EXPERT_STAGE_PEAKS"  # report each stage's own peak RSS
STAGES = ("teacher", "student_setup", "init_search", "stage1", "stage2", "write")
# 4 samples x 3 experts = 12 samples: optimizer steps of 8 and 4 samples
# (accumulation 8), so 2 steps per epoch and 6 per training stage.
CALIBRATION: dict[str, Any] = {
    "samples_per_expert": 4,
    "epochs": 3,
    "init": 0.3,
    "max_length": 64,
}
SMOKE_MODEL = {
    "hidden": 64,
    "layers": 2,
    "heads": 2,
    "intermediate": 128,
    "vocab_size": 512,
    "experts": EXPERTS,
    "corpus_chars": 300_000,
}


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the models, the runs and the results of one benchmark live."""

    models: Path  # scale.py's model cache
    runs: Path
    results: Path
    bench: scale.BenchConfig

    def models_of(self) -> tuple[Path, list[Path], list[Path]]:
        """(base, first K experts, their calibration files)."""
        base, experts, data = scale.model_dirs(self.models, self.bench)
        return base, experts[:EXPERTS], data[:EXPERTS]


# --------------------------------------------------------------------------
# Configs and measured processes
# --------------------------------------------------------------------------


def write_expert_config(
    path: Path, layout: Layout, mode: str | None, coefficients: Path | None = None
) -> None:
    """An ``expert_merging_pp`` YAML: calibrating with ``task_vectors: mode``, or
    (``coefficients``) merging from an artifact with no calibration at all."""
    base, experts, data = layout.models_of()
    if coefficients is None:
        models = "".join(
            f"  - model: {json.dumps(str(e))}\n"
            f"    parameters: {{calibration: {json.dumps(str(d))}}}\n"
            for e, d in zip(experts, data)
        )
        extra = f"calibration: {json.dumps({'task_vectors': mode, **CALIBRATION})}\n"
    else:
        models = "".join(f"  - model: {json.dumps(str(e))}\n" for e in experts)
        extra = f"parameters: {{coefficients: {json.dumps(str(coefficients))}}}\n"
    path.write_text(
        "merge_method: expert_merging_pp\n"
        f"base_model: {json.dumps(str(base))}\n"
        f"models:\n{models}"
        "dtype: float32\n"
        f"{extra}"
    )


def loadavg() -> float:
    """The 1-minute load average (other work on the machine slows wall times)."""
    return round(os.getloadavg()[0], 2)


def measured(
    command: list[str], result: Path, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``command`` in a fresh measurement process; wall, peaks and load average."""
    environment = {k: v for k, v in os.environ.items() if k != STAGE_PEAKS}
    before = loadavg()
    subprocess.run(
        [sys.executable, __file__, "_measure", str(result), "--", *command],
        check=True,
        cwd=ROOT,
        env={**environment, **(env or {})},
    )
    data = json.loads(result.read_text())
    return {
        "command": [_short(c) for c in command],
        "wall_s": data["wall_s"],
        "ru_maxrss_mib": data["peak_rss_mib"],
        "sampled_peak_mib": data["sampled_peak_mib"],
        "loadavg_1m": [before, loadavg()],
        "returncode": data["returncode"],
    }


def _short(part: str) -> str:
    """A command part with the repo root made relative (readable JSON)."""
    return part.replace(str(ROOT) + os.sep, "")


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# --------------------------------------------------------------------------
# 1. Per-stage runs
# --------------------------------------------------------------------------


def measured_run(config: Path, out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``mergekit-expert CONFIG OUT`` measured with per-stage peaks; its report."""
    record = measured(
        [*scale.cli_command(), str(config), str(out), "--quiet"],
        out.parent / "measured.json",
        {STAGE_PEAKS: "1"},
    )
    report = json.loads((out / "expert_merging" / "report.json").read_text())
    return record, report


def stage_run(layout: Layout, mode: str) -> dict[str, Any]:
    """One calibrate-and-write run of ``mode``; stages, steps, losses, process peak.

    Keeps the coefficients artifact (for the write comparison) and drops the
    merged model.
    """
    run_dir = fresh_dir(layout.runs / f"stages-{mode}")
    config = run_dir / "merge.yml"
    write_expert_config(config, layout, mode)
    out = run_dir / "merged"
    record, report = measured_run(config, out)
    shutil.copyfile(out / "expert_merging" / "report.json", run_dir / "report.json")
    artifact = run_dir / "coefficients.safetensors"
    shutil.copyfile(out / "expert_merging" / "coefficients.safetensors", artifact)
    shutil.rmtree(out)
    stages = report["stages"]
    # Each stage's reset of VmHWM also resets ru_maxrss, so the process peak is
    # the largest of: the stage peaks, the sampled VmRSS and ru_maxrss.
    candidates = [record["ru_maxrss_mib"], record["sampled_peak_mib"].get("VmRSS", 0)]
    candidates += [s.get("stage_peak_rss_mib", 0) for s in stages.values()]
    record.update(
        {
            "task_vectors": mode,
            "config": _short(str(config)),
            "artifact": _short(str(artifact)),
            "process_peak_rss_mib": max(candidates),
            "stages": stages,
            "training": {
                name: {
                    key: report[name][key]
                    for key in (
                        "optimizer_steps",
                        "step_seconds",
                        "alignment_loss",
                        "epoch_loss",
                        "kept_epoch",
                    )
                }
                for name in ("stage1", "stage2")
                if name in report
            },
            "mean_alpha": report["mean_alpha"],
        }
    )
    for entry in record["training"].values():
        entry["mean_step_s"] = round(statistics.mean(entry["step_seconds"]), 4)
    return record


# --------------------------------------------------------------------------
# 4. Task-vector tiers
# --------------------------------------------------------------------------

# Stage 1 of expert_merging, a few prox steps, no regularizer (the random
# experts' start is the optimum with one, and nothing would step; a fixed
# weight also skips reg_weight: auto's path): what a step costs in each tier.
TIER_CALIBRATION: dict[str, Any] = {
    "samples_per_expert": 4,
    "init": 0.3,
    "max_length": 64,
    "reg_weight": 0.0,
    "max_steps": 4,
}


def bf16_models(layout: Layout) -> tuple[Path, list[Path], list[Path]]:
    """bfloat16 copies of the base and the experts (what hub checkpoints are),
    so the compact and host tiers hold half the bytes of float32."""
    import torch
    from safetensors.torch import load_file, save_file

    base, experts, data = layout.models_of()
    home = layout.runs / "bf16"
    copies = [home / p.name for p in (base, *experts)]
    for source, copy in zip((base, *experts), copies):
        if (copy / "model.safetensors").exists():
            continue
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(source, copy, ignore=shutil.ignore_patterns("*.safetensors"))
        tensors = load_file(source / "model.safetensors")
        save_file(
            {n: t.to(torch.bfloat16) for n, t in tensors.items()},
            copy / "model.safetensors",
            metadata={"format": "pt"},
        )
    return copies[0], copies[1:], data


def tier_run(layout: Layout, tier: str) -> dict[str, Any]:
    """One stage-1 run with ``task_vectors: tier`` on the bf16 checkpoints."""
    base, experts, data = bf16_models(layout)
    run_dir = fresh_dir(layout.runs / f"tier-{tier}")
    config = run_dir / "merge.yml"
    models = "".join(
        f"  - model: {json.dumps(str(e))}\n"
        f"    parameters: {{calibration: {json.dumps(str(d))}}}\n"
        for e, d in zip(experts, data)
    )
    settings = {"task_vectors": tier, **TIER_CALIBRATION}
    config.write_text(
        "merge_method: expert_merging\n"
        f"base_model: {json.dumps(str(base))}\n"
        f"models:\n{models}"
        "dtype: bfloat16\n"
        f"calibration: {json.dumps(settings)}\n"
    )
    out = run_dir / "merged"
    record, report = measured_run(config, out)
    shutil.rmtree(out)
    stage1 = report["stage1"]
    assert report["task_vectors"] == tier, report["task_vectors"]
    return {
        "step_s": round(statistics.median(stage1["step_seconds"]), 4),
        "pass_s": round(statistics.median(stage1["pass_seconds"]), 4),
        "peak_rss_mib": report["stages"]["stage1"].get("stage_peak_rss_mib"),
        "bytes_read_per_step": int(statistics.median(stage1["bytes_read"])),
        "steps": stage1["optimizer_steps"],
        "step_seconds": stage1["step_seconds"],
        "objective": stage1["objective"],
        "loadavg_1m": record["loadavg_1m"],
    }


def tier_runs(layout: Layout) -> dict[str, Any]:
    """Every tier's step against the floor (the passes alone), same models."""
    from mergekit_expert.task_vectors import TIERS

    tiers = {}
    for tier in TIERS:
        tiers[tier] = tier_run(layout, tier)
        entry = tiers[tier]
        print(
            f"tier {tier}: {entry['step_s']:.3f} s/step (passes {entry['pass_s']:.3f}), "
            f"peak {entry['peak_rss_mib']:.0f} MiB, "
            f"{entry['bytes_read_per_step'] / 2**20:.0f} MiB read per step",
            flush=True,
        )
    floor = statistics.median(t["pass_s"] for t in tiers.values())
    resident = tiers["resident"]["step_s"]
    return {
        "tiers": tiers,
        "floor_step_s": round(floor, 4),
        "tier_ratios": {
            name: {
                "vs_resident": round(t["step_s"] / resident, 3),
                "vs_floor": round(t["step_s"] / floor, 3),
            }
            for name, t in tiers.items()
        },
        "tier_calibration": TIER_CALIBRATION,
    }


# --------------------------------------------------------------------------
# 2. The write against task_arithmetic
# --------------------------------------------------------------------------


def write_runs(
    layout: Layout, artifact: Path, calib_config: Path, repeats: int
) -> dict[str, Any]:
    """Whole-process and in-process writes of both methods, alternating."""
    work = fresh_dir(layout.runs / "write")
    base, experts, data = layout.models_of()
    ta_config = work / "task_arithmetic.yml"
    scale.write_config(ta_config, base, experts, data, None)
    em_config = work / "expert_merging_pp.yml"  # artifact only, for run_merge
    write_expert_config(em_config, layout, None, artifact)
    mergekit_yaml = Path(sys.executable).parent / "mergekit-yaml"
    whole: dict[str, list[dict[str, Any]]] = {
        "expert_merging_pp": [],
        "task_arithmetic": [],
    }
    inproc: dict[str, list[dict[str, Any]]] = {
        "expert_merging_pp": [],
        "task_arithmetic": [],
    }
    for repeat in range(repeats):
        order = ["expert_merging_pp", "task_arithmetic"]
        if repeat % 2:
            order.reverse()
        for method in order:
            out = work / f"out-{method}"
            shutil.rmtree(out, ignore_errors=True)
            if method == "task_arithmetic":
                command = [str(mergekit_yaml), str(ta_config), str(out), "--quiet"]
            else:
                command = [
                    *scale.cli_command(),
                    str(calib_config),
                    str(out),
                    "--quiet",
                    "--coefficients",
                    str(artifact),
                ]
            record = measured(command, work / "measured.json")
            if method == "expert_merging_pp":
                report = json.loads(
                    (out / "expert_merging" / "report.json").read_text()
                )
                record["write_stage_s"] = report["stages"]["write"]["wall_s"]
            whole[method].append(record)
            shutil.rmtree(out)
        for method in order:
            out = work / f"out-{method}"
            shutil.rmtree(out, ignore_errors=True)
            config = ta_config if method == "task_arithmetic" else em_config
            result = work / "inprocess.json"
            before = loadavg()
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "_write",
                    str(config),
                    str(out),
                    str(result),
                ],
                check=True,
                cwd=ROOT,
            )
            record = json.loads(result.read_text())
            record["loadavg_1m"] = [before, loadavg()]
            inproc[method].append(record)
            shutil.rmtree(out)
        print(
            f"write repeat {repeat + 1}/{repeats}: whole "
            + ", ".join(f"{m} {whole[m][-1]['wall_s']:.2f}s" for m in whole)
            + "; run_merge "
            + ", ".join(f"{m} {inproc[m][-1]['run_merge_s']:.2f}s" for m in inproc),
            flush=True,
        )
    return summarize_writes(whole, inproc)


def summarize_writes(
    whole: dict[str, list[dict[str, Any]]], inproc: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    """Medians and the three ratios expert_merging_pp / task_arithmetic."""

    def median(records: list[dict[str, Any]], key: str) -> float:
        return round(statistics.median(r[key] for r in records), 3)

    em, ta = "expert_merging_pp", "task_arithmetic"
    medians = {
        "whole_process_s": {m: median(whole[m], "wall_s") for m in whole},
        "whole_process_peak_rss_mib": {
            m: median(whole[m], "ru_maxrss_mib") for m in whole
        },
        "run_merge_s": {m: median(inproc[m], "run_merge_s") for m in inproc},
        "pipeline_write_stage_s": median(whole[em], "write_stage_s"),
    }
    ratios = {
        "whole_process": round(
            medians["whole_process_s"][em] / medians["whole_process_s"][ta], 3
        ),
        "run_merge": round(medians["run_merge_s"][em] / medians["run_merge_s"][ta], 3),
        "pipeline_write_stage_vs_run_merge": round(
            medians["pipeline_write_stage_s"] / medians["run_merge_s"][ta], 3
        ),
    }
    return {
        "whole_process_runs": whole,
        "run_merge_runs": inproc,
        "medians": medians,
        "ratios": ratios,
        "target": WRITE_TARGET,
        "meets_target": {name: value <= WRITE_TARGET for name, value in ratios.items()},
    }


def write_main(config_path: str, out: str, result: str) -> int:
    """Child process: time ``mergekit.merge.run_merge`` alone for one config."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    import mergekit_expert  # noqa: F401  (registers expert_merging / _pp)

    source = Path(config_path).read_text()
    config = MergeConfiguration.model_validate(yaml.safe_load(source))
    options = MergeOptions(quiet=True)
    start = time.perf_counter()
    run_merge(config, out, options=options, config_source=source)
    wall = time.perf_counter() - start
    Path(result).write_text(
        json.dumps(
            {
                "method": config.merge_method,
                "run_merge_s": round(wall, 3),
                "vm_hwm_mib": _vm_hwm_mib(),
            }
        )
    )
    return 0


# --------------------------------------------------------------------------
# 3. Naive calibration: task vectors inside the autograd graph
# --------------------------------------------------------------------------


def _vm_hwm_mib() -> float:
    """This process's peak resident memory since the last reset (VmHWM), MiB."""
    from mergekit_expert.memory import stage_peak_bytes

    return round(stage_peak_bytes() / 2**20, 1)


class FunctionalMerge:
    """The naive student: a base model run with merged weights built in the graph.

    ``forward`` has the signature of ``Student.forward``, so
    ``mergekit_expert.objective.Objective.sample_loss`` computes exactly our
    loss with it.
    """

    def __init__(self, model, taus, raw, activation):
        self.model = model
        self.params = dict(model.named_parameters())  # the base weights
        self.taus = taus  # name -> [tau_1, ..., tau_K], shaped like the weight
        self.raw = raw  # name -> Parameter [K, 1], alpha = activation(raw)
        self.activation = activation

    def alphas(self):
        return {name: self.activation(w) for name, w in self.raw.items()}

    def merged(self):
        """base + sum_k alpha_k tau_k per weight, in the autograd graph of raw."""
        alphas = self.alphas()
        merged = {}
        for name, taus in self.taus.items():
            weight = self.params[name]
            for k, tau in enumerate(taus):
                weight = weight + alphas[name][k, 0] * tau
            merged[name] = weight
        return merged

    def forward(self, input_ids, hidden_layers, inputs=None):
        """Logits [T, V] and the selected hidden states [T, D] of one sequence;
        ``inputs``: further model inputs with a batch dimension, if any."""
        import torch

        output = torch.func.functional_call(
            self.model,
            self.merged(),
            args=(),
            kwargs={
                "input_ids": input_ids[None],
                **(inputs or {}),
                "output_hidden_states": bool(hidden_layers),
                "use_cache": False,
            },
        )
        hidden = [output.hidden_states[i][0] for i in hidden_layers]
        return output.logits[0], hidden


def naive_main(spec_path: str, result_path: str) -> int:
    """Child process: the naive loop for ``steps`` optimizer steps; its peak and times."""
    import math
    import random

    import torch

    from mergekit_expert.config import CalibrationConfig
    from mergekit_expert.data import epoch_order
    from mergekit_expert.memory import release_freed_memory, reset_peak, status_bytes
    from mergekit_expert.objective import Objective, regularizer
    from mergekit_expert.placement import Placement
    from mergekit_expert.records import choose_records, load_records
    from mergekit_expert.student import activation_fns, select_weights
    from mergekit_expert.task_vectors import CheckpointReader
    from mergekit_expert.teacher import TeacherJob, TeacherModel, run_teachers
    from mergekit_expert.train import make_scheduler

    spec = json.loads(Path(spec_path).read_text())
    config = CalibrationConfig.model_validate(spec["calibration"])
    base_dir, expert_dirs = spec["base"], spec["experts"]
    experts = len(expert_dirs)
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    # The same records and teacher targets as the pipeline (untimed set-up).
    records = [
        choose_records(
            load_records(path),
            config.samples_per_expert,
            config.seed + k,
            allow_fewer=config.allow_fewer_samples,
            source=path,
        )
        for k, path in enumerate(spec["data"])
    ]
    placement = Placement()
    model = placement.load(base_dir, student=True)
    blocks = int(model.config.num_hidden_layers)
    hidden_layers = config.hidden_layers or [blocks // 2]
    if config.hidden_weight == 0:
        hidden_layers = []
    cache = run_teachers(
        [TeacherModel(d, d, (d, base_dir)) for d in expert_dirs],
        records,
        TeacherJob(
            placement=placement,
            hidden_layers=tuple(hidden_layers),
            max_length=config.max_length,
            max_new_tokens=config.max_new_tokens,
            top_k=config.teacher_top_k,
        ),
        quiet=True,
    )
    # Base weights stay in the model; the K task vectors of every calibrated
    # weight are held as float32 tensors of the weight's shape.
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    params = dict(model.named_parameters())
    names = select_weights(list(params), config.exclude)
    readers = [CheckpointReader(d, d) for d in expert_dirs]
    taus = {
        name: [
            reader.get(name).view_as(params[name]) - params[name] for reader in readers
        ]
        for name in names
    }
    activation, inverse = activation_fns(config.activation)
    init_values = spec["init"]
    init = [float(activation(torch.tensor(inverse(float(a))))) for a in init_values]
    raw = {
        name: torch.nn.Parameter(torch.tensor([[inverse(a)] for a in init]))
        for name in names
    }
    naive = FunctionalMerge(model, taus, raw, activation)
    setup_s = time.perf_counter() - started

    task_weights = [1.0] * experts
    objective = Objective.from_config(cache, config, hidden_layers, task_weights)
    by_expert = [
        [i for i, e in enumerate(cache.experts) if e == k] for k in range(experts)
    ]
    steps_per_epoch = math.ceil(len(cache.experts) / config.accumulation)
    trainable = list(raw.values())
    optimizer = torch.optim.AdamW(
        trainable, lr=config.lr, weight_decay=config.weight_decay
    )
    scheduler = make_scheduler(optimizer, config, steps_per_epoch * config.epochs)
    rng = random.Random(config.seed)

    def measure() -> float:
        aligned, _ = objective.alignment(naive)
        return aligned

    alignment = [measure()]
    epoch_loss: list[float] = []
    step_seconds: list[float] = []
    steps = spec["steps"]
    release_freed_memory()  # as our training loop does after each step
    rss_before = status_bytes("self", ("VmRSS",))["VmRSS"]
    if not reset_peak():
        raise RuntimeError("cannot reset VmHWM (/proc/self/clear_refs)")
    loop_start = time.perf_counter()
    while len(step_seconds) < steps:
        order = [
            by_expert[k][j] for k, j in epoch_order([len(b) for b in by_expert], rng)
        ]
        epoch_total = 0.0
        for position in range(0, len(order), config.accumulation):
            if len(step_seconds) >= steps:
                break
            batch = order[position : position + config.accumulation]
            start = time.perf_counter()
            for w in trainable:
                w.grad = None
            data_loss = 0.0
            for index in batch:
                expert = cache.experts[index]
                loss = objective.sample_loss(naive, index)
                scaled = task_weights[expert] * loss * experts / len(batch)
                scaled.backward()
                data_loss += float(scaled.detach())
            reg = config.reg_weight * regularizer(naive.alphas(), init)
            reg.backward()
            torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
            optimizer.step()
            scheduler.step()
            release_freed_memory()
            step_seconds.append(round(time.perf_counter() - start, 4))
            epoch_total += data_loss + float(reg.detach())
        else:  # a whole epoch: the same bookkeeping as ours (untimed per step)
            epoch_loss.append(epoch_total / steps_per_epoch)
            alignment.append(measure())
    loop_s = time.perf_counter() - loop_start
    peak = status_bytes("self", ("VmHWM",))["VmHWM"]
    alphas = {name: a.detach() for name, a in naive.alphas().items()}
    mean_alpha = [
        float(torch.cat([a[k] for a in alphas.values()]).mean()) for k in range(experts)
    ]
    result = {
        "optimizer_steps": len(step_seconds),
        "step_seconds": step_seconds,
        "mean_step_s": round(statistics.mean(step_seconds), 4),
        "loop_peak_rss_mib": round(peak / 2**20, 1),
        "rss_before_loop_mib": round(rss_before / 2**20, 1),
        "loop_wall_s": round(loop_s, 2),
        "setup_wall_s": round(setup_s, 2),
        "alignment_loss": alignment,
        "epoch_loss": epoch_loss,
        "mean_alpha_stage1": mean_alpha,
        "calibrated_weights": len(names),
        "calibrated_parameters": sum(params[n].numel() for n in names),
        "hidden_layers": hidden_layers,
        "teacher_targets_mib": round(
            sum(
                t.numel() * t.element_size()
                for i in cache.samples
                for t in cache.target(i).tensors().values()
            )
            / 2**20,
            1,
        ),
        "torch_threads": torch.get_num_threads(),
    }
    Path(result_path).write_text(json.dumps(result))
    return 0


def naive_run(layout: Layout, steps: int) -> dict[str, Any]:
    """The naive loop in a child process, on the models and data of the stage runs."""
    work = fresh_dir(layout.runs / "naive")
    base, experts, data = layout.models_of()
    spec = {
        "base": str(base),
        "experts": [str(e) for e in experts],
        "data": [str(d) for d in data],
        "calibration": {k: v for k, v in CALIBRATION.items() if k != "init"},
        "init": [CALIBRATION["init"]] * len(experts),
        "steps": steps,
    }
    (work / "spec.json").write_text(json.dumps(spec, indent=2))
    result = work / "result.json"
    before = loadavg()
    subprocess.run(
        [sys.executable, __file__, "_naive", str(work / "spec.json"), str(result)],
        check=True,
        cwd=ROOT,
    )
    record = json.loads(result.read_text())
    record["loadavg_1m"] = [before, loadavg()]
    return record


def compare_naive(naive: dict[str, Any], stage_runs: dict[str, dict]) -> dict[str, Any]:
    """Ratios naive / ours (stage 1) of peak RSS and mean time per optimizer step."""
    out: dict[str, Any] = {}
    for mode, run in stage_runs.items():
        ours_peak = run["stages"]["stage1"].get("stage_peak_rss_mib")
        ours_step = run["training"]["stage1"]["mean_step_s"]
        out[mode] = {
            "ours_stage1_peak_rss_mib": ours_peak,
            "ours_mean_step_s": ours_step,
            "peak_ratio": round(naive["loop_peak_rss_mib"] / ours_peak, 3)
            if ours_peak
            else None,
            "step_time_ratio": round(naive["mean_step_s"] / ours_step, 3),
            "ours_alignment_loss": run["training"]["stage1"]["alignment_loss"],
            "ours_epoch_loss": run["training"]["stage1"]["epoch_loss"],
            "max_rel_diff_alignment_loss": _max_rel_diff(
                naive["alignment_loss"], run["training"]["stage1"]["alignment_loss"]
            ),
            "max_rel_diff_epoch_loss": _max_rel_diff(
                naive["epoch_loss"], run["training"]["stage1"]["epoch_loss"]
            ),
        }
    return out


def _max_rel_diff(ours: list[float], theirs: list[float]) -> float | None:
    """Largest |a - b| / |b| over the paired values (None if there are none)."""
    pairs = [(a, b) for a, b in zip(ours, theirs) if b]
    if not pairs:
        return None
    return float(f"{max(abs(a - b) / abs(b) for a, b in pairs):.3g}")


# --------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _load_warning(results: dict[str, Any]) -> list[str]:
    """A warning paragraph naming the measurements taken under other load."""
    limit = results["machine"]["usable_cpus"] + 0.1
    busy = [
        f"stages/{mode}"
        for mode, run in results["stage_runs"].items()
        if max(run["loadavg_1m"]) > limit
    ]
    for kind, key in (
        ("whole process", "whole_process_runs"),
        ("run_merge", "run_merge_runs"),
    ):
        for method, records in results["write"][key].items():
            busy += [
                f"write {kind} {method} #{i + 1}"
                for i, r in enumerate(records)
                if max(r["loadavg_1m"]) > limit
            ]
    if max(results["naive"]["loadavg_1m"]) > limit:
        busy.append("naive loop")
    if not busy:
        return []
    return [
        f"**Measured under other load** (1-minute load average above {limit} "
        f"during): {', '.join(busy)}. Their wall times are inflated; peak memory "
        "is not affected. Rerun on an idle machine for clean timings.",
        "",
    ]


def _fmt_g(value: float | None) -> str:
    return "-" if value is None else f"{value:.2g}"


def markdown(results: dict[str, Any]) -> str:
    """Tables of the three measurements and a paragraph on method and caveats."""
    model, machine, runs = results["model"], results["machine"], results["stage_runs"]
    modes = list(runs)
    lines = [
        "# Calibration cost: stages, write, naive loop",
        "",
        f"{model['parameters'] / 1e6:.1f}M-parameter random Llama "
        f"({model['num_hidden_layers']} blocks, hidden {model['hidden_size']}, "
        f"float32, {model['file_mib']} MiB per model), K = {EXPERTS} experts, "
        f"`expert_merging_pp`, `dtype: float32`, calibration "
        f"`{json.dumps(results['calibration'])}` "
        f"(accumulation 8: steps of 8 and 4 samples). {machine['usable_cpus']} CPUs "
        f"({machine['cpu']}), torch {machine['torch']}, commit "
        f"{str(results['code']['commit'])[:7]}"
        + (
            " + uncommitted edits in `mergekit_expert/`"
            if results["code"]["mergekit_expert_dirty"]
            else ""
        )
        + f". Written by `{results['command']}` in {results['total_wall_s']:.0f} s.",
        "",
        "## 1. Stages (one `mergekit-expert` run per mode)",
        "",
        "Wall s / the stage's own peak RSS MiB (VmHWM reset at the stage start, "
        "`MERGEKIT_EXPERT_STAGE_PEAKS=1`).",
        "",
        "| stage | " + " | ".join(f"{m} wall s | {m} peak MiB" for m in modes) + " |",
        "|---|" + "---|---|" * len(modes),
    ]
    for stage in STAGES:
        if not any(stage in runs[m]["stages"] for m in modes):
            continue
        cells = []
        for m in modes:
            entry = runs[m]["stages"].get(stage)
            cells += [
                _fmt(entry and entry["wall_s"], 2),
                _fmt(entry and entry.get("stage_peak_rss_mib"), 0),
            ]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    cells = []
    for m in modes:
        cells += [_fmt(runs[m]["wall_s"], 2), _fmt(runs[m]["process_peak_rss_mib"], 0)]
    lines.append("| **whole process** | " + " | ".join(cells) + " |")
    steps = runs[modes[0]]["training"]
    lines += [
        "",
        "Optimizer steps: "
        + ", ".join(
            f"{name} {entry['optimizer_steps']}" for name, entry in steps.items()
        )
        + "; mean s per step: "
        + "; ".join(
            f"{m} "
            + ", ".join(
                f"{name} {entry['mean_step_s']:.2f}"
                for name, entry in runs[m]["training"].items()
            )
            for m in modes
        )
        + ". Load average (1 min) before/after: "
        + "; ".join(f"{m} {runs[m]['loadavg_1m']}" for m in modes)
        + ".",
    ]
    write = results["write"]
    med, ratios, ok = write["medians"], write["ratios"], write["meets_target"]
    em, ta = "expert_merging_pp", "task_arithmetic"

    def verdict(name: str) -> str:
        return "meets" if ok[name] else "misses"

    lines += [
        "",
        f"## 2. Write: `expert_merging_pp` from an artifact vs `task_arithmetic` "
        f"(medians of {results['repeats']}, alternating)",
        "",
        "| measurement | expert_merging_pp s | task_arithmetic s | ratio |",
        "|---|---|---|---|",
        f"| whole process (`mergekit-expert --coefficients` vs `mergekit-yaml`) | "
        f"{med['whole_process_s'][em]:.2f} | {med['whole_process_s'][ta]:.2f} | "
        f"**{ratios['whole_process']:.3f}** ({verdict('whole_process')} ≤ "
        f"{WRITE_TARGET}) |",
        f"| `run_merge` alone, in a child process | {med['run_merge_s'][em]:.2f} | "
        f"{med['run_merge_s'][ta]:.2f} | **{ratios['run_merge']:.3f}** "
        f"({verdict('run_merge')} ≤ {WRITE_TARGET}) |",
        f"| `write` stage of `mergekit-expert --coefficients` (report.json) vs "
        f"TA `run_merge` | "
        f"{med['pipeline_write_stage_s']:.2f} | {med['run_merge_s'][ta]:.2f} | "
        f"**{ratios['pipeline_write_stage_vs_run_merge']:.3f}** "
        f"({verdict('pipeline_write_stage_vs_run_merge')} ≤ {WRITE_TARGET}) |",
        "",
        f"Whole-process peak RSS (median): expert_merging_pp "
        f"{med['whole_process_peak_rss_mib'][em]:.0f} MiB, task_arithmetic "
        f"{med['whole_process_peak_rss_mib'][ta]:.0f} MiB. `write` stage of the "
        "calibrating runs (section 1): "
        + ", ".join(
            f"{m} {runs[m]['stages']['write']['wall_s']:.2f} s"
            for m in modes
            if "write" in runs[m]["stages"]
        )
        + ".",
    ]
    naive, comparison = results["naive"], results["naive_vs_ours"]
    lines += [
        "",
        f"## 3. Naive calibration (task vectors in the autograd graph) vs ours, "
        f"{naive['optimizer_steps']} optimizer steps of stage 1",
        "",
        "| implementation | training peak RSS MiB | mean s / optimizer step | "
        "naive / ours peak | naive / ours time per step |",
        "|---|---|---|---|---|",
        f"| naive (`functional_call`, merge per forward) | "
        f"{naive['loop_peak_rss_mib']:.0f} | {naive['mean_step_s']:.3f} | | |",
    ]
    for mode, row in comparison.items():
        lines.append(
            f"| ours, stage 1, {mode} | {_fmt(row['ours_stage1_peak_rss_mib'], 0)} | "
            f"{row['ours_mean_step_s']:.3f} | **{_fmt(row['peak_ratio'], 2)}** | "
            f"**{row['step_time_ratio']:.2f}** |"
        )
    lines += [
        "",
        "Sanity check, alignment loss at the start and after each epoch "
        "(same samples, batches, objective and optimizer):",
        "",
        "| | "
        + " | ".join(f"epoch {i}" for i in range(len(naive["alignment_loss"])))
        + " |",
        "|---|" + "---|" * len(naive["alignment_loss"]),
        "| naive | " + " | ".join(f"{v:.6g}" for v in naive["alignment_loss"]) + " |",
    ]
    for mode, row in comparison.items():
        lines.append(
            f"| ours, {mode} | "
            + " | ".join(f"{v:.6g}" for v in row["ours_alignment_loss"])
            + " |"
        )
    lines += [
        "",
        "Largest relative difference naive vs ours, alignment loss / running "
        "epoch loss: "
        + "; ".join(
            f"{mode} {_fmt_g(row['max_rel_diff_alignment_loss'])} / "
            f"{_fmt_g(row['max_rel_diff_epoch_loss'])}"
            for mode, row in comparison.items()
        )
        + f". Naive mean α per expert after stage 1: "
        f"{', '.join(f'{a:.4f}' for a in naive['mean_alpha_stage1'])}.",
        "",
        *tier_lines(results),
        "## Method and caveats",
        "",
        *_load_warning(results),
        "Every measurement is a fresh process; peaks are the kernel's own "
        "accounting (VmHWM, `ru_maxrss`), and count file-backed pages too "
        "(mergekit's writer and streamed task vectors read the safetensors files "
        "through mmap). Resetting VmHWM per stage also resets `ru_maxrss`, so the "
        "whole-process peak of a stage run is the largest of the stage peaks, "
        "`ru_maxrss` and a 20 ms VmRSS sample. The naive loop runs in its own "
        "process: the same records, teacher targets (`teacher.run_teachers`), "
        "per-sample loss (`objective.Objective.sample_loss`), regularizer, AdamW, cosine "
        "schedule, batch order and number of steps as our stage 1; its peak is "
        "VmHWM reset just before the first step and read after the last, like our "
        "stage-1 peak (reset at the stage start, after the task vectors are "
        "loaded); both include the resident base model and task vectors, and both "
        "cover the epoch-end loss evaluations. The naive process holds its teacher "
        f"targets in memory ({naive.get('teacher_targets_mib', '?')} MiB), ours "
        "reads them from disk. Time per step excludes the epoch-end evaluations "
        "in both. The whole-process write ratio includes everything the CLI does "
        "besides writing (imports, validation, reading the artifact, report, "
        "heatmap, model card); `run_merge` alone compares the two merge methods "
        "inside mergekit's identical streaming writer; the pipeline's `write` "
        "stage is that same `run_merge` call inside the calibrating process "
        "(imports and mergekit's caches already warm), so it can be faster than a "
        "cold `run_merge`. CPU wall times vary with other load (the 1-minute load "
        "average before/after each measurement is in perf.json; on 2 cores one "
        "other busy process roughly doubles them) and with the page cache (the "
        "stage runs read every model file before the write runs). The models are "
        "random (seeded), experts = base + N(0, 0.002²) noise: memory and time "
        "depend on the shapes, not on what the weights encode.",
    ]
    return "\n".join(lines) + "\n"


def tier_lines(results: dict[str, Any]) -> list[str]:
    """The tiers table: step, floor, memory, bytes read."""
    tiers = results.get("tiers")
    if not tiers:
        return []
    floor = results["floor_step_s"]
    ratios = results["tier_ratios"]
    lines = [
        "## 4. Task-vector tiers",
        "",
        "Stage 1 of `expert_merging` (prox, "
        f"`{json.dumps(results['tier_calibration'])}`) on bfloat16 copies of the "
        "same models, once per `task_vectors` tier. Step = one prox trial (rebuild "
        "the merged weights, forward and backward over every sample, project the "
        "gradients), median; the floor is the forward and backward passes alone "
        f"(median over the runs): **{floor:.3f} s**. Peak = stage 1's own peak RSS "
        "(with the tier's tensors already loaded). Bytes read = base and task-"
        "vector bytes the rebuild and projection fetched per step (device memory, "
        "host memory or files). Written by "
        f"`{results.get('tiers_command', results['command'])}`.",
        "",
        "| tier | s / step | × resident | × floor | stage-1 peak MiB | MiB read / step |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in tiers.items():
        lines.append(
            f"| {name} | {entry['step_s']:.3f} | {ratios[name]['vs_resident']:.2f} "
            f"| {ratios[name]['vs_floor']:.2f} | {_fmt(entry['peak_rss_mib'], 0)} "
            f"| {entry['bytes_read_per_step'] / 2**20:.0f} |"
        )
    return [*lines, ""]


def run_all(layout: Layout, repeats: int, command: str) -> dict[str, Any]:
    """Build or reuse the models, run the three measurements, return the results."""
    start = time.perf_counter()
    code_before = scale.code_info()
    model = scale.build_models(layout.models, layout.bench)
    stage_runs = {}
    for mode in ("resident", "streamed"):
        run = stage_run(layout, mode)
        stage_runs[mode] = run
        print(
            f"stages {mode}: wall {run['wall_s']:.1f}s, peak "
            f"{run['process_peak_rss_mib']:.0f} MiB, "
            + ", ".join(
                f"{name} {entry['wall_s']:.1f}s/{entry.get('stage_peak_rss_mib', 0):.0f}MiB"
                for name, entry in run["stages"].items()
            ),
            flush=True,
        )
    resident = stage_runs["resident"]
    run_dir = layout.runs / "stages-resident"
    write = write_runs(
        layout,
        run_dir / "coefficients.safetensors",
        run_dir / "merge.yml",
        repeats,
    )
    print(f"write ratios: {write['ratios']}", flush=True)
    steps = resident["training"]["stage1"]["optimizer_steps"]
    naive = naive_run(layout, steps)
    comparison = compare_naive(naive, stage_runs)
    print(
        f"naive: peak {naive['loop_peak_rss_mib']:.0f} MiB, "
        f"{naive['mean_step_s']:.3f} s/step; "
        + "; ".join(
            f"{m}: peak x{row['peak_ratio']}, time x{row['step_time_ratio']}"
            for m, row in comparison.items()
        ),
        flush=True,
    )
    tiers = tier_runs(layout)
    code_after = scale.code_info()
    return {
        **tiers,
        "model": model,
        "bench_config": dataclasses.asdict(layout.bench),
        "experts_used": EXPERTS,
        "machine": scale.machine_info(),
        "code": code_before,
        "code_changed_during_runs": code_after["mergekit_expert_sha256"]
        != code_before["mergekit_expert_sha256"],
        "calibration": {**CALIBRATION, "accumulation": 8, "dtype": "float32"},
        "repeats": repeats,
        "stage_runs": stage_runs,
        "write": write,
        "naive": naive,
        "naive_vs_ours": comparison,
        "command": command,
        "total_wall_s": round(time.perf_counter() - start, 1),
    }


def main() -> int:
    """Dispatch the child roles, or run the benchmark and write the results."""
    if len(sys.argv) > 1 and sys.argv[1] == "_measure":
        separator = sys.argv.index("--")
        return scale.measure_main(sys.argv[2], sys.argv[separator + 1 :])
    if len(sys.argv) > 1 and sys.argv[1] == "_write":
        return write_main(*sys.argv[2:5])
    if len(sys.argv) > 1 and sys.argv[1] == "_naive":
        return naive_main(*sys.argv[2:4])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a 2-layer toy model under bench_out/perf_smoke (results there too)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of each write measurement"
    )
    parser.add_argument(
        "--tiers-only",
        action="store_true",
        help="only measure the task-vector tiers, into the existing perf.json",
    )
    parser.add_argument(
        "--markdown-only",
        action="store_true",
        help="only rewrite perf.md from an existing perf.json",
    )
    args = parser.parse_args()
    bench_out = ROOT / "bench_out"
    if args.smoke:
        home = bench_out / "perf_smoke"
        layout = Layout(
            models=home,
            runs=home / "runs",
            results=home / "results",
            bench=dataclasses.replace(scale.BenchConfig(), **SMOKE_MODEL),
        )
    else:
        layout = Layout(
            models=bench_out / "scale",  # shared with scale.py
            runs=bench_out / "perf",
            results=ROOT / "benchmarks" / "results",
            bench=scale.BenchConfig(),
        )
    if args.markdown_only:
        results = json.loads((layout.results / "perf.json").read_text())
        (layout.results / "perf.md").write_text(markdown(results))
        return 0
    command = " ".join(["python", "benchmarks/perf.py", *sys.argv[1:]])
    if args.tiers_only:
        scale.build_models(layout.models, layout.bench)
        path = layout.results / "perf.json"
        if not path.exists():
            raise SystemExit(f"{path} is missing: run the whole benchmark first")
        results = json.loads(path.read_text())
        results.update(tier_runs(layout))
        results["tiers_command"] = command
        results["tiers_code"] = scale.code_info()
    else:
        results = run_all(layout, args.repeats, command)
    layout.results.mkdir(parents=True, exist_ok=True)
    (layout.results / "perf.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (layout.results / "perf.md").write_text(table)
    print(table)
    print(f"wrote {layout.results / 'perf.json'} and perf.md")
    if results["code_changed_during_runs"]:
        print("WARNING: mergekit_expert/ changed during the runs; rerun")
    return 0


if __name__ == "__main__":
    sys.exit(main())
