"""How far can layer-wise coefficients go? A reference for the quality benchmark.

Expert merging learns one coefficient per (expert, tensor) from unlabeled
calibration samples. This script fits the very same coefficients (the tensors
its default ``exclude`` leaves, as the package's ``Student`` holds them) with
more information than a merge ever has, and scores the result on the quality
benchmark's test blocks, so a result can be read as "what the
parameterization allows" against "what the calibration objective finds":

- ``ce``: next-token cross-entropy on the text itself (labels);
- ``kl``: KL from each domain's expert to the merge, the logit term of the
  calibration objective;

on the validation blocks (text no model trained on) or on as many blocks of
the experts' training text, with each domain's term divided by its expert's
validation gain (``gain``: the benchmark's retained gain itself) or not
(``equal``). Adam on the coefficients, full batch, from task arithmetic at the
validation-picked lambda, no regularizer. The test blocks are never fitted.

    python benchmarks/ceiling.py --regime lora --threads 1
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as Q  # noqa: E402

from mergekit_expert.config import DEFAULT_EXCLUDE  # noqa: E402
from mergekit_expert.objective import logit_loss  # noqa: E402
from mergekit_expert.student import Student  # noqa: E402
from mergekit_expert.task_vectors import ResidentTaskVectors  # noqa: E402
from mergekit_expert.testing.training import eval_blocks, token_stream  # noqa: E402


@dataclass(frozen=True)
class Fit:
    label: str
    target: str  # "ce" or "kl"
    weights: str  # "gain" or "equal"
    text: str  # "val" or "train"


FITS = [
    Fit("labels on validation text, per-domain gain weights", "ce", "gain", "val"),
    Fit("labels on training text, per-domain gain weights", "ce", "gain", "train"),
    Fit("expert KL on validation text, equal weights", "kl", "equal", "val"),
    Fit("expert KL on validation text, per-domain gain weights", "kl", "gain", "val"),
    Fit("expert KL on training text, equal weights", "kl", "equal", "train"),
    Fit("labels on validation text, equal weights", "ce", "equal", "val"),
]


def task_vectors(model, models: Q.Models) -> ResidentTaskVectors:
    """The base's values and the [K, numel] task vectors of every tensor the
    default ``exclude`` leaves and some expert changes (the base is copied:
    every fit starts from it, whatever an earlier one loaded)."""
    from transformers import AutoModelForCausalLM

    patterns = [re.compile(p) for p in DEFAULT_EXCLUDE]
    experts = [
        dict(AutoModelForCausalLM.from_pretrained(models.path[d]).named_parameters())
        for d in Q.DOMAINS
    ]
    base, stacked = {}, {}
    for name, weight in model.named_parameters():
        if any(p.search(name) for p in patterns):
            continue
        rows = torch.stack([(e[name] - weight).detach().reshape(-1) for e in experts])
        if bool(rows.abs().max() > 0):
            base[name] = weight.detach().reshape(-1).clone()
            stacked[name] = rows
    return ResidentTaskVectors(base, stacked)


def head_logits(model, blocks: torch.Tensor) -> torch.Tensor:
    """Logits of every position that has a next token: [n, T - 1, V]."""
    return model.lm_head(model.model(input_ids=blocks).last_hidden_state[:, :-1])


def fit(
    student: Student,
    blocks: dict[str, torch.Tensor],
    spec: Fit,
    gains: dict[str, float],
    teachers: dict[str, torch.Tensor],
    steps: int,
    lr: float,
) -> list[float]:
    """Adam on the coefficients, full batch; the objective at every step."""
    model = student.model
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    history = []
    for _ in range(steps):
        student.zero_grad()
        total = 0.0
        for d in Q.DOMAINS:
            logits = head_logits(model, blocks[d])
            if spec.target == "ce":
                term = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.size(-1)), blocks[d][:, 1:].reshape(-1)
                )
            else:
                term = logit_loss(logits, teachers[d])
            weight = (1 / gains[d] if spec.weights == "gain" else 1.0) / len(Q.DOMAINS)
            (term * weight).backward()
            total += float(term.detach()) * weight
        history.append(total)
        grads = student.projected_grads()
        for name, raw in student.raw.items():
            raw.grad = grads[name]
        optimizer.step()
        student.load()
    return history


def markdown(result: dict) -> str:
    """The results file as a table."""
    domains = list(result["task_arithmetic"]["by_domain"])
    lines = [
        f"# Layer-wise coefficients fitted with more information ({result['regime']})",
        "",
        "Test retained gain of the coefficients expert merging calibrates (one "
        f"per expert and tensor, {result['tensors']} tensors), fitted by Adam "
        f"({result['steps']} full-batch steps, lr {result['lr']}) from "
        f"{result['start']}, on {result['blocks_per_domain']} blocks of 128 "
        "tokens per domain; no regularizer. `benchmarks/ceiling.py`.",
        "",
        "| fit | retained gain | " + " | ".join(domains) + " | α mean per expert |",
        "|---|---|" + "---|" * len(domains) + "---|",
    ]
    for entry in [{"label": "start", **result["task_arithmetic"]}, *result["fits"]]:
        lines.append(
            f"| {entry['label']} | {entry['retained_gain']:.4f} | "
            + " | ".join(f"{entry['by_domain'][d]:.3f}" for d in domains)
            + f" | {', '.join(f'{a:.3f}' for a in entry['alpha_mean'])} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--regime", choices=Q.REGIMES, default="lora")
    parser.add_argument("--work", type=Path, default=Q.ROOT / "bench_out" / "quality")
    parser.add_argument(
        "--results", type=Path, default=Q.ROOT / "benchmarks" / "results"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--fits", type=int, nargs="+", help="indices into FITS")
    parser.add_argument(
        "--blocks",
        type=int,
        default=None,
        help="blocks per domain to fit on (default: every validation block); "
        "the results file gets a -blocksN suffix",
    )
    parser.add_argument(
        "--replot", action="store_true", help="rewrite the .md from the .json"
    )
    args = parser.parse_args()
    suffix = f"-blocks{args.blocks}" if args.blocks else ""
    path = args.results / f"ceiling_{args.regime}{suffix}.json"
    if args.replot:
        result = json.loads(path.read_text())
        path.with_suffix(".md").write_text(markdown(result))
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    cfg = Q.QualityConfig()
    domains = Q.all_domains(cfg)
    model_dir = (args.work / "models").resolve()
    tokenizer = Q.train_base(cfg, domains, model_dir, "cpu")
    evaluator = Q.Evaluator(cfg, domains, tokenizer)
    models = Q.train_regime(cfg, domains, tokenizer, model_dir, args.regime, "cpu")
    ref = {
        n: evaluator.score(models.base if n == "base" else models.path[n])
        for n in ["base", *Q.DOMAINS]
    }
    gains = {d: ref["base"].loss("val", d) - ref[d].loss("val", d) for d in Q.DOMAINS}
    seq, count = cfg.train.seq_len, args.blocks or cfg.val_blocks
    text = {
        "val": {d: blocks[:count] for d, blocks in evaluator.val.items()},
        "train": {
            d: eval_blocks(token_stream(domains[d].train, tokenizer), seq, count)
            for d in Q.DOMAINS
        },
    }
    model = AutoModelForCausalLM.from_pretrained(models.base).eval()
    taus = task_vectors(model, models)
    out_dir = args.work / "ceiling-model"
    # task arithmetic at the benchmark's picked lambda (the fits' start)
    picked = json.loads((Q.ROOT / "benchmarks/results/quality.json").read_text())
    lam = picked["regimes"][args.regime]["lambda_picked"]["task_arithmetic"][0]

    def score(student: Student) -> dict:
        student.load()
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        scores = evaluator.score(out_dir)
        test = Q.retained(scores, ref, "test")
        val = Q.retained(scores, ref, "val")
        return {
            "retained_gain": sum(test.values()) / len(test),
            "by_domain": test,
            "val_retained_gain": sum(val.values()) / len(val),
            "alpha_mean": [
                float(a)
                for a in torch.cat(
                    [w.detach() for w in student.raw.values()], dim=1
                ).mean(dim=1)
            ],
        }

    result = {
        "regime": args.regime,
        "start": f"task arithmetic, lambda {lam} on every calibrated tensor",
        "steps": args.steps,
        "lr": args.lr,
        "blocks_per_domain": count,
        "tensors": len(taus.names),
        "fits": [],
    }
    start_student = Student(
        model, taus, init=[lam] * len(Q.DOMAINS), activation="identity"
    )
    result["task_arithmetic"] = score(start_student)
    print(f"task arithmetic {lam}: {result['task_arithmetic']['retained_gain']:.4f}")
    teachers: dict[str, dict[str, torch.Tensor]] = {}  # per text, computed once

    def teacher_logits(which: str) -> dict[str, torch.Tensor]:
        if which not in teachers:
            teachers[which] = {}
            for d in Q.DOMAINS:
                expert = AutoModelForCausalLM.from_pretrained(models.path[d]).eval()
                with torch.no_grad():
                    teachers[which][d] = head_logits(expert, text[which][d])
        return teachers[which]

    for index in args.fits if args.fits is not None else range(len(FITS)):
        spec = FITS[index]
        targets = teacher_logits(spec.text) if spec.target == "kl" else {}
        student = Student(
            model, taus, init=[lam] * len(Q.DOMAINS), activation="identity"
        )
        history = fit(
            student, text[spec.text], spec, gains, targets, args.steps, args.lr
        )
        entry = {**vars(spec), "objective": [history[0], history[-1]], **score(student)}
        result["fits"].append(entry)
        print(
            f"{spec.label}: test retained gain {entry['retained_gain']:.4f} "
            f"({', '.join(f'{d} {v:.3f}' for d, v in entry['by_domain'].items())}); "
            f"objective {history[0]:.4f} -> {history[-1]:.4f}",
            flush=True,
        )
        result["wall_s"] = time.perf_counter() - start
        path.write_text(json.dumps(result, indent=2))
        path.with_suffix(".md").write_text(markdown(result))
    shutil.rmtree(out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
