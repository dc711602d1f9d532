"""Scale-out: data-parallel capture under ``torchrun`` and a comparison
split across ranks (docs/distributed.md).

Capture (``capture_ranks``; ``torchrun --nproc-per-node N -m logitparity
dump ...``): every rank tokenizes the whole prompt list and cuts the batches
exactly as a one-process run does (``capture.run._batches``), then keeps
batches ``rank, rank + N, rank + 2N, ...`` and writes them as an ordinary
durable dump of its own, ``OUT/ranks/rank-RRRRR-of-NNNNN/`` (the
``DumpWriter`` of every capture: shard, fsync, rename, manifest, records;
``--resume`` per rank). ``OUT/ranks/plan.json`` holds the batches (prompt
ids), so a resumed rank provably takes the same share. When every rank is
done, rank 0 merges: the ranks' shards are hard-linked into ``OUT`` (no
tensor is copied) and the records written in the one-process order through
``DumpWriter.adopt`` (shards, then manifest, then records: a kill leaves a
valid dump, and the merge itself resumes). Same batches, same shapes, same
kernels: every row is bitwise the one-process run's on the same device and
dtype. A killed rank is resumed alone, without torchrun: ``logitparity dump
... --resume --rank R --world-size N``; the process that completes the last
part merges (under a file lock).

Comparison (``compare_ranks``; ``torchrun ... -m logitparity compare``):
rank r computes the prompts r, r + N, ... (reading only their rows, the
expensive part), and rank 0 gathers the per-prompt results and per-position
scalars (about 200 bytes a position against 4 x vocab bytes a row) and builds
the Comparison from them in the one-process order: the same report, figure
for figure (exact percentiles, no sketch).

The process group (gloo, for the control messages only) is created here
when torchrun started the process; nothing else in the package imports
torch.distributed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

from logitparity._fileio import write_text_atomic
from logitparity._renamed import renamed_keyword
from logitparity.dump import PARTS_DIR, RESUME_KEYS, DumpWriter, load_dump

__all__ = ["Part", "RankOutcome", "RanksFailed", "capture_ranks", "compare_ranks", "launched", "merge_parts"]

PLAN = "plan.json"
PLAN_FORMAT = "logitparity-ranks"
_PART_RE = re.compile(r"^rank-(\d{5})-of-(\d{5})$")
# a rank that finished early waits for the slowest at the end: a capture may take days
GROUP_TIMEOUT = datetime.timedelta(days=30)


class RanksFailed(ValueError):
    """One or more ranks of a distributed run raised (a ValueError: exit 2)."""


def launched() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) when torchrun (or any launcher setting
    RANK and WORLD_SIZE) started this process with more than one rank, else
    None."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer (torchrun sets it), got {os.environ['WORLD_SIZE']!r}") from None
    if world <= 1:
        return None
    try:
        rank = int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError):
        raise ValueError(f"WORLD_SIZE is {world} but RANK is {os.environ.get('RANK')!r}; start the ranks with "
                         "torchrun, which sets both") from None
    return rank, world, local


def _group():
    """The default process group (gloo), created on first use."""
    import torch.distributed as dist

    if not dist.is_initialized():
        with _killable():  # waits for every rank to connect
            dist.init_process_group("gloo", timeout=GROUP_TIMEOUT)
    return dist


@contextlib.contextmanager
def _killable():
    """While waiting for the other ranks, SIGTERM ends the process at once:
    torchrun sends it when a rank died, and a Python handler (the capture's
    flush-on-SIGTERM) would not run until the collective returned, which
    gloo does only at its timeout. Everything finished is on disk by then."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _check_rank(rank: Any, world_size: Any) -> tuple[int, int]:
    for name, v, lo in (("world_size", world_size, 1), ("rank", rank, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if rank >= world_size:
        raise ValueError(f"rank must be in [0, world_size) = [0, {world_size}), got {rank}")
    return rank, world_size


def part_dir(out: str | os.PathLike, rank: int, world_size: int) -> Path:
    return Path(out) / PARTS_DIR / f"rank-{rank:05d}-of-{world_size:05d}"


# --------------------------------------------------------------------------- capture


class Part:
    """One rank's share of a data-parallel capture into ``out``: its dump
    lives in ``out/ranks/rank-RRRRR-of-NNNNN`` (``path``). ``capture(...,
    part=Part(...))`` calls ``select`` with the one-process batches and
    ``finished`` before the model loads."""

    def __init__(self, out: str | os.PathLike, rank: int, world_size: int, *, resume: bool = False):
        self.rank, self.world_size = _check_rank(rank, world_size)
        self.out = Path(out)
        self.resume = bool(resume)
        self.path = part_dir(out, rank, world_size)

    def _check_out(self) -> None:
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"output {self.out} is a file; a dump is a directory: choose a new directory path")
        root = self.out / PARTS_DIR
        others = sorted({int(m.group(2)) for p in (root.iterdir() if root.is_dir() else [])
                         if (m := _PART_RE.match(p.name)) and int(m.group(2)) != self.world_size})
        if others:
            raise ValueError(f"{root} holds the parts of a run with {others[0]} ranks, this run has "
                             f"{self.world_size}; resume with --nproc-per-node {others[0]} (or --world-size "
                             f"{others[0]}), or choose a new directory")
        if not self.resume:
            for where in (self.out, self.path):
                if (where / "manifest.json").exists():
                    raise ValueError(f"{where} already holds a dump; pass resume=True (--resume) to continue it, "
                                     "or choose another directory")
        if self.out.is_dir() and not (self.out / "manifest.json").exists() \
                and any(p.name != PARTS_DIR for p in self.out.iterdir()):
            raise ValueError(f"{self.out} is not empty and holds no dump; choose an empty or new directory")

    def select(self, batches: list[list]) -> list[list]:
        """This rank's batches of the one-process list (every world_size-th,
        from ``rank``), after checking ``out/ranks/plan.json`` (written by
        the first rank to get here) says the same batches."""
        self._check_out()
        plan = {"format": PLAN_FORMAT, "version": "1.0", "world_size": self.world_size,
                "batches": [[item[0].id for item in b] for b in batches]}
        path = self.out / PARTS_DIR / PLAN
        if path.exists():
            try:
                old = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ValueError(f"{path} is not readable JSON ({e}); it is written by this package: restore it, "
                                 "or start over in a new directory") from None
            if old != plan:
                raise ValueError(
                    f"cannot resume {self.out}: this run cuts other batches than the first ({path}: "
                    f"{len(old.get('batches', [])) if isinstance(old, dict) else '?'} batches there, "
                    f"{len(batches)} here, or other prompts in them); use the same prompts, --limit, "
                    "--batch-size, model and chat-template settings, or a new directory")
        else:
            write_text_atomic(path, json.dumps(plan, ensure_ascii=False) + "\n")
        return [b for i, b in enumerate(batches) if i % self.world_size == self.rank]

    def finished(self, mine: list[list]) -> bool:
        """True when resuming and this part is complete with every prompt of
        ``mine``: nothing to run, the model need not load."""
        if not (self.resume and (self.path / "manifest.json").exists()):
            return False
        try:
            d = load_dump(self.path)
        except ValueError:  # a damaged part: the capture's resume repairs it
            return False
        return d.manifest.get("complete") is True and {i[0].id for b in mine for i in b} <= set(d.ids)

    def manifest_entry(self) -> dict[str, Any]:
        return {"rank": self.rank, "world_size": self.world_size}


@dataclasses.dataclass
class RankOutcome:
    """What one process of a data-parallel capture did: ``part`` its dump,
    ``merged`` the merged dump when this process wrote it (else None),
    ``pending`` the ranks whose parts are still incomplete (run alone)."""

    rank: int
    world_size: int
    part: Path
    merged: Path | None
    pending: list[int]


@renamed_keyword("logits", "storage")
def capture_ranks(model: Any = None, prompts: Any = None, out: str | os.PathLike = "dump", *,
                  rank: int | None = None, world_size: int | None = None, resume: bool = False,
                  **capture_kw: Any) -> RankOutcome:
    """This process's share of a data-parallel capture into ``out`` (see
    the module doc), with ``capture.capture``'s arguments.

    Under torchrun (``launched()``) the rank and world size come from it,
    the ranks meet in a gloo process group at the end, and rank 0 merges
    once every rank succeeded (a rank's error is raised on every rank as
    RanksFailed, naming it). Without torchrun, pass ``rank`` and
    ``world_size``: the process captures its share (resume one killed rank
    alone) and merges when every part is then complete."""
    from logitparity.capture.run import capture

    env = launched()
    if env is not None and (rank is not None or world_size is not None):
        raise ValueError(f"rank and world_size come from torchrun here (RANK={env[0]}, WORLD_SIZE={env[1]}); "
                         "drop --rank/--world-size")
    if env is None and (rank is None or world_size is None):
        raise ValueError("a data-parallel capture needs rank and world_size (--rank R --world-size N), or "
                         "start it with torchrun --nproc-per-node N")
    rank, world_size = (env[0], env[1]) if env is not None else _check_rank(rank, world_size)
    part = Part(out, rank, world_size, resume=resume)
    error: BaseException | None = None
    try:
        capture(model, prompts, out, resume=resume, part=part, **capture_kw)
    except Exception as e:  # noqa: BLE001 - reported to every rank below
        if env is None:
            raise
        error = e
    if env is None:
        pending = incomplete_parts(out, world_size)
        if pending:
            return RankOutcome(rank, world_size, part.path, None, pending)
        return RankOutcome(rank, world_size, part.path, merge_parts(out, world_size), [])
    dist = _group()
    statuses: list[Any] = [None] * world_size
    with _killable():
        dist.all_gather_object(statuses, (rank, None if error is None else f"{type(error).__name__}: {error}"))
    failed = [(r, msg) for r, msg in statuses if msg is not None]
    if failed:
        detail = _failures(failed)
        raise RanksFailed(f"{len(failed)} of {world_size} ranks failed ({detail}); the batches every rank "
                          f"finished are on disk in {Path(out) / PARTS_DIR}: fix the cause and run the same "
                          "command with --resume") from error
    merged = merge_parts(out, world_size) if rank == 0 else None
    with _killable():
        dist.barrier()  # the other ranks exit once the merged dump is complete
    return RankOutcome(rank, world_size, part.path, merged, [])


def _failures(failed: list[tuple[int, str]]) -> str | None:
    """'rank 1: msg; ranks 0, 2: other msg' (None when nothing failed)."""
    by: dict[str, list[int]] = {}
    for r, msg in failed:
        by.setdefault(msg, []).append(r)
    return "; ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}: {msg}" for msg, rs in by.items()) or None


