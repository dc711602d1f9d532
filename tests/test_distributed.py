"""Scale-out (docs/distributed.md): data-parallel capture under torchrun
(2 ranks, gloo, CPU) equals the one-process dump row for row and bit for
bit; a rank killed after its first batch is resumed alone; a comparison split
across two ranks writes the same report; accelerate device maps (cpu and
disk offload) give the single-device logits."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import logitparity
from logitparity import load_dump
from logitparity.capture import capture, load_model
from logitparity.cli import main as cli_main
from logitparity.compare import compare_dumps
from logitparity.distributed import RanksFailed, Share, merge_parts, part_dir
from logitparity.prompts import load_prompts

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TEXTS = ["Hello there, how are you today?", "def add(a, b):", "12 * 7 =", '{"name": "Ada", "age":',
         "Once upon a time, in a quiet village by the sea", "Bonjour", "The quick brown fox",
         "Question: what is 12 times 7?", "Hola mundo", "lighthouse keeper"]
NEW, BATCH = 6, 2  # 10 prompts -> 5 batches: rank 0 takes batches 0, 2, 4 and rank 1 batches 1, 3
RECORD_OWN = ("shard", "tensors", "timing")  # where a record's tensors lie, and how long it took


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "category": f"c{i % 3}", "text": t}) + "\n"
                            for i, t in enumerate(TEXTS)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    torch.set_num_threads(1)
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def one_process(lm, prompts_file, tmp_path_factory):
    """The reference: the same capture in one process."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("one") / "d"
    return load_dump(capture(lm, prompts_file, out, max_new_tokens=NEW, batch_size=BATCH, progress=False))


def dump_args(model_dir, prompts, out, *extra) -> list[str]:
    return ["dump", "--model", str(model_dir), "--prompts", str(prompts), "--out", str(out), "--max-new-tokens",
            str(NEW), "--batch-size", str(BATCH), "--no-progress", "--torch-threads", "1", *extra]


