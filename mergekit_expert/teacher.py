"""Teacher pass: each expert, loaded alone, labels and scores its own samples once.

Teacher outputs depend only on (expert, sample), so they are computed a single
time and cached; no expert stays loaded while the coefficients train. Records
that only have a prompt get their response here, generated greedily by their
own expert (the pseudo-label), in the same load.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .data import CalibrationRecord, Sample, make_sample, render
from .errors import ExpertMergingError


@dataclass
class TeacherTargets:
    logits: torch.Tensor  # [T, V] float32, CPU
    hidden: list[torch.Tensor] = field(default_factory=list)  # [T, D] per layer


@dataclass
class TeacherCache:
    samples: list[Sample]
    targets: list[TeacherTargets]
    pseudo_labels: list[dict]

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors and JSON for the on-disk cache (safetensors, never pickle)."""
        tensors, meta = {}, []
        for i, (sample, target) in enumerate(zip(self.samples, self.targets)):
            tensors[f"{i}.ids"] = sample.input_ids
            tensors[f"{i}.logits"] = target.logits
            for j, hidden in enumerate(target.hidden):
                tensors[f"{i}.hidden.{j}"] = hidden
            meta.append(
                [
                    sample.expert,
                    sample.record.where,
                    sample.response_start,
                    sample.truncated,
                    len(target.hidden),
                ]
            )
        return tensors, {"samples": meta, "pseudo_labels": self.pseudo_labels}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], state: dict) -> TeacherCache:
        samples, targets = [], []
        for i, (expert, where, start, truncated, layers) in enumerate(state["samples"]):
            samples.append(
                Sample(
                    expert,
                    CalibrationRecord(where),
                    tensors[f"{i}.ids"],
                    start,
                    truncated,
                )
            )
            targets.append(
                TeacherTargets(
                    tensors[f"{i}.logits"],
                    [tensors[f"{i}.hidden.{j}"] for j in range(layers)],
                )
            )
        return cls(samples, targets, state["pseudo_labels"])


def has_tokenizer(path: str) -> bool:
    return any(
        os.path.exists(os.path.join(path, name))
        for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    )


def load_tokenizer(candidates: Sequence[str], trust_remote_code: bool = False):
    """The first candidate directory's tokenizer (expert, then its base)."""
    from transformers import AutoTokenizer

    for path in candidates:
        if has_tokenizer(path):
            return AutoTokenizer.from_pretrained(
                path, trust_remote_code=trust_remote_code
            )
    raise FileNotFoundError(f"no tokenizer found in {list(candidates)}")


def load_causal_lm(path: str, device: str, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, trust_remote_code=trust_remote_code
    )
    return model.to(device).eval()


@torch.no_grad()
def generate_response(
    model, tokenizer, prompt_ids: list[int], max_new_tokens: int
) -> list[int]:
    """Greedy continuation of the prompt, up to and including an end-of-sequence token."""
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    output = model.generate(
        input_ids=torch.tensor([prompt_ids], device=device),
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long, device=device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad if pad is not None else 0,
        eos_token_id=eos,
    )
    generated = output[0, len(prompt_ids) :].tolist()
    if eos is not None and eos in generated:
        generated = generated[: generated.index(eos) + 1]
    return generated


@torch.no_grad()
def score(
    model, input_ids: torch.Tensor, hidden_layers: Sequence[int]
) -> TeacherTargets:
    device = next(model.parameters()).device
    output = model(
        input_ids=input_ids[None].to(device),
        output_hidden_states=bool(hidden_layers),
        use_cache=False,
    )
    hidden = [output.hidden_states[i][0].float().cpu() for i in hidden_layers]
    return TeacherTargets(logits=output.logits[0].float().cpu(), hidden=hidden)


def run_teachers(
    expert_paths: Sequence[str],
    tokenizer_paths: Sequence[Sequence[str]],
    records: Sequence[Sequence[CalibrationRecord]],
    *,
    hidden_layers: Sequence[int],
    max_length: int,
    max_new_tokens: int,
    device: str,
    trust_remote_code: bool = False,
    quiet: bool = False,
    expert_names: Sequence[str] | None = None,
) -> TeacherCache:
    """Label (where needed) and score every record with its own expert, one at a time."""
    samples: list[Sample] = []
    targets: list[TeacherTargets] = []
    pseudo_labels: list[dict] = []
    total = sum(len(r) for r in records)
    with tqdm(total=total, desc="Teacher pass", disable=quiet) as progress:
        for expert, (path, expert_records) in enumerate(zip(expert_paths, records)):
            tokenizer = load_tokenizer(tokenizer_paths[expert], trust_remote_code)
            model = load_causal_lm(path, device, trust_remote_code)
            for record in expert_records:
                prompt_ids, response_ids = render(record, tokenizer)
                if response_ids is None:
                    response_ids = generate_response(
                        model, tokenizer, prompt_ids[:max_length], max_new_tokens
                    )
                    pseudo_labels.append(
                        {
                            "expert": expert,
                            "record": record.where,
                            "response": tokenizer.decode(
                                response_ids, skip_special_tokens=True
                            ),
                        }
                    )
                sample = make_sample(
                    expert, record, prompt_ids, response_ids, max_length
                )
                target = score(model, sample.input_ids, hidden_layers)
                if not all(
                    bool(torch.isfinite(t).all())
                    for t in [target.logits, *target.hidden]
                ):
                    name = expert_names[expert] if expert_names else path
                    raise ExpertMergingError(
                        f"expert {name} produced NaN or infinite outputs on calibration "
                        f"sample {record.where}; check that expert's weights"
                    )
                samples.append(sample)
                targets.append(target)
                progress.update(1)
            del model
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return TeacherCache(samples=samples, targets=targets, pseudo_labels=pseudo_labels)
