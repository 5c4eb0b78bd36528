"""The generate phase: the teacher answers every prompt, shard by shard, resumably.

Prompts are cut into shards of ``distill.generate.shard_size``. Shard ``i`` is written as
``shard-iiiii.jsonl`` (one line per trace) and, when top-k log-probabilities are kept,
``shard-iiiii.safetensors`` (``<trace id>.ids`` / ``<trace id>.logp``); the tensors file is renamed
into place first and the JSONL last, so a shard whose JSONL exists is complete. A crash loses only the
shard being written; the next run skips finished shards and, because each shard's sampling seed is a
function of ``(seed, shard)``, produces the same traces it would have produced without the crash.

Three teacher backends write these shards (``distill.generate.backend``, :mod:`moe_adapt.distill.backends`):
``hf`` runs ``distill.teacher`` with transformers here; ``server`` asks an OpenAI-compatible endpoint
(:mod:`moe_adapt.distill.server`) one request per (prompt, sample), ``concurrency`` at a time, and writes
the same records (``response_ids`` in the vocabulary of ``server.tokenizer``, the student's by default)
and, when the server gives per-token log-probabilities with token ids, the same top-k tensors.
``vllm`` runs ``distill.teacher`` with vLLM's offline engine here (:mod:`moe_adapt.distill.vllm_backend`:
the prompts chat-formatted as for ``hf``, ``n`` samples and a seed per prompt, ``logprobs=store_topk``);
its answers go through the server backend's record writer, so ``response_ids`` are the teacher's token
ids and the top-k tensors vLLM's log-probabilities. Under torchrun rank 0 alone runs it.

Under torchrun the hf backend splits the shards across the processes: rank ``r`` of ``W`` writes the
unfinished shards ``r, r+W, ...`` (on its own device), rank 0 alone checks the folder before and sums
it up after a barrier. Since a shard's seed does not depend on ``W``, the folder holds the same bytes
as one process writes on the same kind of device.

The folder is a :class:`~moe_adapt.resume.StepCache` (the one resume mechanism) stamped in
``manifest.json`` with the fingerprint of the prompts and settings: when they changed, the folder is
emptied and generation starts over. A shard needs no ``_COMPLETE.json``: its JSONL, renamed into place
last, is its marker (and the folder moves as it is into the distill stage's output).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from moe_adapt import distributed
from moe_adapt.data.jsonl import write_documents
from moe_adapt.distill.backends import TRANSPORT_KEYS, VLLM_RESOURCE_KEYS
from moe_adapt.distill.config import GenerateConfig
from moe_adapt.distill.decoding import generate_for_prompts, pad_id_of, topk_logprobs
from moe_adapt.distill.prompts import PromptRecord
from moe_adapt.errors import MoEAdaptConfigError, MoEAdaptError
from moe_adapt.resume import StepCache

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def generation_settings(gcfg: GenerateConfig) -> dict[str, Any]:
    """The generate settings the traces depend on: all but the server's transport settings (URL, key,
    concurrency, timeouts, retries) and vLLM's resource settings (memory share, GPUs, eager mode), which
    can change without invalidating finished shards."""
    settings = asdict(gcfg)
    settings["server"] = {k: v for k, v in settings["server"].items() if k not in TRANSPORT_KEYS}
    settings["vllm"] = {k: v for k, v in settings["vllm"].items() if k not in VLLM_RESOURCE_KEYS}
    for backend in ("server", "vllm"):  # each backend's own block only (hf's fingerprint is unchanged)
        if gcfg.backend != backend:
            del settings[backend]
    return settings


def _settings(
    prompts: Sequence[PromptRecord], gcfg: GenerateConfig, teacher: str | None, seed: int, chat: str | None
) -> list[Any]:
    """What the traces depend on: every prompt (id, language, text) and the generation settings."""
    return [[[p.id, p.lang, p.prompt] for p in prompts], generation_settings(gcfg), teacher, seed, chat]


def shard_paths(folder: Path) -> list[Path]:
    """Finished shards' JSONL files, in order."""
    return sorted(folder.glob("shard-*.jsonl"))


