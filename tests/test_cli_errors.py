"""Exit codes mean one thing and no traceback reaches a CLI user: --help of
every subcommand, usage errors (gate: 125), a full disk, an output path that
is a directory or below a file, a closed pipe, non-UTF-8 files, a file where
a directory belongs, incomplete runs, --torch-threads."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import logitparity
from logitparity.cli import SUBCOMMANDS, build_parser, default_torch_threads, main
from logitparity.dump import DumpWriter

V = 32
MANIFEST = {"engine": {"name": "t", "version": "0"}, "model": {"name": "m"},
            "tokenizer": {"vocab_size": V, "tokens_hash": "sha256:" + "0" * 64, "special_tokens": {}},
            "dtype": "fp32", "device": "cpu", "decoding": {"mode": "greedy", "max_new_tokens": 4}}


def dump(path: Path, shift: float = 0.0, *, complete: bool = True) -> str:
    rng = np.random.default_rng(0)
    w = DumpWriter(path, MANIFEST)
    for i in range(3):
        x = (rng.standard_normal((4, V)) * 3).astype(np.float32)
        toks = [int(t) for t in x.argmax(1)]
        w.add({"id": f"p{i}", "category": "c", "prompt": f"text {i}", "chat_template": False,
               "prompt_token_ids": [1, 2], "generated_token_ids": toks, "stop_reason": "max_new_tokens"}, x + shift)
    w.close(complete=complete)
    return str(path)


@pytest.fixture
def pair(tmp_path):
    return dump(tmp_path / "ref"), dump(tmp_path / "cand")


@pytest.mark.parametrize("name", [None, *SUBCOMMANDS])
def test_help_of_every_subcommand(name, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"] if name is None else [name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: logitparity{'' if name is None else ' ' + name}")
    assert "%" not in out.replace("%%", "") or name == "gate"  # no unformatted argparse specifiers


def test_model_dtypes_are_the_loaders():
    """The CLI's --dtype choices (written in cli so that parsing imports no
    capture code) are the dtypes load_model accepts, in its order."""
    from logitparity.capture.hf import DTYPES
    from logitparity.cli import MODEL_DTYPES

    assert MODEL_DTYPES == DTYPES
    subcommands = build_parser()._subparsers._group_actions[0].choices  # argparse's own record of them
    model_dtype_options = {(name, a.dest): a.choices for name, sub in subcommands.items() for a in sub._actions
                           if a.dest.endswith("dtype") and a.dest not in ("logits_dtype", "cache_dtype")}
    assert len(model_dtype_options) == 12  # gate's --dtype is checked when the model loads (choices None)
    assert all(c is None or tuple(c) == DTYPES for c in model_dtype_options.values()), model_dtype_options


def test_model_arg_names_the_embedded_model():
    from logitparity.cli import model_arg

    assert model_arg("default") is None and model_arg(None) is None  # load_model(None): the embedded model
    assert model_arg("models/x.gguf") == "models/x.gguf" and model_arg("Default") == "Default"


def test_gate_help_shows_the_percent_sign(capsys):
    with pytest.raises(SystemExit):
        main(["gate", "--help"])
    out = capsys.readouterr().out
    assert "with a % sign (1%)" in " ".join(out.split())


def test_usage_errors_exit_2_and_gate_125(capsys):
    with pytest.raises(SystemExit) as e:
        main(["compare", "only-one"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["gate", "--no-such-flag"])
    assert e.value.code == 125
    assert "logitparity gate: error: unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_disk_full_is_exit_2_naming_the_path(pair, tmp_path, monkeypatch, capsys):
    import logitparity._fileio as fio

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fio, "_write_all", full)
    target = tmp_path / "out" / "report.md"
    assert main(["compare", *pair, "--report", str(target)]) == 2
    err = capsys.readouterr().err
    assert f"logitparity compare: error: {target}: No space left on device; the disk is full" in err
    assert not list((tmp_path / "out").iterdir())  # no temporary left behind


def test_output_path_that_is_a_directory(pair, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    assert main(["compare", *pair, "--json", str(tmp_path / "taken")]) == 2
    assert f"{tmp_path / 'taken'}: is a directory, expected a file path; a directory is in the way" in capsys.readouterr().err


def test_output_path_below_a_file(pair, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    assert main(["compare", *pair, "--report", str(tmp_path / "file.txt" / "r.md")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'file.txt'}: a file is in the way where a directory belongs" in err


def test_a_file_where_a_dump_directory_belongs(pair, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["compare", str(tmp_path / "f"), pair[1]]) == 2
    assert "is a file, not a dump directory" in capsys.readouterr().err
    assert main(["dump", "--out", str(tmp_path / "f"), "--model", str(tmp_path / "nope"), "--torch-threads", "1"]) == 2


def test_closed_pipe_is_exit_2_without_a_traceback(pair):
    env = {**os.environ, "PYTHONPATH": str(Path(logitparity.__file__).parents[1])}
    p = subprocess.Popen([sys.executable, "-m", "logitparity.cli", "compare", *pair, "--report", "-"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdout.close()  # the reader went away (`| head`)
    err = p.stderr.read().decode()
    p.stderr.close()
    assert p.wait() == 2, err
    assert "Traceback" not in err and "the output pipe was closed" in err


def test_non_utf8_files(pair, tmp_path, capsys):
    ref, cand = pair
    m = Path(cand) / "manifest.json"
    m.write_bytes(m.read_bytes().replace(b'"t"', b'"\xff"'))
    assert main(["compare", ref, cand]) == 2
    assert "manifest.json is not UTF-8 text (byte 0xff" in capsys.readouterr().err
    r = Path(ref) / "records.jsonl"
    r.write_bytes(r.read_bytes().replace(b"text 1", b"text \xe9"))
    assert main(["validate", ref]) == 2
    assert "encoding: expected UTF-8 text, found byte 0xe9" in capsys.readouterr().out
    prompts = tmp_path / "p.txt"
    prompts.write_bytes(b"caf\xe9\n")
    assert main(["dump", "--prompts", str(prompts), "--out", str(tmp_path / "d"), "--torch-threads", "1"]) == 2
    assert "is not UTF-8 text" in capsys.readouterr().err
    assert main(["ppl", "--text-file", str(prompts), "--torch-threads", "1"]) == 2
    assert f"--text-file {prompts} is not UTF-8 text (byte 0xe9 at offset 3)" in capsys.readouterr().err


def test_non_utf8_policy_and_floor_files_are_named(pair, tmp_path, capsys):
    ref, cand = pair
    policy = tmp_path / "p.toml"
    policy.write_bytes(b'name = "caf\xe9"\n')
    assert main(["compare", ref, cand, "--policy", str(policy)]) == 2
    assert f"policy file {str(policy)!r} is not UTF-8 text (byte 0xe9 at offset 11)" in capsys.readouterr().err
    floor = tmp_path / "floor.json"
    floor.write_bytes(b'{"format": "\xff"}')
    assert main(["compare", ref, cand, "--noise-floor", str(floor)]) == 2
    assert f"noise-floor file {floor} is not UTF-8 text (byte 0xff at offset 12)" in capsys.readouterr().err


def test_incomplete_runs_exit_2_unless_allow_partial(tmp_path, capsys):
    ref = dump(tmp_path / "ref")
    cand = dump(tmp_path / "cand", complete=False)
    assert main(["compare", ref, cand]) == 2
    assert "incomplete input: the candidate run is incomplete" in capsys.readouterr().err
    assert main(["compare", ref, cand, "--allow-partial", "--report", str(tmp_path / "r.md")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("INCOMPLETE (--allow-partial): the candidate run is incomplete")
    assert (tmp_path / "r.md").read_text().splitlines()[2].startswith("**INCOMPLETE INPUT")


def test_exit_1_only_for_a_failing_candidate(tmp_path):
    ref = dump(tmp_path / "ref")
    bad = dump(tmp_path / "bad")  # identical: passes; then the same tokens with other logits: fails
    lines = (Path(bad) / "records.jsonl").read_text()
    assert main(["compare", ref, bad, "--policy", "lossless"]) == 0
    import shutil

    shutil.rmtree(bad)
    rng = np.random.default_rng(1)
    w = DumpWriter(tmp_path / "bad", MANIFEST)
    for line in lines.splitlines():
        r = json.loads(line)
        w.add({k: r[k] for k in ("id", "category", "prompt", "chat_template", "prompt_token_ids",
                                 "generated_token_ids", "stop_reason")}, rng.standard_normal((4, V)).astype(np.float32))
    w.close()
    assert main(["compare", ref, bad, "--policy", "lossless"]) == 1


def test_torch_threads_flag_everywhere_and_checked(capsys):
    parser = build_parser()
    for name in ("dump", "ppl", "gate", "calibrate", "demo"):
        args = parser.parse_args([name, "--torch-threads", "3"] + (["--out", "x"] if name == "dump" else []))
        assert int(args.torch_threads) == 3, name
    assert main(["dump", "--out", "x", "--torch-threads", "0"]) == 2
    assert "--torch-threads must be an integer >= 1, got 0" in capsys.readouterr().err
    assert default_torch_threads() == len(os.sched_getaffinity(0))


def test_torch_threads_default_in_a_fresh_process():
    code = ("import os, sys; os.environ.pop('OMP_WAIT_POLICY', None)\n"
            "from logitparity.cli import apply_torch_threads, build_parser, default_torch_threads\n"
            "import torch\n"
            "print(apply_torch_threads(build_parser().parse_args(['dump', '--out', 'x', '--torch-threads', '1'])))\n")
    # torch imported first: an explicit flag still applies; the wait policy is only set before torch loads
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.split() == ["1"], r.stderr
    code = ("import os, sys; os.environ.pop('OMP_WAIT_POLICY', None)\n"
            "from logitparity.cli import apply_torch_threads, build_parser, default_torch_threads\n"
            "n = apply_torch_threads(build_parser().parse_args(['ppl']))\n"
            "import torch\n"
            "print(n, torch.get_num_threads(), default_torch_threads(), os.environ['OMP_WAIT_POLICY'])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    n, got, want, policy = r.stdout.split()
    assert n == got == want and policy == "PASSIVE", r.stderr
