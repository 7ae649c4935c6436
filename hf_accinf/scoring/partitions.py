"""Partitions of a score run (``--num_partitions P --partition i``) and their aggregation (issue 19, "Beyond
one machine"; DESIGN.md section 6).

A partition is an independent job (one per machine, each possibly under ``accelerate launch``) writing its shard
of the scores into the one output directory (:func:`.artifacts.write_scores_shard`):

* the forward form (every method with embeddings: sgd-ie, adam-ie, their acc- twins, dvemb) splits the rows:
  partition ``i`` walks every step for its rows ``[lo, hi)`` only (:meth:`.engine.ShardContext.sample_range`);
* TracIn splits the steps: partition ``i`` adds the contributions of its steps to every row, and the partitions'
  scores sum;
* the adjoint form cannot be split (each ``u_t`` depends on every later step): it is refused, and an interrupted
  adjoint resumes from its last resume point instead (:mod:`hf_accinf.engine.resume`).

Every shard's marker holds the partition key (the run's manifest hash, the evaluation rows' hash and the
arguments that change the scores): :func:`aggregate_partitions` checks that every partition is there and that
they share one key, then writes the normal artifact set. A partition already written with the same key is
skipped on a rerun (:func:`already_written`) unless ``overwrite``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from .. import io
from ..config import ScoreArguments
from ..engine.resume import RESUME_DIR, ResumeStore
from ..errors import AccInfError
from . import artifacts

logger = logging.getLogger(__name__)

# Arguments that do not change the scores (beyond round-off) or that name where a job runs: partitions may differ there.
PARTITION_FREE = ("partition", "output_dir", "overwrite", "memory_budget_gb", "schedule", "run_dir", "resume_every",
                  "device", "verify", "verify_seed", "verify_subsets", "verify_fraction", "verify_queries")
SUMMED = "sum"  # shards that split the steps (TracIn)
ROWS = "rows"  # shards that split the rows (the forward form)


def check_partitioned(args: ScoreArguments, form: str) -> None:
    """Refuse, before any work, what cannot be split into partitions."""
    if args.num_partitions == 1:
        return
    if form == "adjoint":
        raise AccInfError(
            f"--num_partitions {args.num_partitions}: the adjoint form cannot be split into independent jobs (each step's "
            "adjoint depends on every later step). Use --form forward (rows split across partitions), or run the "
            "adjoint as one job, data-parallel across processes and nodes under `accelerate launch`; an interrupted "
            "adjoint resumes from its last resume point (--resume_every).")
    if args.verify or args.verify_subsets:
        raise AccInfError(f"--verify and --verify_subsets need every row's score: score the run with "
                          f"--num_partitions 1, or drop them from the {args.num_partitions} partitions.")


def partition_key(manifest_sha256: str | None, arguments: dict[str, Any], evaluation_sha256: str | None) -> dict:
    """What every partition of one scoring must share: the run, the evaluation rows and the arguments (but
    :data:`PARTITION_FREE`)."""
    return {"run manifest sha256": manifest_sha256, "evaluation rows' sha256": evaluation_sha256,
            **{name: value for name, value in sorted(arguments.items()) if name not in PARTITION_FREE}}


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def resume_store(output_dir: Path, args: ScoreArguments, key: dict, checkpoints) -> ResumeStore:
    """The resume points of this job (``<output_dir>/.resume/whole`` or ``.../part-00001-of-00004``)."""
    name = "whole" if args.num_partitions == 1 else f"part-{args.partition:05d}-of-{args.num_partitions:05d}"
    return ResumeStore(output_dir / RESUME_DIR / name, key_digest(key), args.resume_every, checkpoints)


def _differences(saved: dict, key: dict) -> str:
    names = sorted(name for name in set(saved) | set(key) if saved.get(name) != key.get(name))
    return "; ".join(f"{name} {saved.get(name)!r} there, {key.get(name)!r} here" for name in names[:4])


def already_written(output_dir: Path, args: ScoreArguments, key: dict) -> bool:
    """Whether this partition is written in ``output_dir`` with ``key`` (a rerun skips it unless ``overwrite``).
    Shards of other arguments or of another split are refused unless ``overwrite``, which removes them."""
    if args.num_partitions == 1:
        return False
    stale = []
    for index, count, path, marker in io.finished_shards(output_dir, artifacts.SCORES_NAME):
        same = count == args.num_partitions and marker.get("key") == key
        if same and index == args.partition and not args.overwrite:
            logger.info("partition %d of %d is already written in %s: skipped (--overwrite scores it again)",
                        index, count, output_dir)
            return True
        if not same:
            stale.append((index, count, path, marker))
    if stale and not args.overwrite:
        index, count, _, marker = stale[0]
        raise AccInfError(f"{output_dir} holds partition {index} of {count} scored with other arguments or another "
                          f"split ({_differences(marker.get('key') or {}, key)}; num_partitions {count} there, "
                          f"{args.num_partitions} here). Pass --overwrite to replace them, or choose another --output_dir.")
    for _, _, path, _ in stale:
        path.with_name(path.name + io.DONE_SUFFIX).unlink(missing_ok=True)
        path.unlink(missing_ok=True)
    summary = output_dir / artifacts.SUMMARY_NAME
    if not args.overwrite and summary.is_file():
        done = artifacts.read_summary(output_dir).extra.get("partitions") or {}
        if done.get("key") == key:
            logger.info("%s already holds the aggregated scores of these %d partitions: skipped (--overwrite scores "
                        "partition %d again)", output_dir, args.num_partitions, args.partition)
            return True
    return False


def write_partition(output_dir: Path, args: ScoreArguments, key: dict, rows: tuple[int, int] | None, num_rows: int,
                    scores: torch.Tensor, embeddings: dict[str, torch.Tensor], summary: artifacts.ScoreSummary,
                    metadata: dict[str, str]) -> artifacts.ScoreSummary:
    """Write this partition's shard: the scores (and embeddings) of its rows, or of every row for TracIn's steps."""
    combine = ROWS if rows is not None else SUMMED
    lo, hi = rows if rows is not None else (0, num_rows)
    summary = dataclasses.replace(summary, extra={**summary.extra, "partition": {
        "index": args.partition, "count": args.num_partitions, "combine": combine, "rows": [lo, hi]}})
    artifacts.write_scores_shard(output_dir, args.partition, args.num_partitions, torch.arange(lo, hi), scores,
                                 embeddings, marker={"key": key, "combine": combine, "summary": summary.to_dict(),
                                                     "metadata": metadata})
    what = f"rows {lo}:{hi}" if combine == ROWS else f"{num_rows} rows (steps of partition {args.partition})"
    logger.info("wrote partition %d of %d (%s) into %s; when all %d are written: hf-accinf aggregate --output_dir %s",
                args.partition, args.num_partitions, what, output_dir, args.num_partitions, output_dir)
    return summary


def aggregate_partitions(output_dir: str | os.PathLike, overwrite: bool = False) -> artifacts.ScoreArtifact:
    """Combine the partitions in ``output_dir`` into the normal artifact set (scores, embeddings, ``scores.json``)
    and return it. Refuses missing or unfinished partitions (naming them) and partitions of other arguments."""
    output_dir = Path(output_dir)
    found = io.finished_shards(output_dir, artifacts.SCORES_NAME)
    if not found:
        if (output_dir / artifacts.SUMMARY_NAME).is_file() and artifacts.read_summary(output_dir).extra.get("partitions"):
            logger.info("%s holds aggregated scores already", output_dir)
            return artifacts.load_score_artifact(output_dir)
        raise AccInfError(f"No finished partitions in {output_dir}: score them first (hf-accinf score "
                          f"--num_partitions P --partition i --output_dir {output_dir}, for i = 0 .. P - 1).")
    counts = sorted({count for _, count, _, _ in found})
    if len(counts) > 1:
        raise AccInfError(f"{output_dir} holds partitions of {counts} splits: score one split again with --overwrite.")
    count = counts[0]
    markers = {index: marker for index, _, _, marker in found}
    first = min(markers)
    key = markers[first].get("key")
    differ = [index for index, marker in markers.items() if marker.get("key") != key]
    if differ:
        raise AccInfError(f"Partitions {differ} of {count} in {output_dir} were scored with other arguments or another "
                          f"run than partition {first} ({_differences(markers[differ[0]].get('key') or {}, key or {})}): "
                          "score them again with the same arguments (--overwrite).")
    missing = artifacts.pending_shards(output_dir, count)
    if missing:
        raise AccInfError(f"Partitions {missing} of {count} are missing or unfinished in {output_dir}: run hf-accinf "
                          f"score with the same arguments and --num_partitions {count} --partition i for each of them, "
                          "then aggregate again.")
    summaries = [artifacts.ScoreSummary.from_dict(markers[i]["summary"], f"partition {i}") for i in range(count)]
    combine = markers[first]["combine"]
    num_rows = max(s.extra["partition"]["rows"][1] for s in summaries)  # the rows' partitions end at N
    scores, embeddings = artifacts.aggregate(output_dir, count, num_rows, combine)
    artifacts.check_rerun(output_dir, summaries[0].rerun_key(), overwrite)
    order = torch.argsort(scores)
    schedules = sorted({s.schedule for s in summaries if s.schedule})
    extra = {name: value for name, value in summaries[0].extra.items() if name != "partition"}
    extra["partitions"] = {"count": count, "combine": combine, "key": key,
                           "each": [{"rows": s.extra["partition"]["rows"], "seconds": s.seconds, "schedule": s.schedule}
                                    for s in summaries]}
    arguments = {name: value for name, value in summaries[0].arguments.items() if name != "partition"}
    summary = dataclasses.replace(
        summaries[0], arguments=arguments, schedule=",".join(schedules) or None, seconds=sum(s.seconds or 0.0 for s in summaries),
        most_harmful=order[:10].tolist(), most_helpful=order.flip(0)[:10].tolist(), extra=extra)
    metadata = markers[first].get("metadata") or {}
    from safetensors.torch import save_file

    writers = {artifacts.SCORES_NAME: lambda path: save_file({"scores": scores.contiguous()}, path, metadata=metadata)}
    if embeddings:
        writers[artifacts.EMBEDDINGS_NAME] = lambda path: save_file(
            {name: value.contiguous() for name, value in embeddings.items()}, path, metadata=metadata)
    summary = artifacts.write_set(output_dir, writers, summary, overwrite=True)
    logger.info("aggregated %d partitions (%s) into %s", count, "rows" if combine == ROWS else "steps", output_dir)
    return artifacts.ScoreArtifact(scores, summary, output_dir)
