"""Teacher pass: each expert, loaded alone, labels and scores its own samples once.

Teacher outputs depend only on (expert, sample), so they are computed a single
time and cached; no expert stays loaded while the coefficients train. Records
that only have a prompt get their response here, generated greedily by their
own expert (the pseudo-label), in the same load.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .data import Sample, batched, make_sample, render, render_multimodal
from .distributed import owns, rank, world_size
from .errors import ExpertMergingError
from .multimodal import has_processor, load_processor
from .placement import Placement
from .records import CalibrationRecord
from .vocabulary import VocabularyMap


@dataclass
class TeacherTargets:
    """An expert's outputs on one sample: full logits [T, V], or the top-k
    values [T, k] with their vocabulary ``indices`` [T, k]; chosen hidden states."""

    logits: torch.Tensor
    hidden: list[torch.Tensor] = field(default_factory=list)  # [T, D] per layer
    indices: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"logits": self.logits}
        if self.indices is not None:
            tensors["indices"] = self.indices
        tensors.update({f"hidden.{j}": h for j, h in enumerate(self.hidden)})
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> TeacherTargets:
        layers = sum(1 for key in tensors if key.startswith("hidden."))
        return cls(
            tensors["logits"],
            [tensors[f"hidden.{j}"] for j in range(layers)],
            tensors.get("indices"),
        )


class TeacherCache:
    """Teacher targets of the calibration samples: in memory, or one safetensors
    file per sample in ``directory``, read back on demand (never all in RAM).

    ``experts`` lists every sample's expert; under torch.distributed a rank
    holds ``samples`` (and targets) only for the samples it owns.
    """

    def __init__(self, directory: str | None = None):
        self.directory = directory
        self.experts: list[int] = []
        self.samples: dict[int, Sample] = {}
        self.pseudo_labels: list[dict] = []
        self._targets: dict[int, TeacherTargets] = {}
        if directory is not None:
            os.makedirs(directory, exist_ok=True)

    def add(self, index: int, sample: Sample, target: TeacherTargets) -> None:
        self.samples[index] = sample
        if self.directory is None:
            self._targets[index] = target
            return
        tensors = {"ids": sample.input_ids, **target.tensors()}
        tensors.update({f"input.{k}": v for k, v in sample.inputs.items()})
        tensors.update({f"token.{k}": v for k, v in sample.token_inputs.items()})
        save_file({k: v.contiguous() for k, v in tensors.items()}, self._path(index))

    def target(self, index: int) -> TeacherTargets:
        if self.directory is None:
            return self._targets[index]
        with safe_open(self._path(index), framework="pt") as handle:
            return TeacherTargets.from_tensors(
                {
                    k: handle.get_tensor(k)
                    for k in handle.keys()
                    if k != "ids" and not k.startswith(("input.", "token."))
                }
            )

    def subset(self, keep: set[int]) -> TeacherCache:
        """The samples whose global index is in ``keep``, the targets shared.
        ``experts`` keeps every index (positions still line up) and marks the
        others -1, which no expert counts."""
        view = copy.copy(self)
        view.samples = {i: s for i, s in self.samples.items() if i in keep}
        view.experts = [e if i in keep else -1 for i, e in enumerate(self.experts)]
        view.pseudo_labels = []
        return view

    def _path(self, index: int) -> str:
        assert self.directory is not None  # only called for a cache on disk
        return os.path.join(self.directory, f"{index}.safetensors")

    @staticmethod
    def _index_path(directory: str) -> str:
        return os.path.join(directory, f"index-{rank()}-of-{world_size()}.json")

    def finish(self) -> None:
        """Write the index: the cache on disk is complete and can be reused."""
        if self.directory is None:
            return
        meta = {
            str(i): [s.record.where, s.response_start, s.truncated]
            for i, s in self.samples.items()
        }
        state = {
            "experts": self.experts,
            "samples": meta,
            "pseudo_labels": self.pseudo_labels,
        }
        with open(self._index_path(self.directory), "w", encoding="utf-8") as handle:
            json.dump(state, handle)

    @classmethod
    def reopen(cls, directory: str) -> TeacherCache | None:
        """A complete cache this rank wrote earlier in ``directory``, or None."""
        path = cls._index_path(directory)
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as handle:
            state = json.load(handle)
        cache = cls(directory)
        cache.experts = state["experts"]
        cache.pseudo_labels = state["pseudo_labels"]
        for key, (where, start, truncated) in state["samples"].items():
            index = int(key)
            with safe_open(cache._path(index), framework="pt") as handle:
                ids = handle.get_tensor("ids")
                extra = {
                    prefix: {
                        k[len(prefix) + 1 :]: handle.get_tensor(k)
                        for k in handle.keys()
                        if k.startswith(prefix + ".")
                    }
                    for prefix in ("input", "token")
                }
            expert = cache.experts[index]
            cache.samples[index] = Sample(
                expert,
                CalibrationRecord(where),
                ids,
                start,
                truncated,
                inputs=extra["input"],
                token_inputs=extra["token"],
            )
        return cache


def has_tokenizer(path: str) -> bool:
    return any(
        os.path.exists(os.path.join(path, name))
        for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    )


def load_tokenizer(
    candidates: Sequence[str], trust_remote_code: bool = False, processor: bool = False
):
    """The first candidate directory's tokenizer (expert, then its base).

    With ``processor`` (a vision-language expert) the first candidate that has
    a processor gives it instead: it renders records with images.
    """
    from transformers import AutoTokenizer

    if processor:
        for path in candidates:
            if has_processor(path):
                return load_processor(path, trust_remote_code)
    for path in candidates:
        if has_tokenizer(path):
            return AutoTokenizer.from_pretrained(
                path, trust_remote_code=trust_remote_code
            )
    raise FileNotFoundError(f"no tokenizer found in {list(candidates)}")


@torch.no_grad()
def generate_response(
    model,
    tokenizer,
    prompt_ids: list[int],
    max_new_tokens: int,
    inputs: dict[str, torch.Tensor] | None = None,
) -> list[int]:
    """Greedy continuation of the prompt, up to and including an end-of-sequence token.

    ``inputs``: the prompt's other model inputs (pixel values, image grids,
    per-token inputs with a batch dimension), as the processor returned them.
    """
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    output = model.generate(
        input_ids=torch.tensor([prompt_ids], device=device),
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long, device=device),
        **{k: v.to(device) for k, v in (inputs or {}).items()},
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
    model,
    sample: Sample,
    hidden_layers: Sequence[int],
    placement: Placement,
    top_k: int | None = None,
    vocabulary: VocabularyMap | None = None,
) -> TeacherTargets:
    """The teacher's logits (all, or the top k per position) and hidden states.

    With a ``vocabulary`` map (an expert that added tokens) only the tokens the
    base shares are kept, indexed as the merged model's logits are."""
    device = next(model.parameters()).device
    with placement.autocast():
        output = model(
            **sample.model_inputs(device),
            output_hidden_states=bool(hidden_layers),
            use_cache=False,
        )
    hidden = [output.hidden_states[i][0].float().cpu() for i in hidden_layers]
    logits = output.logits[0].float()
    if vocabulary is not None:
        return _shared_targets(logits, hidden, vocabulary, top_k)
    if top_k is not None and top_k < logits.shape[-1]:
        values, indices = logits.topk(top_k, dim=-1)
        return TeacherTargets(values.cpu(), hidden, indices.cpu())
    return TeacherTargets(logits=logits.cpu(), hidden=hidden)