def iter_traces(folder: Path) -> Iterator[dict[str, Any]]:
    """Every trace record of the finished shards, each with ``shard`` set to its shard's stem."""
    for path in shard_paths(folder):
        with open(path, encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                rec["shard"] = path.stem
                yield rec


def load_topk(folder: Path, shard: str) -> dict[str, np.ndarray]:
    """The top-k tensors of one shard (``<trace id>.ids`` / ``.logp``)."""
    path = folder / f"{shard}.safetensors"
    if not path.is_file():
        raise MoEAdaptError(f"{path} is missing: run the generate phase with distill.generate.store_topk > 0")
    return load_file(str(path))


def run_generate(
    prompts: Sequence[PromptRecord],
    teacher_path: str | None,
    gcfg: GenerateConfig,
    out: Path,
    *,
    seed: int,
    chat_template: str | None,
    student: str | None = None,
) -> dict[str, Any]:
    """Generate into ``out`` (resuming what is there); returns counts. ``teacher_path``: the hf
    backend's teacher; ``student``: the tokenizer of the server backend's ``response_ids`` when
    ``distill.generate.server.tokenizer`` is null."""
    if gcfg.backend == "server":
        return _run_server(prompts, gcfg, out, seed=seed, student=student)
    if gcfg.backend == "vllm":
        return distributed.run_on_main(
            lambda: _run_vllm(prompts, teacher_path, gcfg, out, seed=seed, chat_template=chat_template)
        )
    if not teacher_path:
        raise MoEAdaptConfigError("distill.teacher=None: the hf backend needs the teacher's HF folder")
    dist = distributed.current()
    # rank 0 alone checks (and may empty) the folder; every rank then writes its own shards
    todo_all = distributed.run_on_main(
        lambda: _pending(prompts, gcfg, out, teacher_path, seed, chat_template)[1], dist
    )
    shards = _shards(prompts, gcfg)
    todo = [i for i in todo_all if i % dist.world_size == dist.rank]  # rank r: shards r, r+W, ...
    if todo:
        _generate_hf(shards, todo, teacher_path, gcfg, out, seed, chat_template, dist.device)
    if dist.is_distributed:
        distributed.barrier(dist)
        return distributed.run_on_main(lambda: _summary(out, len(shards)), dist)
    return _summary(out, len(shards))


def _generate_hf(
    shards: Sequence[Sequence[PromptRecord]],
    todo: Sequence[int],
    teacher_path: str,
    gcfg: GenerateConfig,
    out: Path,
    seed: int,
    chat_template: str | None,
    device: torch.device,
) -> None:
    """Write shards ``todo`` with the hf teacher (on ``device``: the CPU or this rank's GPU)."""
    from transformers import AutoTokenizer

    from moe_adapt.checkpoint.hf import load_causal_lm

    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    model = load_causal_lm(teacher_path, torch.float32, device=device).eval()
    pad_id = pad_id_of(tokenizer)
    eos_id = int(tokenizer.eos_token_id)
    _write_shards(
        shards,
        todo,
        lambda i: _generate_shard(
            model, tokenizer, shards[i], i, gcfg, out, seed, chat_template, int(pad_id), eos_id
        ),
        f"x {gcfg.samples} samples",
    )


def _write_shards(
    shards: Sequence[Sequence[PromptRecord]], todo: Sequence[int], write: Callable[[int], None], what: str
) -> None:
    """Call ``write(i)`` for every shard index in ``todo``, in order, logging each shard and the time
    left after it (``what`` follows the shard's prompt count in the log line)."""
    start = time.perf_counter()
    for n, i in enumerate(todo, start=1):
        write(i)
        elapsed = time.perf_counter() - start
        log.info(
            "generate: shard %d/%d written (%d prompts %s; %.0f s so far, about %.0f s to go)",
            i + 1,
            len(shards),
            len(shards[i]),
            what,
            elapsed,
            elapsed / n * (len(todo) - n),
        )


def _generate_shard(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[PromptRecord],
    index: int,
    gcfg: GenerateConfig,
    out: Path,
    seed: int,
    chat_template: str | None,
    pad_id: int,
    eos_id: int,
) -> None:
    records: list[dict[str, Any]] = []
    tensors: dict[str, np.ndarray] = {}
    batches = generate_for_prompts(
        model,
        tokenizer,
        prompts,
        chat_template=chat_template,
        batch_size=gcfg.batch_size,
        seed=seed * 1_000_003 + index * 1009,
        max_new_tokens=gcfg.max_new_tokens,
        samples=gcfg.samples,
        temperature=gcfg.temperature,
        top_p=gcfg.top_p,
        top_k=gcfg.top_k,
    )
    for batch, prompt_ids, responses in batches:
        pairs = []
        for p, ids, samples in zip(batch, prompt_ids, responses, strict=True):
            for s, resp in enumerate(samples):
                trace_id = f"{p.id}#s{s}"
                response = tokenizer.decode(resp, skip_special_tokens=True)
                records.append(_trace(p, s, response, resp, bool(resp) and resp[-1] == eos_id))
                pairs.append((trace_id, ids, resp))
        if gcfg.store_topk:
            scored = [(t, i, r) for t, i, r in pairs if r]
            if scored:
                top = topk_logprobs(model, [(i, r) for _, i, r in scored], gcfg.store_topk, pad_id=pad_id)
                for (trace_id, _, _), (ids_RK, logp_RK) in zip(scored, top, strict=True):
                    tensors[f"{trace_id}.ids"], tensors[f"{trace_id}.logp"] = ids_RK, logp_RK
    _write_shard(out, index, records, tensors if gcfg.store_topk else None)


def _trace(p: PromptRecord, s: int, response: str, ids: list[int], finished: bool) -> dict[str, Any]:
    """The trace record of sample ``s`` of prompt ``p`` (every backend writes these keys, in this order)."""
    return {
        "id": f"{p.id}#s{s}",
        "prompt_id": p.id,
        "lang": p.lang,
        "prompt": p.prompt,
        "answer": p.answer,
        "answer_type": p.answer_type,
        "sample": s,
        "response": response,
        "response_ids": ids,
        "finished": finished,
    }


def _write_shard(
    out: Path, index: int, records: list[dict[str, Any]], tensors: dict[str, np.ndarray] | None
) -> None:
    """The tensors file renamed into place first, the JSONL (the shard's completion marker) last."""
    stem = out / f"shard-{index:05d}"
    if tensors is not None:
        tmp = stem.with_suffix(".safetensors.tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, stem.with_suffix(".safetensors"))
    write_documents(stem.with_suffix(".jsonl"), records)


def _shards(prompts: Sequence[PromptRecord], gcfg: GenerateConfig) -> list[Sequence[PromptRecord]]:
    """The prompts cut into shards of ``gcfg.shard_size``, in order (shard ``i``'s seed depends on ``i``
    alone, not on the number of processes)."""
    return [prompts[i : i + gcfg.shard_size] for i in range(0, len(prompts), gcfg.shard_size)]


def _pending(
    prompts: Sequence[PromptRecord],
    gcfg: GenerateConfig,
    out: Path,
    teacher: str | None,
    seed: int,
    chat: str | None,
) -> tuple[list[Sequence[PromptRecord]], list[int]]:
    """The prompt shards and the indices of those not finished yet (the folder started over when the
    prompts or settings changed)."""
    shards = _shards(prompts, gcfg)
    StepCache(
        out,
        _settings(prompts, gcfg, teacher, seed, chat),
        what="generate",
        stamp=MANIFEST,
        extra={"shards": len(shards), "prompts": len(prompts)},
    )
    todo = [i for i in range(len(shards)) if not (out / f"shard-{i:05d}.jsonl").is_file()]
    if len(todo) < len(shards):
        log.info("generate: %d of %d shards already done, resuming", len(shards) - len(todo), len(shards))
    return shards, todo


def _run_server(
    prompts: Sequence[PromptRecord], gcfg: GenerateConfig, out: Path, *, seed: int, student: str | None
) -> dict[str, Any]:
    """The server backend: probe the endpoint (and its log-probabilities when ``store_topk > 0``)
    before any work, then write the unfinished shards."""
    from transformers import AutoTokenizer

    from moe_adapt.distill.server import TeacherServer

    scfg = gcfg.server
    for key, path in (("distill.student", student), ("distill.generate.server.tokenizer", scfg.tokenizer)):
        if path and not Path(path, "tokenizer_config.json").is_file():
            raise MoEAdaptConfigError(f"{key}={path!r} is not a folder with an HF tokenizer")
    if not (student or scfg.tokenizer):
        raise MoEAdaptConfigError(
            "distill.student=None and distill.generate.server.tokenizer=None: the server backend writes "
            "response_ids in the student's vocabulary; set distill.student (or server.tokenizer)"
        )
    # response_ids are always in the student's vocabulary: the server's own token ids only when the
    # served model's tokenizer (server.tokenizer) is the student's, else the response text encoded
    tokenizer = AutoTokenizer.from_pretrained(student or scfg.tokenizer)
    use_ids = bool(scfg.tokenizer) and (
        not student or AutoTokenizer.from_pretrained(scfg.tokenizer).get_vocab() == tokenizer.get_vocab()
    )
    if gcfg.store_topk and not use_ids:
        raise MoEAdaptConfigError(
            f"distill.generate.store_topk={gcfg.store_topk} keeps the teacher's top-k for token KD, which "
            f"needs its token ids in the student's vocabulary, but distill.generate.server.tokenizer="
            f"{scfg.tokenizer!r} is {'not set' if not scfg.tokenizer else 'not the student tokenizer'}: set "
            "it to the served model's tokenizer folder (the student's), or set store_topk=0 and train with "
            "seq_kd (any tokenizer)"
        )
    with TeacherServer(scfg) as server:
        server.probe()
        if gcfg.store_topk and not server.supports_token_logprobs(gcfg.store_topk):
            raise MoEAdaptConfigError(
                f"distill.generate.store_topk={gcfg.store_topk}: the server at {scfg.base_url} returns no "
                "top log-probabilities with token ids, which token KD needs; set store_topk=0 and train with "
                "seq_kd (any tokenizer), or serve the teacher with llama.cpp's own llama-server (ids by "
                "default; llama-cpp-python's server gives none) or with vLLM and set "
                "distill.generate.server.extra_body={return_tokens_as_token_ids: true}"
            )
        shards, todo = _pending(prompts, gcfg, out, f"{scfg.model} -> {student}", seed, None)
        if not todo:
            return _summary(out, len(shards))
        eos_id = int(tokenizer.eos_token_id)
        _write_shards(
            shards,
            todo,
            lambda i: _server_shard(server, tokenizer, eos_id, use_ids, shards[i], i, gcfg, out, seed),
            f"x {gcfg.samples} samples from {scfg.model}",
        )
    return _summary(out, len(shards))


def _server_shard(
    server: Any,
    tokenizer: Any,
    eos_id: int,
    use_ids: bool,
    prompts: Sequence[PromptRecord],
    index: int,
    gcfg: GenerateConfig,
    out: Path,
    seed: int,
) -> None:
    base = seed * 1_000_003 + index * 1009
    requests = [
        {
            "prompt": p.prompt,
            "seed": (base + j * gcfg.samples + s) % 2**31,
            "max_tokens": gcfg.max_new_tokens,
            "temperature": gcfg.temperature,
            "top_p": gcfg.top_p,
            "top_k": gcfg.top_k,
            "logprobs": gcfg.store_topk,
        }
        for j, p in enumerate(prompts)
        for s in range(gcfg.samples)
    ]
    done = server.complete(requests, k=gcfg.store_topk)
    _write_completions(done, tokenizer, eos_id, use_ids, prompts, index, gcfg, out, decode=False)


def _run_vllm(
    prompts: Sequence[PromptRecord],
    teacher_path: str | None,
    gcfg: GenerateConfig,
    out: Path,
    *,
    seed: int,
    chat_template: str | None,
) -> dict[str, Any]:
    """The vllm backend: vLLM importable and the teacher a folder before any work; then one engine
    writes the unfinished shards (none started when every shard is done)."""
    from transformers import AutoTokenizer

    from moe_adapt.distill.sft_data import chat_prompt_ids
    from moe_adapt.distill.vllm_backend import VLLMTeacher, check_cpu_sampling, import_vllm

    vllm = import_vllm()
    check_cpu_sampling(vllm, gcfg.vllm, gcfg.temperature)
    if not teacher_path or not Path(teacher_path, "config.json").is_file():
        raise MoEAdaptConfigError(
            f"distill.teacher={teacher_path!r}: the vllm backend needs the teacher's HF folder"
        )
    shards, todo = _pending(prompts, gcfg, out, teacher_path, seed, chat_template)
    if not todo:
        return _summary(out, len(shards))
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    eos_id = int(tokenizer.eos_token_id)
    prompt_ids = {i: [chat_prompt_ids(tokenizer, p.prompt, chat_template) for p in shards[i]] for i in todo}
    longest = max(len(ids) for per_shard in prompt_ids.values() for ids in per_shard)
    limit = gcfg.vllm.max_model_len
    if limit is not None and longest + gcfg.max_new_tokens > limit:
        raise MoEAdaptConfigError(
            f"distill.generate.vllm.max_model_len={limit} is shorter than the longest chat-formatted "
            f"prompt ({longest} tokens) plus max_new_tokens={gcfg.max_new_tokens}: raise it or set null"
        )

    def shard(i: int) -> None:
        base = seed * 1_000_003 + i * 1009
        done = teacher.complete(
            prompt_ids[i],
            [(base + j * gcfg.samples) % 2**31 for j in range(len(shards[i]))],  # prompt j's first seed
            samples=gcfg.samples,
            temperature=gcfg.temperature,
            top_p=gcfg.top_p,
            top_k=gcfg.top_k,
            max_new_tokens=gcfg.max_new_tokens,
            k=gcfg.store_topk,
        )
        flat = [c for per_prompt in done for c in per_prompt]
        _write_completions(flat, tokenizer, eos_id, True, shards[i], i, gcfg, out, decode=True)

    with VLLMTeacher(teacher_path, gcfg.vllm, seed=seed, max_logprobs=gcfg.store_topk, vllm=vllm) as teacher:
        _write_shards(shards, todo, shard, f"x {gcfg.samples} samples with vLLM")
    return _summary(out, len(shards))


def _write_completions(
    completions: Sequence[Any],
    tokenizer: Any,
    eos_id: int,
    use_ids: bool,
    prompts: Sequence[PromptRecord],
    index: int,
    gcfg: GenerateConfig,
    out: Path,
    *,
    decode: bool,
) -> None:
    """Write shard ``index`` from ``completions`` (:class:`~moe_adapt.distill.server.Completion`, sample
    ``s`` of prompt ``j`` at ``j * samples + s``): the teacher's token ids when ``use_ids`` (else the text
    encoded with ``tokenizer``), ending with ``eos_id`` when the teacher ended its turn; ``decode``: the
    record's text decoded from those ids as the hf backend does (else the completion's own text)."""
    done = iter(completions)
    records: list[dict[str, Any]] = []
    tensors: dict[str, np.ndarray] = {}
    vocab = len(tokenizer)
    for p in prompts:
        for s in range(gcfg.samples):
            c = next(done)
            trace_id = f"{p.id}#s{s}"
            if use_ids and c.token_ids is not None:
                if any(not 0 <= t < vocab for t in c.token_ids):
                    raise MoEAdaptConfigError(
                        f"the teacher's token ids reach past the {vocab} tokens of the tokenizer "
                        f"{tokenizer.name_or_path!r}: with backend=server set distill.generate.server."
                        "tokenizer to the served model's tokenizer"
                    )
                ids = list(c.token_ids)
                if c.finished and (not ids or ids[-1] != eos_id) and c.topk_ids is not None:
                    # the server stopped at the end of turn without listing it: the teacher chose it
                    ids.append(eos_id)
                    c.topk_ids = np.concatenate(
                        [c.topk_ids, np.full((1, c.topk_ids.shape[1]), eos_id, np.int32)]
                    )
                    row = np.full((1, c.topk_ids.shape[1]), -65504.0, np.float16)
                    row[0, 0] = 0.0
                    c.topk_logp = np.concatenate([c.topk_logp, row]) if c.topk_logp is not None else row
                elif c.finished and (not ids or ids[-1] != eos_id):
                    ids.append(eos_id)
            else:  # text only: encode it in the tokenizer's vocabulary
                ids = [int(t) for t in tokenizer(c.text, add_special_tokens=False)["input_ids"]]
                ids += [eos_id] if c.finished else []
            response = tokenizer.decode(ids, skip_special_tokens=True) if decode else c.text
            records.append(_trace(p, s, response, ids, c.finished))
            if gcfg.store_topk and c.topk_ids is not None and c.topk_logp is not None and ids:
                tensors[f"{trace_id}.ids"], tensors[f"{trace_id}.logp"] = c.topk_ids, c.topk_logp
    _write_shard(out, index, records, tensors if gcfg.store_topk else None)


def _summary(out: Path, shards: int) -> dict[str, Any]:
    traces = finished = 0
    per_lang: dict[str, int] = {}
    for rec in iter_traces(out):
        traces += 1
        finished += bool(rec.get("finished"))
        per_lang[rec["lang"]] = per_lang.get(rec["lang"], 0) + 1
    return {"shards": shards, "traces": traces, "finished_with_eos": finished, "traces_per_lang": per_lang}
