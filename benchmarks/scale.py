"""Peak memory of calibration versus the number of experts K.

With ``calibration: {task_vectors: streamed}`` the base and each expert tensor
are read from the safetensors files one at a time, so the peak resident memory
of ``mergekit-expert`` should not grow with K. This benchmark builds a ~100M
parameter Llama base with random (seeded) weights, 8 experts (base + small
seeded Gaussian noise), a byte-level BPE tokenizer and calibration files, then
runs ``mergekit-expert CFG OUT --quiet`` for K = 2, 4, 8 (streamed), K = 2, 8
(resident, for contrast) and K = 2, 8 of plain ``task_arithmetic`` (mergekit's
writer alone, as a control), each in a fresh measurement process, and writes
``benchmarks/results/scale.json`` and ``scale.md``.

    python benchmarks/scale.py            # from the repo root
    python benchmarks/scale.py --ks 2 8 --control-ks --name scale_malloc_mmap_threshold \
        --child-env MALLOC_MMAP_THRESHOLD_=1048576   # glibc diagnostic

Models are cached under ``bench_out/scale/`` and reused while their fingerprint
matches. Only the standard library is imported at module level: the
measurement process (``scale.py _measure ...``) must have the CLI as its only
child, so that ``RUSAGE_CHILDREN`` is that child's peak. It imports the /proc
reader (``mergekit_expert.memory``, and with it the package) before it starts
the child, so neither the child's peak nor its wall time includes that.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CODE_VERSION = 1  # bump when the model/data construction below changes
TARGET_RATIO = 1.15  # K=8 streamed peak must be within 15% of K=2 streamed


@dataclass(frozen=True)
class BenchConfig:
    """Everything that determines the cached models and calibration files."""

    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 2048
    vocab_size: int = 8192
    experts: int = 8
    noise_std: float = 2e-3  # expert = base + N(0, noise_std^2), init std is 0.02
    dtype: str = "float32"  # dtype of the saved safetensors
    seed: int = 0
    records_per_expert: int = 4
    tokens_per_record: int = 60  # + BOS stays under max_length = 64
    corpus_chars: int = 4_000_000  # docstring text used to train the tokenizer


# --------------------------------------------------------------------------
# Building the models, tokenizer and calibration data (cached)
# --------------------------------------------------------------------------


def calibration_records(
    texts: list[str], tokenizer: Any, cfg: BenchConfig
) -> list[list[dict[str, str]]]:
    """``records_per_expert`` distinct records of ~``tokens_per_record`` tokens per expert."""
    rng = random.Random(cfg.seed)
    pool = [t for t in texts if len(t) > 8 * cfg.tokens_per_record]
    rng.shuffle(pool)
    needed = cfg.experts * cfg.records_per_expert
    if len(pool) < needed:
        raise RuntimeError(f"only {len(pool)} long docstrings, need {needed}")
    out: list[list[dict[str, str]]] = []
    for k in range(cfg.experts):
        chunk = pool[k * cfg.records_per_expert : (k + 1) * cfg.records_per_expert]
        records = []
        for text in chunk:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            records.append({"text": tokenizer.decode(ids[: cfg.tokens_per_record])})
        out.append(records)
    return out


def fingerprint(cfg: BenchConfig) -> dict[str, Any]:
    """What the cache must match to be reused."""
    import torch
    import transformers

    return {
        "config": asdict(cfg),
        "code_version": CODE_VERSION,
        "python": platform.python_version(),  # the stdlib docstrings
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def model_dirs(cache: Path, cfg: BenchConfig) -> tuple[Path, list[Path], list[Path]]:
    """(base dir, expert dirs, calibration files) inside the cache directory."""
    experts = [cache / "models" / f"expert{k}" for k in range(cfg.experts)]
    data = [cache / "data" / f"expert{k}.jsonl" for k in range(cfg.experts)]
    return cache / "models" / "base", experts, data


def cache_is_valid(cache: Path, cfg: BenchConfig) -> bool:
    """True when the fingerprint matches and every model and data file exists."""
    stamp = cache / "fingerprint.json"
    if not stamp.exists():
        return False
    try:
        if json.loads(stamp.read_text()) != fingerprint(cfg):
            return False
    except json.JSONDecodeError:
        return False
    base, experts, data = model_dirs(cache, cfg)
    needed = [d / "model.safetensors" for d in [base, *experts]] + data
    return all(p.exists() for p in needed)


def build_models(cache: Path, cfg: BenchConfig) -> dict[str, Any]:
    """Build (or reuse) base, experts, tokenizer and calibration files; model info."""
    import torch
    from transformers import LlamaForCausalLM

    from mergekit_expert.testing.calibration import write_jsonl
    from mergekit_expert.testing.corpus import stdlib_docstrings
    from mergekit_expert.testing.models import (
        add_noise_,
        llama_config,
        save_pretrained,
        token_ids,
    )
    from mergekit_expert.testing.tokenizer import bos_tokenizer

    base_dir, expert_dirs, data_files = model_dirs(cache, cfg)
    if cache_is_valid(cache, cfg):
        print(f"reusing models in {cache}")
        info = json.loads((cache / "model_info.json").read_text())
        return info
    start = time.perf_counter()
    for sub in ("models", "data"):
        shutil.rmtree(cache / sub, ignore_errors=True)
    (cache / "fingerprint.json").unlink(missing_ok=True)
    (cache / "data").mkdir(parents=True)

    texts = stdlib_docstrings(cfg.corpus_chars)
    tokenizer = bos_tokenizer(texts, cfg.vocab_size)
    print(
        f"tokenizer: {len(tokenizer)} tokens from {len(texts)} docstrings "
        f"({sum(map(len, texts)) / 1e6:.1f}M chars)"
    )
    for path, records in zip(data_files, calibration_records(texts, tokenizer, cfg)):
        write_jsonl(path, records)

    config = llama_config(
        len(tokenizer),
        hidden=cfg.hidden,
        intermediate=cfg.intermediate,
        layers=cfg.layers,
        heads=cfg.heads,
        max_positions=512,
        **token_ids(tokenizer),
    )
    dtype = getattr(torch, cfg.dtype)
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(config).eval()
    params = sum(p.numel() for p in model.parameters())
    print(f"base: {params / 1e6:.1f}M parameters, saved as {cfg.dtype}")
    base_state = {n: p.detach().clone() for n, p in model.named_parameters()}

    def save(directory: Path) -> None:
        save_pretrained(model.to(dtype), tokenizer, directory)
        model.to(torch.float32)

    save(base_dir)
    for k, directory in enumerate(expert_dirs):
        # One model reused: expert k = base + N(0, noise_std^2), seed + 1 + k.
        add_noise_(model, cfg.seed + 1 + k, cfg.noise_std, reference=base_state)
        save(directory)
        print(f"  saved {directory.name}")
    info = {
        "architecture": "LlamaForCausalLM",
        "parameters": params,
        "hidden_size": cfg.hidden,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "intermediate_size": cfg.intermediate,
        "vocab_size": len(tokenizer),
        "tie_word_embeddings": False,
        "saved_dtype": cfg.dtype,
        "file_mib": round((base_dir / "model.safetensors").stat().st_size / 2**20, 1),
        "experts_built": cfg.experts,
        "expert_noise_std": cfg.noise_std,
        "calibration_records_per_expert": cfg.records_per_expert,
        "calibration_tokens_per_record": cfg.tokens_per_record + 1,  # + BOS
    }
    (cache / "model_info.json").write_text(json.dumps(info, indent=2))
    (cache / "fingerprint.json").write_text(json.dumps(fingerprint(cfg), indent=2))
    print(f"built models in {time.perf_counter() - start:.0f}s")
    return info


# --------------------------------------------------------------------------
# Measuring one run in isolation
# --------------------------------------------------------------------------


def sample_rss(
    pid: int,
    peaks: dict[str, int],
    timeline: list[list[float]],
    stop: threading.Event,
) -> None:
    """Poll /proc/PID/status every 20 ms until ``stop``.

    Keeps the peak of each field (bytes) and, every 100 ms, a timeline row
    [seconds, VmRSS, RssAnon, RssFile] in MiB.
    """
    from mergekit_expert.memory import status_bytes

    start = time.perf_counter()
    tick = 0
    while not stop.is_set():
        values = status_bytes(pid, SAMPLED_FIELDS)
        for key, value in values.items():
            peaks[key] = max(peaks.get(key, 0), value)
        if values and tick % 5 == 0:
            timeline.append(
                [round(time.perf_counter() - start, 2)]
                + [round(values.get(k, 0) / 2**20, 1) for k in TIMELINE_FIELDS]
            )
        tick += 1
        stop.wait(0.02)


TIMELINE_FIELDS = ("VmRSS", "RssAnon", "RssFile")
SAMPLED_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


def measure_main(result_file: str, command: list[str]) -> int:
    """Run ``command`` as the only child; write its peak RSS and wall time as JSON.

    ``ru_maxrss`` of RUSAGE_CHILDREN is the largest peak of any waited-for
    descendant, so with a single child it is exactly that child's peak (KiB on
    Linux). A sampler adds the anonymous/file-backed split (sampled, 20 ms).
    """
    import mergekit_expert.memory  # noqa: F401  (the sampler's reader, loaded now)

    peaks: dict[str, int] = {}
    timeline: list[list[float]] = []
    stop = threading.Event()
    start = time.perf_counter()
    child = subprocess.Popen(command)
    sampler = threading.Thread(
        target=sample_rss, args=(child.pid, peaks, timeline, stop)
    )
    sampler.start()
    code = child.wait()
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes vs KiB
    result = {
        "returncode": code,
        "wall_s": round(wall, 2),
        "peak_rss_mib": round(maxrss * scale / 2**20, 1),
        "sampled_peak_mib": {
            key: round(value / 2**20, 1) for key, value in sorted(peaks.items())
        },
        "timeline_fields": ["s", *TIMELINE_FIELDS],
        "timeline": timeline,
    }
    Path(result_file).write_text(json.dumps(result))
    return code


def cli_command() -> list[str]:
    """The ``mergekit-expert`` console script next to this interpreter."""
    script = Path(sys.executable).parent / "mergekit-expert"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "mergekit_expert"]


def write_config(
    path: Path,
    base: Path,
    experts: list[Path],
    data: list[Path],
    mode: str | None,
) -> None:
    """The YAML of one run (absolute paths, so the working directory is irrelevant).

    ``mode`` is the ``task_vectors`` setting of an ``expert_merging`` run; None
    writes the control: plain ``task_arithmetic`` (weight 0.3), which the CLI
    hands to mergekit unchanged, so it measures mergekit's writer alone.
    """
    if mode is None:
        models = "".join(
            f"  - model: {json.dumps(str(e))}\n    parameters: {{weight: 0.3}}\n"
            for e in experts
        )
        method, calibration = "task_arithmetic", ""
    else:
        models = "".join(
            f"  - model: {json.dumps(str(e))}\n"
            f"    parameters: {{calibration: {json.dumps(str(d))}}}\n"
            for e, d in zip(experts, data)
        )
        method = "expert_merging"
        calibration = (
            f"calibration: {{task_vectors: {mode}, samples_per_expert: 2, "
            "epochs: 1, init: 0.3, max_length: 64}\n"
        )
    path.write_text(
        f"merge_method: {method}\n"
        f"base_model: {json.dumps(str(base))}\n"
        f"models:\n{models}"
        "dtype: float32\n"
        f"{calibration}"
    )


def run_one(
    cache: Path,
    cfg: BenchConfig,
    k: int,
    mode: str | None,
    keep: bool,
    child_env: dict[str, str] | None = None,
    name: str = "scale",
) -> dict[str, Any]:
    """Merge the first ``k`` experts in a fresh measurement process; the run's record.

    ``mode``: ``streamed`` / ``resident`` (expert_merging), or None for the
    task_arithmetic control. ``child_env`` is added to the CLI's environment;
    ``name`` (the results name) keeps the run directories of benchmarks apart.
    """
    base, experts, data = model_dirs(cache, cfg)
    run_dir = cache / "runs" / name / f"{mode or 'task_arithmetic'}-k{k}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    config = run_dir / "merge.yml"
    write_config(config, base, experts[:k], data[:k], mode)
    out = run_dir / "merged"
    measured = run_dir / "measured.json"
    command = [*cli_command(), str(config), str(out), "--quiet"]
    load_before = os.getloadavg()[0]
    subprocess.run(
        [sys.executable, __file__, "_measure", str(measured), "--", *command],
        check=True,
        cwd=ROOT,
        env={**os.environ, **(child_env or {})},
    )
    result = json.loads(measured.read_text())
    report_path = out / "expert_merging" / "report.json"
    stages = {}
    if report_path.exists():
        shutil.copyfile(report_path, run_dir / "report.json")
        stages = json.loads(report_path.read_text()).get("stages", {})
    if not keep:  # the merged weights are ~K-independent and large; drop them
        shutil.rmtree(out)
    record = {
        "k": k,
        "task_vectors": mode,
        "peak_rss_mib": result["peak_rss_mib"],
        "wall_s": result["wall_s"],
        # Other work on the machine slows wall times (not RSS): 1-min load average.
        "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "sampled_peak_mib": result["sampled_peak_mib"],
        "stages": stages,
        "calibration_peak_rss_mib": calibration_peak(stages),
        "rss_timeline": _relative(measured),
    }
    if mode is None:
        record["method"] = "task_arithmetic"
    return record


def _relative(path: Path) -> str:
    """``path`` relative to the repo root where it lies inside it."""
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says.

    Results computed on different CPUs differ in their last bits, and models
    trained on them in more than that: the name says which machine made them.
    """
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """CPU, memory and library versions of this machine."""
    import mergekit
    import safetensors
    import torch
    import transformers

    cpu = cpu_name()
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "mergekit": getattr(mergekit, "__version__", None) or _dist("mergekit"),
        "safetensors": safetensors.__version__,
        "mergekit_expert": _dist("mergekit-expert"),
    }