def _env(*paths: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(
        [*paths, str(Path(logitparity.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    return env


def torchrun(*args: str, module: str = "logitparity", path: str | None = None,
             timeout: float = 240) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 -m MODULE ARGS`` (a free port: other test runs may share
    the machine)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", module, *args], env=_env(*([path] if path else [])), capture_output=True, text=True, timeout=timeout)


def assert_same_content(one, merged) -> None:
    """The merged dump is the one-process dump: records in the same order
    with the same fields (their shard names and timings aside), every row
    bitwise, the manifest the same but for the run's own sections."""
    assert merged.ids == one.ids
    for pid in one.ids:
        a, b = one.record(pid), merged.record(pid)
        assert {k: v for k, v in a.items() if k not in RECORD_OWN} == {k: v for k, v in b.items() if k not in RECORD_OWN}
        assert a["timing"]["batch_size"] == b["timing"]["batch_size"]
        np.testing.assert_array_equal(one.logits(pid).view(np.uint32), merged.logits(pid).view(np.uint32))
    own = ("created", "run", "distributed")
    assert {k: v for k, v in one.manifest.items() if k not in own} == \
        {k: v for k, v in merged.manifest.items() if k not in own}
    assert merged.manifest["complete"] is True


# --------------------------------------------------------------------------- capture under torchrun


def test_torchrun_capture_is_the_one_process_dump(tiny_model_dir, prompts_file, one_process, tmp_path):
    out = tmp_path / "merged"
    proc = torchrun(*dump_args(tiny_model_dir, prompts_file, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"merged the 2 ranks' parts into {out}" in proc.stderr
    assert proc.stdout.startswith(f"dump {out}: 10 prompts, 60 tokens")  # rank 0's summary only
    merged = load_dump(out)
    assert_same_content(one_process, merged)
    assert cli_main(["validate", str(out)]) == 0
    parts = [load_dump(part_dir(out, r, 2)) for r in range(2)]
    batches = json.loads((out / "ranks" / "plan.json").read_text())["batches"]
    assert [pid for b in batches for pid in b] == one_process.ids
    assert parts[0].ids == [pid for b in batches[0::2] for pid in b]  # batches 0, 2, 4
    assert parts[1].ids == [pid for b in batches[1::2] for pid in b]  # batches 1, 3
    assert {p.manifest["distributed"]["rank"] for p in parts} == {0, 1}
    # no tensor was copied: each merged shard is a second name of a rank's shard
    shards = sorted(out.glob("shard-*.safetensors"))
    assert len(shards) == 5 and all(s.stat().st_nlink == 2 for s in shards)
    d = merged.manifest["distributed"]
    assert d["world_size"] == 2 and [r["prompts"] for r in d["ranks"]] == [6, 4]
    run = merged.manifest["run"]
    assert run["prompts"] == 10 and run["tokens"] == 60 and run["ranks"] == 2
    assert run["wall_s"] == max(r["run"]["wall_s"] for r in d["ranks"])


KILL_AFTER_FIRST_BATCH = '''
"""Run the CLI; on rank 1, die by SIGKILL right after its first batch reached disk."""
import os, signal, sys
if os.environ.get("RANK") == "1":
    from logitparity.dump import DumpWriter
    flush = DumpWriter.flush
    def dying_flush(self):
        wrote = bool(self._pending)
        flush(self)
        if wrote and "ranks" in self.path.parts:
            os.kill(os.getpid(), signal.SIGKILL)
    DumpWriter.flush = dying_flush
from logitparity.cli import main
sys.exit(main(sys.argv[1:]))
'''


def test_a_killed_rank_resumes_alone(tiny_model_dir, prompts_file, one_process, tmp_path, capsys):
    (tmp_path / "kill_rank1.py").write_text(KILL_AFTER_FIRST_BATCH)
    out = tmp_path / "killed"
    proc = torchrun(*dump_args(tiny_model_dir, prompts_file, out), module="kill_rank1", path=str(tmp_path))
    assert proc.returncode != 0 and "SIGKILL" in proc.stderr, proc.stderr[-3000:]
    assert not (out / "manifest.json").exists()  # nothing merged
    part1 = load_dump(part_dir(out, 1, 2))
    assert part1.manifest["complete"] is False and len(part1) == BATCH  # its first batch, durable
    first_batch = part1.ids

    # rank 1 alone, without torchrun: its part completes; the merge waits for rank 0 if that was stopped early
    assert cli_main(dump_args(tiny_model_dir, prompts_file, out, "--resume", "--rank", "1", "--world-size", "2")) == 0
    part1 = load_dump(part_dir(out, 1, 2))
    assert part1.manifest["complete"] is True and part1.ids[:BATCH] == first_batch and len(part1) == 4
    assert part1.manifest["run"]["resumed"] is True and part1.manifest["run"]["prompts"] == 4 - BATCH
    # rank 0 alone: resumes its part if torchrun stopped it, or finds it complete (no model load); merges
    assert cli_main(dump_args(tiny_model_dir, prompts_file, out, "--resume", "--rank", "0", "--world-size", "2")) == 0
    assert "merged the 2 ranks' parts" in capsys.readouterr().err
    assert_same_content(one_process, load_dump(out))
    assert load_dump(out).manifest["run"]["resumed"] is True


def test_ranks_by_hand_merge_when_the_last_part_completes(tiny_model_dir, prompts_file, one_process, tmp_path,
                                                          capsys):
    out = tmp_path / "by-hand"
    assert cli_main(dump_args(tiny_model_dir, prompts_file, out, "--rank", "1", "--world-size", "2")) == 0
    err = capsys.readouterr().err
    assert "the merge into" in err and "waits for rank(s) [0]" in err
    assert not (out / "manifest.json").exists()
    with pytest.raises(ValueError, match=r"the parts of rank\(s\) \[0\] are missing or incomplete"):
        merge_parts(out, 2)
    assert cli_main(dump_args(tiny_model_dir, prompts_file, out, "--rank", "0", "--world-size", "2")) == 0
    assert_same_content(one_process, load_dump(out))
    before = (out / "records.jsonl").read_bytes()
    merge_parts(out, 2)  # idempotent
    assert (out / "records.jsonl").read_bytes() == before
    # a merge killed after linking the shards (before any record) resumes: the writer drops unnamed shards
    (out / "records.jsonl").write_text("")
    assert_same_content(one_process, load_dump(merge_parts(out, 2)))


@pytest.mark.parametrize("extra, message", [
    (["--rank", "1"], r"--rank and --world-size go together"),
    (["--rank", "2", "--world-size", "2"], r"rank must be in \[0, world_size\) = \[0, 2\), got 2"),
    (["--rank", "0", "--world-size", "2", "--device", "auto"], r"--device auto spreads one model over every GPU"),
    (["--rank", "0", "--world-size", "2", "--activations", "stats"], r"--activations is not supported in a data-parallel"),
    (["--rank", "0", "--world-size", "2", "--device-map", "auto"], r"--device-map/--max-memory/--offload-folder place one"),
])
def test_bad_rank_arguments(tiny_model_dir, prompts_file, tmp_path, capsys, extra, message):
    assert cli_main(dump_args(tiny_model_dir, prompts_file, tmp_path / "d", *extra)) == 2
    assert re.search(message, capsys.readouterr().err)


def test_resume_refuses_another_plan_world_size_or_a_missing_flag(tiny_model_dir, prompts_file, tmp_path, capsys):
    out = tmp_path / "d"
    assert cli_main(dump_args(tiny_model_dir, prompts_file, out, "--rank", "1", "--world-size", "2", "--limit", "4")) == 0
    capsys.readouterr()
    checks = [
        (["--rank", "1", "--world-size", "2", "--limit", "4"], r"ranks/rank-00001-of-00002 already holds a dump; pass "
                                                                r"resume=True \(--resume\)"),
        (["--resume", "--rank", "0", "--world-size", "2", "--limit", "6"], r"this run cuts other batches than the first"),
        (["--resume", "--rank", "0", "--world-size", "3", "--limit", "4"], r"holds the parts of a run with 2 ranks, this "
                                                                             r"run has 3; resume with --nproc-per-node 2"),
    ]
    for extra, message in checks:
        assert cli_main(dump_args(tiny_model_dir, prompts_file, out, *extra)) == 2
        assert re.search(message, capsys.readouterr().err), message
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    assert cli_main(dump_args(tiny_model_dir, prompts_file, tmp_path / "junk", "--rank", "0", "--world-size", "2")) == 2
    assert "is not empty and holds no dump" in capsys.readouterr().err


# --------------------------------------------------------------------------- comparison split across ranks


@pytest.fixture(scope="module")
def bf16_candidate(tiny_model_dir, prompts_file, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("cand") / "d"
    return load_dump(capture(load_model(tiny_model_dir, dtype="bf16"), prompts_file, out, max_new_tokens=NEW,
                             batch_size=BATCH, progress=False))


def test_torchrun_compare_writes_the_one_process_report(one_process, bf16_candidate, tmp_path):
    ref, cand = str(one_process.path), str(bf16_candidate.path)
    code = cli_main(["compare", ref, cand, "--policy", "bf16", "--json", str(tmp_path / "one.json"),
                     "--report", str(tmp_path / "one.md")])
    assert code in (0, 1)
    proc = torchrun("compare", ref, cand, "--policy", "bf16", "--json", str(tmp_path / "two.json"),
                    "--report", str(tmp_path / "two.md"))
    assert proc.returncode == code, proc.stderr[-3000:]  # torchrun: 0 when every rank exits 0, else 1
    assert (tmp_path / "two.json").read_bytes() == (tmp_path / "one.json").read_bytes()
    assert (tmp_path / "two.md").read_bytes() == (tmp_path / "one.md").read_bytes()
    assert proc.stdout.count("policy 'bf16'") == 1  # rank 0 reports


class _Threads:
    """Two ranks as threads, with gather/broadcast over a barrier: the
    protocol of distributed.Share without a process group."""

    def __init__(self, world: int = 2):
        self.world, self.barrier, self.slots, self.box = world, threading.Barrier(world), [None] * world, [None]

    def share(self, rank: int) -> Share:
        def gather(obj):
            self.slots[rank] = obj
            self.barrier.wait()
            got = list(self.slots) if rank == 0 else None
            self.barrier.wait()
            return got

        def bcast(obj):
            if rank == 0:
                self.box[0] = obj
            self.barrier.wait()
            v = self.box[0]
            self.barrier.wait()
            return v

        return Share(rank, self.world, gather, bcast)

    def run(self, fn) -> list:
        out: list = [None] * self.world

        def body(r):
            try:
                out[r] = fn(r)
            except Exception as e:  # noqa: BLE001 - returned to the test
                out[r] = e

        ts = [threading.Thread(target=body, args=(r,), name=f"rank{r}") for r in range(self.world)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        return out


def test_split_comparison_is_the_one_process_comparison(one_process, bf16_candidate):
    whole = compare_dumps(one_process, bf16_candidate, policy="bf16")
    group = _Threads()
    got = group.run(lambda r: compare_dumps(one_process.path, bf16_candidate.path, policy="bf16",
                                            _share=group.share(r)))
    assert got[1] is None
    assert json.dumps(got[0].to_dict(), sort_keys=True) == json.dumps(whole.to_dict(), sort_keys=True)
    np.testing.assert_array_equal(got[0].token_prompt, whole.token_prompt)
    np.testing.assert_array_equal(got[0].tokens.kl_ref_cand, whole.tokens.kl_ref_cand)


def test_an_error_on_one_rank_is_raised_on_every_rank(one_process, bf16_candidate, monkeypatch):
    import logitparity.compare as cmp

    real = cmp.compare_logits

    def failing(*a, **kw):
        if threading.current_thread().name == "rank1":
            raise ValueError("rank 1's rows are bad")
        return real(*a, **kw)

    monkeypatch.setattr(cmp, "compare_logits", failing)
    group = _Threads()

    def rank(r):
        share = group.share(r)
        try:
            return compare_dumps(one_process.path, bf16_candidate.path, _share=share)
        except RanksFailed:
            raise
        except Exception as e:  # what distributed.compare_ranks does
            share.fail(e)

    got = group.run(rank)
    for e in got:
        assert isinstance(e, RanksFailed) and "rank 1: ValueError: rank 1's rows are bad" in str(e)


# --------------------------------------------------------------------------- models larger than one device


def _same_rows(a, b) -> None:
    """Same tokens, every row (prefill and decode steps) bitwise."""
    assert a.ids == b.ids
    for pid in a.ids:
        assert a.record(pid)["generated_token_ids"] == b.record(pid)["generated_token_ids"]
        np.testing.assert_array_equal(a.logits(pid).view(np.uint32), b.logits(pid).view(np.uint32))


LAYER_ON_DISK = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
                 "model.rotary_emb": "cpu", "lm_head": "cpu"}


def test_explicit_map_with_a_layer_on_disk_is_bitwise(tiny_model_dir, prompts_file, one_process, tmp_path):
    lm = load_model(tiny_model_dir, device_map=LAYER_ON_DISK, offload_folder=tmp_path / "offload")
    assert lm.model.model.layers[1].mlp.down_proj.weight.device.type == "meta"  # really off the device
    assert lm.identity["placement"]["modules"]["model.layers.1"] == "disk"
    d = load_dump(capture(lm, prompts_file, tmp_path / "d", max_new_tokens=NEW, batch_size=BATCH, progress=False))
    _same_rows(one_process, d)
    assert d.manifest["placement"]["device_map"]["model.layers.1"] == "disk" and d.manifest["device"] == "cpu"


def test_auto_map_split_by_max_memory_and_cli(lm, tiny_model_dir, prompts_file, one_process, tmp_path):
    """max_memory leaves room on the cpu for the embedding only: "auto" puts
    the rest on disk, lm_head included. Every row bitwise, greedy and scored
    (with lm_head's weight brought in from disk under inference_mode, the
    prefill row differed by up to 2.5 units in the last place: decode.py's
    _grad_off)."""
    out, scored = tmp_path / "auto", tmp_path / "auto-score"
    place = ["--device-map", "auto", "--max-memory", "cpu=300000", "--offload-folder", str(tmp_path / "off")]
    assert cli_main(dump_args(tiny_model_dir, prompts_file, out, *place)) == 0
    d = load_dump(out)
    modules = d.manifest["placement"]["modules"]
    assert {"cpu", "disk"} <= set(modules.values()) and modules["lm_head"] == "disk"
    _same_rows(one_process, d)
    assert cli_main(["dump", "--model", tiny_model_dir, "--mode", "score", "--reference-dump", str(one_process.path),
                     "--out", str(scored), "--no-progress", "--torch-threads", "1", *place]) == 0
    plain = load_dump(capture(lm, None, tmp_path / "plain-score", mode="score", reference_dump=one_process,
                              progress=False))
    for pid in plain.ids:
        np.testing.assert_array_equal(plain.logits(pid).view(np.uint32), load_dump(scored).logits(pid).view(np.uint32))


@pytest.mark.parametrize("kwargs, message", [
    (dict(device_map="everywhere"), r"device_map must be one of \('auto', 'balanced'"),
    (dict(device_map={"lm_head": "gpu"}), r"device_map\['lm_head'\] must be 'cpu', 'disk', a GPU index or 'cuda:N', got 'gpu'"),
    (dict(device_map={"lm_head": "disk"}), r"device_map puts modules on 'disk': pass offload_folder"),
    (dict(device_map={}), r"a non-empty dict module -> device"),
    (dict(device_map=LAYER_ON_DISK, max_memory={"cpu": "1GiB"}, offload_folder="x"), r"an explicit map ignores it"),
    (dict(device_map="auto", max_memory={"cpu": "lots"}), r"max_memory\['cpu'\] must be a positive byte count"),
    (dict(device_map="auto", max_memory={"ram": 10}), r"max_memory key must be 'cpu', 'disk' or a GPU index, got 'ram'"),
    (dict(max_memory={"cpu": 10}), r"max_memory and offload_folder apply to a device map"),
    (dict(device="cuda:1", device_map="auto"), r"device 'cuda:1' requested but torch sees no CUDA device|pass either"),
])
def test_bad_placement(tiny_model_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_model(tiny_model_dir, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without a GPU")
def test_gpu_entries_without_a_gpu(tiny_model_dir):
    with pytest.raises(ValueError, match=r"device_map\['lm_head'\] is 0 but torch sees no CUDA device"):
        load_model(tiny_model_dir, device_map={**LAYER_ON_DISK, "lm_head": 0}, offload_folder="x")


def test_device_map_cli_parsing(tiny_model_dir, prompts_file, tmp_path, capsys):
    from logitparity.capture.hf import parse_device_map, parse_max_memory

    assert parse_max_memory("0=20GiB,cpu=64GiB, disk=100") == {0: "20GiB", "cpu": "64GiB", "disk": 100}
    with pytest.raises(ValueError, match=r"--max-memory must look like DEVICE=SIZE"):
        parse_max_memory("20GiB")
    m = tmp_path / "map.json"
    m.write_text(json.dumps(LAYER_ON_DISK))
    assert parse_device_map(str(m)) == LAYER_ON_DISK and parse_device_map("balanced") == "balanced"
    with pytest.raises(ValueError, match=r"--device-map must be one of auto, balanced.*no such file"):
        parse_device_map(str(tmp_path / "nope.json"))
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ValueError, match=r"expected a JSON object module -> device, got list"):
        parse_device_map(str(tmp_path / "list.json"))
    assert cli_main(dump_args(tiny_model_dir, prompts_file, tmp_path / "d", "--device-map", str(m))) == 2
    assert "device_map puts modules on 'disk': pass offload_folder (--offload-folder DIR)" in capsys.readouterr().err


def test_more_ranks_than_batches(lm, tiny_model_dir, prompts_file, tmp_path):
    """--limit 4 makes 2 batches for 3 ranks: rank 2's part is an empty dump, and the merge is still the
    one-process dump."""
    one = load_dump(capture(lm, prompts_file, tmp_path / "one", max_new_tokens=NEW, batch_size=BATCH, limit=4,
                            progress=False))
    out = tmp_path / "three"
    for r in (2, 0, 1):
        assert cli_main(dump_args(tiny_model_dir, prompts_file, out, "--limit", "4", "--rank", str(r),
                                  "--world-size", "3")) == 0
    assert len(load_dump(part_dir(out, 2, 3))) == 0
    assert_same_content(one, load_dump(out))


def test_topk_storage_and_sampling_by_hand(lm, tiny_model_dir, prompts_file, tmp_path):
    """Any storage and mode: top-K rows (values, indices, lse, tail mass) of seeded sampling merge bitwise."""
    opts = ["--logits", "topk:8", "--mode", "sample", "--seed", "3"]
    one = load_dump(capture(lm, prompts_file, tmp_path / "one", max_new_tokens=NEW, batch_size=BATCH,
                            storage="topk:8", mode="sample", seed=3, progress=False))
    out = tmp_path / "ranks"
    for r in (0, 1):
        assert cli_main(dump_args(tiny_model_dir, prompts_file, out, *opts, "--rank", str(r), "--world-size", "2")) == 0
    merged = load_dump(out)
    assert merged.ids == one.ids and merged.storage == "topk:8"
    for pid in one.ids:
        assert merged.record(pid)["generated_token_ids"] == one.record(pid)["generated_token_ids"]
        for x, y in zip(one.topk(pid), merged.topk(pid)):
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
