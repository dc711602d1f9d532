"""pytest plugin: golden-logit snapshots and the policy options.

Registered through the ``pytest11`` entry point, so installing logitparity
is enough (docs/pytest-plugin.md). It adds

- the ``logit_snapshot`` fixture: ``logit_snapshot(logits)`` stores the
  logits the first time, under
  ``<test dir>/__logit_snapshots__/<test module>/<test name>/`` as a dump
  (compact ``topk:64`` storage by default: the 64 largest logits, their ids
  and the exact log-sum-exp per position; ``storage="full"`` keeps every
  logit), and on later runs compares the new logits with it under the
  policy, failing with ``assert_logits_match``'s message. ``logit_snapshot.dump(dir)``
  does the same for a dump directory written by ``capture``.
- the ``logit_policy`` fixture: the Policy chosen on the command line, in the
  ini file, or by a ``@pytest.mark.logit_policy(...)`` marker.
- options: ``--logit-policy NAME|FILE.toml``, ``--logit-limit METRIC=VALUE``
  (repeatable), ``--logit-snapshot-update`` (rewrite snapshots),
  ``--logit-snapshot-storage full|topk:K``; ini keys ``logit_policy``,
  ``logit_limits``, ``logit_snapshot_storage``.

A missing snapshot is created, except when the environment variable CI is
true (``true``, ``1`` or ``yes``): then the test fails, so that a snapshot is
never silently made on a CI machine. ``--logit-snapshot-update`` writes even
there.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pytest

from logitparity.policy import Policy

__all__ = ["LogitSnapshot", "SNAPSHOT_DIR"]

SNAPSHOT_DIR = "__logit_snapshots__"
DEFAULT_POLICY = "fp16"
DEFAULT_STORAGE = "topk:64"
_STATS = pytest.StashKey[dict]()
_UNSAFE = re.compile(r"[^A-Za-z0-9._\-\[\]=+,]")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("logitparity", "logitparity: logit comparisons and golden-logit snapshots")
    group.addoption("--logit-policy", default=None, metavar="NAME|FILE",
                    help=f"policy for logit_snapshot and the logit_policy fixture: fp16, quantized, lossless "
                         f"or a TOML file (default: ini logit_policy, else {DEFAULT_POLICY})")
    group.addoption("--logit-limit", action="append", default=[], metavar="METRIC=VALUE",
                    help="override or add a policy threshold, e.g. kl_ref_cand.mean@100=0.05 (repeatable)")
    group.addoption("--logit-snapshot-update", action="store_true", default=False,
                    help="rewrite golden-logit snapshots instead of comparing against them")
    group.addoption("--logit-snapshot-storage", default=None, metavar="full|topk:K",
                    help=f"how new snapshots store logits (default: ini logit_snapshot_storage, else {DEFAULT_STORAGE})")
    parser.addini("logit_policy", "default policy of logit_snapshot (name or TOML path)", default=DEFAULT_POLICY)
    parser.addini("logit_limits", "policy threshold overrides, one METRIC=VALUE per line", type="linelist",
                  default=[])
    parser.addini("logit_snapshot_storage", "storage of new snapshots: full or topk:K", default=DEFAULT_STORAGE)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "logit_policy(policy=None, limits=None): the policy (name or TOML path) and {metric: limit} "
        "overrides used by logit_snapshot and the logit_policy fixture in this test",
    )
    config.stash[_STATS] = {"written": [], "updated": []}
    _policy(config, None)  # bad options fail at startup, not in every test
    _storage(config)


def _parse_limits(items: Sequence[str], where: str) -> dict[str, float]:
    out = {}
    for item in items:
        metric, sep, value = str(item).partition("=")
        try:
            number = float(value)
        except ValueError:
            number = None
        if not sep or not metric.strip() or number is None:
            raise pytest.UsageError(f"{where}: expected METRIC=VALUE such as kl_ref_cand.mean@100=0.05, got {item!r}")
        out[metric.strip()] = number
    return out


def _storage(config: pytest.Config) -> str:
    from logitparity.dump import parse_storage

    value = config.getoption("--logit-snapshot-storage") or config.getini("logit_snapshot_storage")
    try:
        parse_storage(value)
    except ValueError as e:
        raise pytest.UsageError(f"--logit-snapshot-storage: {e}") from None
    return value


def _policy(config: pytest.Config, node: pytest.Item | None) -> Policy:
    from logitparity.testing import apply_limits

    name: Any = config.getoption("--logit-policy") or config.getini("logit_policy")
    limits = {**_parse_limits(config.getini("logit_limits"), "logit_limits (ini)"),
              **_parse_limits(config.getoption("--logit-limit"), "--logit-limit")}
    marker = node.get_closest_marker("logit_policy") if node is not None else None
    if marker is not None:
        if marker.args:  # a policy named by the test replaces the session's, limits included
            name, limits = marker.args[0], {}
        limits.update(marker.kwargs.get("limits") or {})
    try:
        return apply_limits(name, limits)
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise pytest.UsageError(f"logit policy: {e}") from None


@pytest.fixture
def logit_policy(request: pytest.FixtureRequest) -> Policy:
    """The policy for this test: --logit-policy, else the ini's
    logit_policy, else fp16, with the limits of the ini's logit_limits and
    --logit-limit. A ``logit_policy(NAME, limits={...})`` marker replaces
    both; a marker with only ``limits`` adds to them."""
    return _policy(request.config, request.node)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


class LogitSnapshot:
    """Golden logits of one test (see the module docstring).

    ``directory``: where this test's snapshots live (one dump per call).
    """

    def __init__(self, request: pytest.FixtureRequest):
        self._config = request.config
        self._node = request.node
        base = Path(request.path).parent / SNAPSHOT_DIR / Path(request.path).stem
        self.directory = base
        self._test = _UNSAFE.sub("_", request.node.name)
        self._calls = 0
        self._names: set[str] = set()

    def __repr__(self) -> str:
        return f"LogitSnapshot({str(self.directory / self._test)!r})"

    def _path(self, name: str | None) -> Path:
        if name is not None:
            if not isinstance(name, str) or not name or _UNSAFE.search(name):
                raise ValueError(f"snapshot name must be a non-empty string of letters, digits and ._-, got {name!r}")
            key = f"{self._test}.{name}"
        else:
            key = self._test if self._calls == 0 else f"{self._test}.{self._calls}"
            self._calls += 1
        if key in self._names:
            raise ValueError(f"snapshot {key!r} was already used in this test; give each call its own name=")
        self._names.add(key)
        return self.directory / key

    def _need_write(self, path: Path) -> str | None:
        """-> "written", "updated" or None (compare)."""
        exists = (path / "manifest.json").is_file()
        if self._config.getoption("--logit-snapshot-update"):
            return "updated" if exists else "written"
        if exists:
            return None
        if _in_ci():
            pytest.fail(
                f"logit snapshot {path} is missing and CI is set, so it is not created here; run "
                "`pytest --logit-snapshot-update` locally and commit the directory",
                pytrace=False,
            )
        return "written"

    def __call__(self, logits: Any, *, name: str | None = None, policy: "str | Policy | None" = None,
                 storage: str | None = None, prompt_ids: Sequence[str] | None = None, tokenizer: Any = None,
                 input_ids: Any = None, limits: Mapping[str, float] | None = None) -> None:
        """Store ``logits`` ([vocab], [positions, vocab] or [batch, positions,
        vocab]; numpy or torch, fp32/fp16/bf16) the first time, compare with
        the stored ones afterwards. name: tells several snapshots of one test
        apart (default: numbered in call order). policy, limits: override
        the test's policy; storage: full or topk:K for a new snapshot (full
        when the vocabulary has at most K tokens); prompt_ids: names stored
        with a new snapshot; tokenizer, input_ids: as in
        assert_logits_match, for the failure message."""
        __tracebackhide__ = True
        from logitparity.testing import assert_against_dump

        path = self._path(name)
        action = self._need_write(path)
        if action is not None:
            _write_arrays(path, logits, storage or _storage(self._config), prompt_ids, self._node.nodeid)
            self._config.stash[_STATS][action].append(path)
            return
        assert_against_dump(_open(path), logits, self._policy(policy, limits), tokenizer=tokenizer,
                             input_ids=input_ids, hint=_UPDATE_HINT)

    def dump(self, dump_dir: "str | os.PathLike[str]", *, name: str | None = None,
             policy: "str | Policy | None" = None, storage: str | None = None,
             limits: Mapping[str, float] | None = None, **kwargs: Any) -> None:
        """Store a dump directory (from ``capture`` or an external engine)
        the first time, compare it with the stored one afterwards
        (``assert_dumps_match``; kwargs go to compare_dumps)."""
        __tracebackhide__ = True
        from logitparity.testing import assert_dumps_match

        path = self._path(name)
        action = self._need_write(path)
        if action is not None:
            _write_dump(path, dump_dir, storage or _storage(self._config))
            self._config.stash[_STATS][action].append(path)
            return
        try:
            assert_dumps_match(_open(path), dump_dir, self._policy(policy, limits), **kwargs)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{_UPDATE_HINT}") from None

    def _policy(self, policy: "str | Policy | None", limits: Mapping[str, float] | None) -> Policy:
        from logitparity.testing import apply_limits

        base = _policy(self._config, self._node) if policy is None else policy
        return apply_limits(base, limits)


_UPDATE_HINT = "if the change is intended, rewrite the snapshot: pytest --logit-snapshot-update"


@pytest.fixture
def logit_snapshot(request: pytest.FixtureRequest) -> LogitSnapshot:
    """Golden-logit snapshots for this test: ``logit_snapshot(logits)``."""
    return LogitSnapshot(request)


def _open(path: Path):
    from logitparity.dump import load_dump

    try:
        return load_dump(path)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"logit snapshot {path} is unreadable ({e}); rewrite it with --logit-snapshot-update") from None


def _replace_dir(tmp: Path, path: Path) -> None:
    """Move the finished directory tmp to path, replacing what was there."""
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _tmp_dir(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _fits(storage: str, vocab: int) -> bool:
    """Full storage holds no more than topk:K when the vocabulary fits in K."""
    from logitparity.dump import parse_storage

    k = parse_storage(storage)
    return k is None or vocab <= k


def _write_arrays(path: Path, logits: Any, storage: str, prompt_ids: Sequence[str] | None, test: str) -> None:
    from logitparity.dump import DumpWriter, bf16_to_float32
    from logitparity.metrics import topk
    from logitparity.testing import as_sequences, prompt_ids_for

    x, bf16, shape = as_sequences(logits, "logits")
    ids = prompt_ids_for(prompt_ids, x.shape[0])
    _, top1 = topk(x.reshape(-1, x.shape[2]), 1, bf16=bf16)
    tokens = top1.reshape(x.shape[:2])
    dtype = "bf16" if bf16 else "fp16" if x.dtype == np.float16 else "fp32"
    manifest = {
        "engine": {"name": "logitparity.pytest_plugin"},
        "decoding": {"mode": "greedy"},
        "snapshot": {"test": test, "shape": list(shape), "dtype": dtype},
    }
    if _fits(storage, x.shape[2]):
        storage = "full"
    tmp = _tmp_dir(path)
    with DumpWriter(tmp, manifest, storage=storage, logits_dtype=dtype if storage == "full" else "fp32",
                    flush_seconds=None) as w:
        for i, rid in enumerate(ids):
            rows = bf16_to_float32(x[i]) if bf16 else x[i]
            w.add({"id": rid, "category": "", "prompt": "", "chat_template": False, "prompt_token_ids": [],
                   "generated_token_ids": [int(t) for t in tokens[i]], "stop_reason": "max_new_tokens"}, rows)
    _replace_dir(tmp, path)


def _write_dump(path: Path, source: "str | os.PathLike[str]", storage: str) -> None:
    from logitparity.dump import DumpWriter, load_dump

    src = load_dump(source)
    tmp = _tmp_dir(path)
    if src.k is not None or _fits(storage, src.vocab_size or 0):  # stored as it is
        shutil.copytree(src.path, tmp, ignore=shutil.ignore_patterns("*.tmp", ".*"))
    else:
        keep = {k: v for k, v in src.manifest.items() if k not in ("format", "version", "created", "complete", "logits")}
        with DumpWriter(tmp, keep, storage=storage, flush_seconds=None) as w:
            for r in src.records:
                rec = {k: v for k, v in r.items() if k not in ("shard", "tensors", "n_positions")}
                w.add(rec, src.logits(r["id"], as_float32=True))
    _replace_dir(tmp, path)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    stats = config.stash.get(_STATS, None)
    if not stats:
        return
    for action in ("written", "updated"):
        paths = stats[action]
        if paths:
            where = sorted({str(p.parent) for p in paths})
            terminalreporter.write_line(
                f"logitparity: {len(paths)} logit snapshot{'s' if len(paths) != 1 else ''} {action} "
                f"under {', '.join(where)}"
            )