@dataclass(frozen=True)
class TeacherJob:
    """What the teacher pass computes for every sample, and where it runs."""

    placement: Placement
    hidden_layers: tuple[int, ...] = ()
    max_length: int = 512
    max_new_tokens: int = 64
    top_k: int | None = None


@dataclass(frozen=True)
class TeacherModel:
    """One expert as the teacher pass loads it: its weights and where its
    tokenizer (or processor) lives, first found first."""

    name: str
    path: str
    tokenizer_paths: tuple[str, ...]
    # Set when the expert added tokens: its ids -> the base's, by token string.
    vocabulary: VocabularyMap | None = None


def _shared_targets(
    logits: torch.Tensor,
    hidden: list[torch.Tensor],
    vocabulary: VocabularyMap,
    top_k: int | None,
) -> TeacherTargets:
    """Teacher targets on the shared vocabulary: the KL compares the two models
    on the tokens both have, each distribution renormalized over them."""
    if top_k is not None and top_k < vocabulary.shared:
        values, indices = vocabulary.teacher_top_k(logits, top_k)
        return TeacherTargets(values.cpu(), hidden, indices.cpu())
    shared = vocabulary.teacher_logits(logits).cpu()
    if vocabulary.prefix and vocabulary.shared == vocabulary.student_size:
        return TeacherTargets(shared, hidden)  # aligned with the student's rows
    indices = vocabulary.student_ids.expand(len(shared), -1).contiguous()
    return TeacherTargets(shared, hidden, indices)