def _dist(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def calibration_peak(stages: dict[str, Any]) -> float | None:
    """Peak RSS at the end of the last calibration stage (before the write)."""
    peaks = [v["peak_rss_mib"] for k, v in stages.items() if k != "write"]
    return max(peaks) if peaks else None


def code_info() -> dict[str, Any]:
    """The checkout's commit, and whether/how ``mergekit_expert/`` is edited.

    Taken before and after the runs: the package is installed in editable
    mode, so an edit during the benchmark would mix code versions.
    """

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
            )
        except (OSError, subprocess.CalledProcessError):
            return None
        return done.stdout.strip()

    status = git("status", "--porcelain", "--", "mergekit_expert")
    digest = hashlib.sha256()
    for path in sorted((ROOT / "mergekit_expert").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return {
        "commit": git("rev-parse", "HEAD"),
        "mergekit_expert_dirty": bool(status) if status is not None else None,
        "mergekit_expert_sha256": digest.hexdigest()[:16],
    }


def stage_cells(run: dict[str, Any], names: list[str]) -> list[str]:
    """'peak MiB / wall s' of each stage, '-' where the report has none."""
    cells = []
    for name in names:
        stage = run["stages"].get(name)
        cells.append(
            f"{stage['peak_rss_mib']:.0f} / {stage['wall_s']:.1f}" if stage else "-"
        )
    return cells


def markdown(results: dict[str, Any]) -> str:
    """A short table of the runs (and the task_arithmetic controls)."""
    stage_names = ["teacher", "student_setup", "stage1", "write"]
    model, machine = results["model"], results["machine"]
    lines = [
        "# Peak memory vs number of experts K",
        "",
        f"{model['parameters'] / 1e6:.1f}M-parameter Llama ({model['saved_dtype']} "
        f"safetensors, {model['file_mib']} MiB per model), `dtype: float32`, "
        f"{machine['usable_cpus']} CPUs ({machine['cpu']}), torch {machine['torch']}, "
        f"commit {str(results['code']['commit'])[:7]}. Written by "
        f"`{results['command']}`"
        + (
            f" with `{' '.join(f'{k}={v}' for k, v in results['child_env'].items())}`"
            " in the environment of the runs."
            if results["child_env"]
            else "."
        ),
        "",
        "Peak RSS: kernel `ru_maxrss` of the `mergekit-expert` process. "
        "Anon / file: sampled peaks (20 ms) of its anonymous and file-backed "
        "(mmapped safetensors) pages. Stage columns: peak RSS so far at the end "
        "of that stage (MiB) / the stage's wall time (s), from `report.json`. "
        "Wall times depend on other load on the machine (`loadavg_1m` per run in "
        "scale.json); peak RSS does not.",
        "",
        "| K | method / task_vectors | peak RSS MiB | anon MiB | file MiB | wall s | "
        + " | ".join(stage_names)
        + " |",
        "|---|---|---|---|---|---|" + "---|" * len(stage_names),
    ]
    for run in [*results["runs"], *results.get("controls", [])]:
        sampled = run["sampled_peak_mib"]
        label = run.get("method") or f"expert_merging / {run['task_vectors']}"
        lines.append(
            f"| {run['k']} | {label} | {run['peak_rss_mib']:.0f} | "
            f"{sampled.get('RssAnon', float('nan')):.0f} | "
            f"{sampled.get('RssFile', float('nan')):.0f} | {run['wall_s']:.1f} | "
            + " | ".join(stage_cells(run, stage_names))
            + " |"
        )
    ratio = results.get("k8_over_k2_streamed")
    calibration = results.get("k8_over_k2_streamed_calibration")
    if ratio is not None:
        verdict = "meets" if ratio <= TARGET_RATIO else "misses"
        lines += [
            "",
            f"K=8 / K=2 streamed, whole process: **{ratio:.3f}** ({verdict} the "
            f"≤ {TARGET_RATIO:.2f} target); calibration stages only (peak RSS at "
            f"the end of stage1, before the write): **{calibration:.3f}**.",
        ]
    control = results.get("k8_over_k2_task_arithmetic")
    if control is not None:
        lines.append(
            f"Plain `task_arithmetic` (mergekit's writer, no calibration), K=8 / "
            f"K=2: {control:.3f}."
        )
    return "\n".join(lines) + "\n"


def ratio_of(
    runs: list[dict[str, Any]], key: str, mode: str | None = "streamed"
) -> float | None:
    """K=8 over K=2 of ``run[key]`` for the runs of ``mode``, if both exist."""
    by_k = {r["k"]: r[key] for r in runs if r["task_vectors"] == mode}
    if by_k.get(2) and by_k.get(8):
        return round(by_k[8] / by_k[2], 4)
    return None


def main() -> int:
    """Build or reuse the models, run every (K, mode), write the results."""
    if len(sys.argv) > 1 and sys.argv[1] == "_measure":
        separator = sys.argv.index("--")
        return measure_main(sys.argv[2], sys.argv[separator + 1 :])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=ROOT / "bench_out" / "scale")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--resident-ks", type=int, nargs="*", default=[2, 8])
    parser.add_argument(
        "--control-ks",
        type=int,
        nargs="*",
        default=[2, 8],
        help="K of the plain task_arithmetic controls (mergekit's writer alone)",
    )
    parser.add_argument(
        "--keep-outputs", action="store_true", help="keep the merged models"
    )
    parser.add_argument(
        "--child-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment of the mergekit-expert runs, e.g. "
        "MALLOC_MMAP_THRESHOLD_=1048576 (repeatable)",
    )
    parser.add_argument(
        "--name", default="scale", help="results file stem (RESULTS/NAME.json, .md)"
    )
    args = parser.parse_args()
    child_env = dict(item.split("=", 1) for item in args.child_env)
    cfg = BenchConfig(dtype=args.dtype)
    if max([*args.ks, *args.resident_ks, *args.control_ks]) > cfg.experts:
        parser.error(f"K can be at most {cfg.experts}")
    start = time.perf_counter()
    code_before = code_info()
    cache = args.cache.resolve()
    model = build_models(cache, cfg)
    plan: list[tuple[int, str | None]] = [
        *((k, "streamed") for k in args.ks),
        *((k, "resident") for k in args.resident_ks),
        *((k, None) for k in args.control_ks),
    ]
    runs, controls = [], []
    for k, mode in plan:
        run = run_one(cache, cfg, k, mode, args.keep_outputs, child_env, args.name)
        (runs if mode else controls).append(run)
        sampled = run["sampled_peak_mib"]
        print(
            f"K={k} {mode or 'task_arithmetic'}: peak RSS {run['peak_rss_mib']:.0f} "
            f"MiB (anon {sampled.get('RssAnon', 0):.0f}, file "
            f"{sampled.get('RssFile', 0):.0f}), calibration peak "
            f"{run['calibration_peak_rss_mib'] or '-'} MiB, wall {run['wall_s']:.1f}s",
            flush=True,
        )
    results = {
        "model": model,
        "machine": machine_info(),
        "code": code_before,
        "code_changed_during_runs": code_info()["mergekit_expert_sha256"]
        != code_before["mergekit_expert_sha256"],
        "calibration": {
            "samples_per_expert": 2,
            "epochs": 1,
            "init": 0.3,
            "max_length": 64,
            "dtype": "float32",
        },
        "runs": runs,
        "controls": controls,
        "k8_over_k2_streamed": ratio_of(runs, "peak_rss_mib"),
        "k8_over_k2_streamed_calibration": ratio_of(runs, "calibration_peak_rss_mib"),
        "k8_over_k2_task_arithmetic": ratio_of(controls, "peak_rss_mib", None),
        "target_ratio": TARGET_RATIO,
        "child_env": child_env,
        "command": " ".join(["python", "benchmarks/scale.py", *sys.argv[1:]]),
        "total_wall_s": round(time.perf_counter() - start, 1),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.name}.json").write_text(
        json.dumps(results, indent=2) + "\n"
    )
    table = markdown(results)
    (args.results / f"{args.name}.md").write_text(table)
    print(table)
    print(f"total wall time {results['total_wall_s']:.0f}s")
    if results["code_changed_during_runs"]:
        print("WARNING: mergekit_expert/ changed during the runs; rerun")
    return 0


if __name__ == "__main__":
    sys.exit(main())