def incomplete_parts(out: str | os.PathLike, world_size: int) -> list[int]:
    """Ranks whose part of ``out`` is missing or not complete."""
    pending = []
    for r in range(world_size):
        try:
            m = json.loads((part_dir(out, r, world_size) / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pending.append(r)
            continue
        if not isinstance(m, dict) or m.get("complete") is not True:
            pending.append(r)
    return pending


@contextlib.contextmanager
def _merge_lock(out: Path):
    import fcntl

    path = out / PARTS_DIR / ".merge.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when the process ends, however it ends
        yield
    finally:
        os.close(fd)


def _sans_width(logits: Any) -> Any:
    return {k: v for k, v in logits.items() if k != "vocab_size"} if isinstance(logits, dict) else logits


def merge_parts(out: str | os.PathLike, world_size: int) -> Path:
    """Merge the complete parts of a data-parallel capture into ``out``
    (idempotent; resumes an interrupted merge). Records come in the
    one-process order (``ranks/plan.json``); shards are hard-linked. Raises
    ValueError when a part is incomplete or the parts disagree."""
    out = Path(out)
    _, world_size = _check_rank(0, world_size)
    pending = incomplete_parts(out, world_size)
    if pending:
        raise ValueError(f"cannot merge {out}: the parts of rank(s) {pending} are missing or incomplete; resume "
                         f"each alone with `logitparity dump ... --resume --rank R --world-size {world_size}`")
    try:
        plan = json.loads((out / PARTS_DIR / PLAN).read_text(encoding="utf-8"))
        order = [pid for b in plan["batches"] for pid in b]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot merge {out}: {out / PARTS_DIR / PLAN} is missing or unreadable ({e}); "
                         "it is written by every rank: re-run one rank with --resume") from None
    parts = [load_dump(part_dir(out, r, world_size)) for r in range(world_size)]
    first = parts[0].manifest
    for d in parts[1:]:
        for key in RESUME_KEYS:
            if key == "device":
                continue
            a, b = first.get(key), d.manifest.get(key)
            if key == "logits":
                a, b = _sans_width(a), _sans_width(b)
            if a != b:
                raise ValueError(f"cannot merge {out}: the parts of rank 0 and {d.path.name} differ in {key!r} "
                                 f"({json.dumps(a, default=str)[:200]} vs {json.dumps(b, default=str)[:200]}); "
                                 "every rank must run the same model and settings: start over in a new directory")
    where: dict[str, tuple[dict, Path]] = {}
    for d in parts:
        for r in d.records:
            where[r["id"]] = (r, d.path / r["shard"])
    missing = [pid for pid in order if pid not in where]
    extra = sorted(set(where) - set(order))
    if missing or extra:
        raise ValueError(f"cannot merge {out}: the parts hold other prompts than the plan (missing "
                         f"{missing[:5]}, unplanned {extra[:5]}); resume the ranks with the same prompts")
    widths = {d.vocab_size for d in parts if d.vocab_size is not None}
    if len(widths) > 1:
        raise ValueError(f"cannot merge {out}: the parts' rows have different widths {sorted(widths)}")
    devices = sorted({str(d.manifest.get("device")) for d in parts})
    manifest = {k: v for k, v in first.items()
                if k not in ("format", "version", "created", "complete", "logits", "run", "distributed")}
    manifest["device"] = devices[0] if len(devices) == 1 else ",".join(devices)
    runs = [d.manifest.get("run") or {} for d in parts]
    manifest["distributed"] = {
        "world_size": world_size, "plan": f"{PARTS_DIR}/{PLAN}",
        "ranks": [{"rank": r, "part": f"{PARTS_DIR}/{d.path.name}", "prompts": len(d), "device": d.manifest.get("device"),
                   "host": d.manifest.get("host"), "run": run} for r, (d, run) in enumerate(zip(parts, runs))],
    }
    manifest["run"] = _merged_run(runs)
    lg = first["logits"]
    with _merge_lock(out):
        with DumpWriter(out, manifest, storage=lg["storage"], logits_dtype=lg["dtype"], resume=True) as writer:
            done = writer.done_ids
            writer.adopt([where[pid] for pid in order if pid not in done], widths.pop() if widths else None)
    return out


def _merged_run(runs: list[dict]) -> dict[str, Any]:
    """The ranks' run sections as one: they ran side by side, so the wall
    time is the slowest rank's; counts add up; peaks are per process."""
    def vals(key):
        return [r[key] for r in runs if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]

    wall = max(vals("wall_s"), default=None)
    tokens = sum(vals("tokens"))
    starts = [r["started"] for r in runs if isinstance(r.get("started"), str)]
    return {"started": min(starts) if starts else None, "wall_s": wall, "prompts": sum(vals("prompts")),
            "tokens": tokens, "tokens_per_s": tokens / wall if wall else None,
            "batch_size": max(vals("batch_size"), default=None),
            "peak_host_rss_bytes": max(vals("peak_host_rss_bytes"), default=None),
            "peak_gpu_bytes": max(vals("peak_gpu_bytes"), default=None),
            "resumed": any(r.get("resumed") for r in runs), "ranks": len(runs)}


# --------------------------------------------------------------------------- comparison


class Share:
    """The prompts one rank of a distributed comparison computes, and how
    its results reach rank 0 (``compare_dumps(..., _share=Share(...))``).

    Every rank takes part in exactly one gather and one broadcast, whether
    its work succeeded (``collect``) or raised (``fail``), so an error on
    any rank is raised on every rank (RanksFailed) instead of leaving the
    others waiting."""

    def __init__(self, rank: int, world_size: int, gather: Callable[[Any], list | None],
                 broadcast: Callable[[Any], Any]):
        self.rank, self.world_size = _check_rank(rank, world_size)
        self._gather, self._broadcast = gather, broadcast
        self._gathered = None
        self._done = False

    def mine(self, index: int) -> bool:
        return index % self.world_size == self.rank

    def _settle(self, got: list | None) -> str | None:
        """Rank 0 names the failed ranks (or None) to every rank."""
        self._done = True
        why = None
        if got is not None:
            why = _failures([(r, g[1]) for r, g in enumerate(got) if g[0] == "error"])
        return self._broadcast(why)

    def collect(self, payload: Any) -> list | None:
        """Gather ``payload`` to rank 0: the list of every rank's payloads
        there, None on the others; raises RanksFailed on every rank when one
        failed."""
        got = self._gather(("ok", payload))
        self._gathered = True
        why = self._settle(got)
        if why is not None:
            raise RanksFailed(f"the distributed comparison failed ({why})")
        return None if got is None else [g[1] for g in got]

    def fail(self, error: BaseException) -> None:
        """This rank raised ``error``: take part in what is left of the
        protocol, then raise it (or the first rank's) as RanksFailed."""
        if self._done:
            raise error
        got = None
        if not self._gathered:
            got = self._gather(("error", f"{type(error).__name__}: {error}"))
        why = self._settle(got)
        raise RanksFailed(f"the distributed comparison failed ({why or f'rank {self.rank}: {error}'})") from error


def compare_ranks(ref: Any, cand: Any, **kw: Any):
    """``compare_dumps`` split across the ranks torchrun started: rank r
    computes prompts r, r + N, ...; returns the Comparison on rank 0 (the
    one a single process computes) and None on the others. Without torchrun
    it is ``compare_dumps``."""
    from logitparity.compare import compare_dumps

    env = launched()
    if env is None:
        return compare_dumps(ref, cand, **kw)
    rank, world, _ = env
    dist = _group()

    def gather(obj):
        got = [None] * world if rank == 0 else None
        with _killable():
            dist.gather_object(obj, got, dst=0)
        return got

    def bcast(obj):
        box = [obj]
        with _killable():
            dist.broadcast_object_list(box, src=0)
        return box[0]

    share = Share(rank, world, gather, bcast)
    try:
        return compare_dumps(ref, cand, _share=share, **kw)
    except RanksFailed:
        raise
    except Exception as e:  # noqa: BLE001 - every rank learns of it
        share.fail(e)


def broadcast(obj: Any) -> Any:
    """rank 0's ``obj`` on every rank (torchrun), or ``obj`` itself."""
    if launched() is None:
        return obj
    box = [obj]
    with _killable():
        _group().broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every rank (torchrun; a no-op otherwise): torchrun stops
    the other ranks as soon as one exits non-zero, so rank 0 must be done
    writing before any rank returns a FAIL."""
    if launched() is not None:
        with _killable():
            _group().barrier()


def say(message: str) -> None:
    """A line on stderr, prefixed with the rank under torchrun."""
    env = launched()
    print(f"[rank {env[0]}] {message}" if env else message, file=sys.stderr)