def run_teachers(
    experts: Sequence[TeacherModel],
    records: Sequence[Sequence[CalibrationRecord]],
    job: TeacherJob,
    *,
    directory: str | None = None,
    quiet: bool = False,
) -> TeacherCache:
    """Label (where needed) and score every record with its own expert, one at a time.

    With ``directory`` each sample's targets go straight to disk, so RAM holds
    one expert and one sample's outputs at a time.
    """
    cache = TeacherCache(directory)
    cache.experts = [
        k for k, expert_records in enumerate(records) for _ in expert_records
    ]
    owned = [i for i in range(len(cache.experts)) if owns(i)]
    index = 0
    with tqdm(total=len(owned), desc="Teacher pass", disable=quiet) as progress:
        for k, (expert, expert_records) in enumerate(zip(experts, records)):
            mine = [
                (index + j, r) for j, r in enumerate(expert_records) if owns(index + j)
            ]
            index += len(expert_records)
            if not mine:
                continue
            processor = load_tokenizer(
                expert.tokenizer_paths,
                job.placement.trust_remote_code,
                processor=any(r.images for _, r in mine),
            )
            model = job.placement.load(expert.path)
            for global_index, record in mine:
                sample, target, label = _teach(model, processor, k, record, job, expert)
                if not all(
                    bool(torch.isfinite(t).all())
                    for t in [target.logits, *target.hidden]
                ):
                    raise ExpertMergingError(
                        f"expert {expert.name} produced NaN or infinite outputs on "
                        f"calibration sample {record.where}; check that expert's weights"
                    )
                if label is not None:
                    cache.pseudo_labels.append(label)
                cache.add(global_index, sample, target)
                progress.update(1)
            del model
            if job.placement.device.startswith("cuda"):
                torch.cuda.empty_cache()
    cache.finish()
    return cache


def _teach(
    model,
    processor,
    expert: int,
    record: CalibrationRecord,
    job: TeacherJob,
    teacher: TeacherModel,
) -> tuple[Sample, TeacherTargets, dict | None]:
    """One record: render it, generate its response if it has none, score it.

    For an expert that added tokens, the sequence may hold only tokens the base
    has (the merged model takes it as input); a generated response ends before
    the first token the base lacks (the expert's own end-of-turn, typically).
    """
    vocabulary = teacher.vocabulary
    tokenizer = getattr(processor, "tokenizer", processor)
    inputs: dict[str, torch.Tensor] = {}
    token_inputs: dict[str, torch.Tensor] = {}
    if record.images:
        rendered = render_multimodal(record, processor)
        prompt_ids, response_ids = rendered.prompt_ids, rendered.response_ids
        inputs, token_inputs = rendered.inputs, rendered.token_inputs
    else:
        prompt_ids, response_ids = render(record, tokenizer)
    if vocabulary is not None:
        _check_shared(vocabulary, prompt_ids + (response_ids or []), record, teacher)
    label = None
    if response_ids is None:
        if record.images and len(prompt_ids) > job.max_length:
            raise ExpertMergingError(
                f"{record.where}: the prompt is {len(prompt_ids)} tokens long with its "
                f"images, more than calibration.max_length={job.max_length}; raise "
                "max_length"
            )
        response_ids = generate_response(
            model,
            tokenizer,
            prompt_ids[: job.max_length],
            job.max_new_tokens,
            batched(inputs, token_inputs),
        )
        if vocabulary is not None:
            response_ids = vocabulary.cut_at_unmapped(response_ids)
        label = {
            "expert": expert,
            "record": record.where,
            "response": tokenizer.decode(response_ids, skip_special_tokens=True),
        }
    sample = make_sample(
        expert,
        record,
        prompt_ids,
        response_ids,
        job.max_length,
        inputs,
        token_inputs,
    )
    target = score(
        model, sample, job.hidden_layers, job.placement, job.top_k, vocabulary
    )
    return sample, target, label


def _check_shared(
    vocabulary: VocabularyMap,
    ids: list[int],
    record: CalibrationRecord,
    teacher: TeacherModel,
) -> None:
    missing = vocabulary.unmapped_in(ids)
    if missing:
        raise ExpertMergingError(
            f"{record.where}: rendered by expert {teacher.name}, it contains token(s) "
            f"{missing[:5]} that the base vocabulary lacks, so the merged model "
            "cannot take it as input during calibration; use records without them "
            "(the expert's chat template may add them: give plain text or "
            "prompt/response records)"
        )
