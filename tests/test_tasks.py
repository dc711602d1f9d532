"""Multiple-choice task accuracy: McNemar against hand-computed p-values,
paired figures against numpy, log-likelihoods against a float64 forward
pass, loaders and their errors, the CLI, and the verdict on the default
model for a planted bug and a benign bf16 candidate."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from logitparity.tasks import (
    Question,
    TaskRun,
    compare_tasks,
    format_question,
    generate_questions,
    load_questions,
    mcnemar_exact,
)

# --------------------------------------------------------------------------
# McNemar, exact


@pytest.mark.parametrize("b,c,want", [
    (0, 0, 1.0),
    (5, 0, 2 / 32),  # 2 * P[X <= 0], X ~ Bin(5, 1/2)
    (0, 5, 2 / 32),
    (10, 2, 2 * (1 + 12 + 66) / 4096),  # C(12,0) + C(12,1) + C(12,2)
    (1, 8, 2 * (1 + 9) / 512),
    (3, 3, 1.0),  # 2 * 42/64 > 1 -> capped
    (1, 0, 1.0),
])
def test_mcnemar_exact_hand_values(b, c, want):
    assert mcnemar_exact(b, c) == pytest.approx(want, rel=1e-15)


def test_mcnemar_rejects_negative_counts():
    with pytest.raises(ValueError, match=r"discordant counts must be >= 0, got b=-1, c=2"):
        mcnemar_exact(-1, 2)


# --------------------------------------------------------------------------
# Paired figures


def _run(questions, predictions, scoring="text") -> TaskRun:
    width = max(len(q.choices) for q in questions)
    ll = np.full((len(questions), width), -5.0)
    for i, p in enumerate(predictions):
        ll[i, p] = -1.0
    return TaskRun(list(questions), ll, scoring, {"path": "m", "dtype": "fp32", "device": "cpu"})


def _questions(n, subjects=("a", "b")):
    return [Question(f"q{i}", subjects[i % len(subjects)], f"question {i}", ("w", "x", "y", "z"), i % 4)
            for i in range(n)]


def test_paired_figures_against_numpy():
    rng = np.random.default_rng(0)
    qs = _questions(50)
    answers = np.array([q.answer for q in qs])
    ref_pred = np.where(rng.random(50) < 0.7, answers, (answers + 1) % 4)
    cand_pred = np.where(rng.random(50) < 0.8, ref_pred, (ref_pred + 2) % 4)
    c = compare_tasks(_run(qs, ref_pred), _run(qs, cand_pred))
    rc, cc = ref_pred == answers, cand_pred == answers
    d = cc.astype(float) - rc.astype(float)
    assert c.reference.accuracy.k == rc.sum() and c.candidate.accuracy.k == cc.sum()
    assert c.reference.accuracy.se == pytest.approx(math.sqrt(rc.mean() * (1 - rc.mean()) / 50))
    assert c.delta == pytest.approx(d.mean())
    assert c.delta_se == pytest.approx(d.std(ddof=1) / math.sqrt(50))
    assert c.agreement.k == (ref_pred == cand_pred).sum()
    assert (c.b, c.c) == ((rc & ~cc).sum(), (~rc & cc).sum())
    assert c.p_value == mcnemar_exact(c.b, c.c)
    by = {s.subject: s for s in c.by_subject}
    for s in ("a", "b"):
        ix = np.array([q.subject == s for q in qs])
        assert by[s].n == ix.sum()
        assert by[s].reference.k == rc[ix].sum() and by[s].candidate.k == cc[ix].sum()
        assert by[s].agreement.k == (ref_pred == cand_pred)[ix].sum()


def test_ties_go_to_the_lower_choice():
    qs = _questions(1)
    run = TaskRun(qs, np.array([[-1.0, -1.0, -2.0, -3.0]]), "text", {})
    assert run.predictions.tolist() == [0]


def test_verdict_fails_only_a_significant_drop_beyond_max_drop():
    qs = _questions(40)
    answers = [q.answer for q in qs]
    wrong = [(a + 1) % 4 for a in answers]
    ref = _run(qs, answers)
    cand = _run(qs, wrong[:12] + answers[12:])  # b = 12, c = 0: p = 2 / 4096
    assert compare_tasks(ref, cand).verdict == "FAIL"
    assert compare_tasks(ref, cand, max_drop=0.35).verdict == "PASS"  # drop 0.30 is tolerated
    assert compare_tasks(ref, cand, alpha=1e-4).verdict == "PASS"  # p = 4.9e-4 is not below alpha
    assert compare_tasks(cand, ref).verdict == "PASS"  # a significant improvement is no failure
    assert compare_tasks(ref, _run(qs, wrong[:2] + answers[2:])).verdict == "PASS"  # b = 2: p = 0.5


def test_compare_rejects_other_questions_and_scorings():
    qs = _questions(4)
    with pytest.raises(ValueError, match=r"different questions \(first difference at index 0; 4 vs 4 questions\)"):
        compare_tasks(_run(qs, [0] * 4), _run(list(reversed(qs)), [0] * 4))
    with pytest.raises(ValueError, match=r"different scorings \('text' vs 'letter'\)"):
        compare_tasks(_run(qs, [0] * 4), _run(qs, [0] * 4, scoring="letter"))
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\), got 1.5"):
        compare_tasks(_run(qs, [0] * 4), _run(qs, [0] * 4), alpha=1.5)
    with pytest.raises(ValueError, match=r"max_drop must be in \[0, 1\), got -0.1"):
        compare_tasks(_run(qs, [0] * 4), _run(qs, [0] * 4), max_drop=-0.1)


def test_markdown_and_json():
    qs = _questions(8)
    c = compare_tasks(_run(qs, [q.answer for q in qs]), _run(qs, [0] * 8))
    md = c.to_markdown()
    assert "## Task accuracy (multiple choice)" in md and "McNemar exact p" in md
    assert "| a | 4 |" in md
    d = json.loads(json.dumps(c.to_dict(), allow_nan=False))
    assert d["mcnemar"]["b_ref_right_cand_wrong"] == c.b and d["verdict"] == c.verdict
    assert (d["format"], d["version"]) == ("logitparity-tasks", "1.0")


# --------------------------------------------------------------------------
# The bundled set and the loaders


def test_bundled_file_is_the_generator_output():
    assert load_questions() == generate_questions(seed=0)


def test_bundled_answers_are_right():
    """Recompute every answer from the question text alone."""
    days = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
    months = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
              "October", "November", "December"]
    factors = {("minutes", "hours"): 60, ("seconds", "minutes"): 60, ("centimeters", "meters"): 100,
               ("grams", "kilograms"): 1000, ("meters", "kilometers"): 1000, ("hours", "days"): 24,
               ("months", "years"): 12}
    qs = load_questions()
    assert len(qs) == 200 and {q.subject for q in qs} == {"addition", "multiplication", "units", "ordering",
                                                           "calendar"}
    for q in qs:
        t = q.question
        if m := re.fullmatch(r"What is (\d+) \+ (\d+)\?", t):
            want = str(int(m[1]) + int(m[2]))
        elif m := re.fullmatch(r"What is (\d+) times (\d+)\?", t):
            want = str(int(m[1]) * int(m[2]))
        elif m := re.fullmatch(r"How many (\w+) are in (\d+) (\w+)\?", t):
            want = str(int(m[2]) * factors[(m[1], m[3])])
        elif m := re.fullmatch(r"Which of these numbers is the (largest|smallest)\?", t):
            nums = [int(x) for x in q.choices]
            want = str(max(nums) if m[1] == "largest" else min(nums))
        elif m := re.fullmatch(r"What day of the week is (one|two|three) days? after (\w+)\?", t):
            want = days[(days.index(m[2]) + {"one": 1, "two": 2, "three": 3}[m[1]]) % 7]
        elif m := re.fullmatch(r"Which month comes right after (\w+)\?", t):
            want = months[(months.index(m[1]) + 1) % 12]
        else:
            raise AssertionError(f"unrecognised question {t!r}")
        assert q.choices[q.answer] == want, q
        assert len(set(q.choices)) == len(q.choices) == 4


def test_answer_positions_are_spread():
    counts = np.bincount([q.answer for q in load_questions()], minlength=4)
    assert counts.min() >= 30, counts  # 200 questions, 4 positions


def test_jsonl_with_letters_and_subject_filter(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"question": "2+2?", "choices": ["3", "4"], "answer": "B", "subject": "math"}\n\n'
                 '{"id": "x", "question": "Sky?", "choices": ["blue", "green", "red"], "answer": 0, '
                 '"subject": "nature"}\n', encoding="utf-8")
    qs = load_questions(f)
    assert qs == [Question("line-1", "math", "2+2?", ("3", "4"), 1),
                  Question("x", "nature", "Sky?", ("blue", "green", "red"), 0)]
    assert [q.id for q in load_questions(f, subjects=["nature"])] == ["x"]
    assert len(load_questions(f, limit=1)) == 1


def test_jsonl_keeps_line_separator_characters_inside_a_question(tmp_path):
    # U+2028 and U+0085 are line breaks to str.splitlines but plain characters in JSON strings
    f = tmp_path / "t.jsonl"
    f.write_bytes('{"question": "a\u2028b\u0085c?", "choices": ["x", "y"], "answer": 1, "subject": "s"}\r\n'
                  .encode("utf-8"))
    (q,) = load_questions(f)
    assert q.question == "a\u2028b\u0085c?" and q.answer == 1 and q.id == "line-1"


def test_mmlu_csv(tmp_path):
    f = tmp_path / "abstract_algebra_test.csv"
    f.write_text('"Find the degree of Q(sqrt 2) over Q.",0,2,4,6,B\n"Is Z a field?",yes,no,maybe,never,B\n',
                 encoding="utf-8")
    qs = load_questions(f)
    assert [q.subject for q in qs] == ["abstract_algebra"] * 2
    assert qs[0] == Question("abstract_algebra-1", "abstract_algebra", "Find the degree of Q(sqrt 2) over Q.",
                             ("0", "2", "4", "6"), 1)


@pytest.mark.parametrize("line,match", [
    ('{"question": "q", "choices": ["a", "b"], "answer": 2}', r"answer must be in \[0, 1\] for 2 choices, got 2"),
    ('{"question": "q", "choices": ["a", "b"], "answer": "C"}', r"answer 'C' is not one of the 2 choices' letters A-B"),
    ('{"question": "q", "choices": ["a", "b"], "answer": true}', r"answer must be a choice index .* got True"),
    ('{"question": "q", "choices": ["a", "b"], "answer": "yes"}', r"answer must be a choice index .* got 'yes'"),
    ('{"question": "q", "choices": ["a"], "answer": 0}', r"choices must be a list of 2 to 26 strings"),
    ('{"question": "q", "choices": ["a", "a"], "answer": 0}', r"choices must differ from each other"),
    ('{"question": "q", "choices": ["a", ""], "answer": 0}', r"every choice must be a non-empty string"),
    ('{"question": "", "choices": ["a", "b"], "answer": 0}', r"question must be a non-empty string"),
    ('{"choices": ["a", "b"]}', r"missing field\(s\) question, answer"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 0, "subject": 3}', r"subject must be a non-empty string"),
    ('{"id": 7, "question": "q", "choices": ["a", "b"], "answer": 0}', r"id must be a string, got 7"),
    ('[1, 2]', r"expected a JSON object with question, choices, answer, subject; got list"),
    ('{"question": ', r"t.jsonl:1: not a JSON object"),
])
def test_malformed_question_lines(tmp_path, line, match):
    f = tmp_path / "t.jsonl"
    f.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        load_questions(f)


def test_loader_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tasks file .*nope.jsonl does not exist"):
        load_questions(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match=r"is a directory; pass one JSONL or CSV file"):
        load_questions(tmp_path)
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"question": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"is not UTF-8 text"):
        load_questions(bad)
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": "a", "question": "q", "choices": ["x", "y"], "answer": 0}\n' * 2, encoding="utf-8")
    with pytest.raises(ValueError, match=r"duplicate question id 'a'"):
        load_questions(dup)
    short = tmp_path / "s_test.csv"
    short.write_text("q,a,B\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"an MMLU CSV row is question, 2 or more choices, answer letter; got 3"):
        load_questions(short)
    with pytest.raises(ValueError, match=r"subjects \['poetry'\] are not in the tasks file"):
        load_questions(subjects=["poetry"])
    with pytest.raises(ValueError, match=r"limit must be >= 1, got 0"):
        load_questions(limit=0)


def test_formats():
    q = Question("i", "high_school_math", "What is 2 + 2?", ("3", "4"), 1)
    ctx, conts = format_question(q, "letter")
    assert ctx == ("The following are multiple choice questions (with answers) about high school math.\n\n"
                   "What is 2 + 2?\nA. 3\nB. 4\nAnswer:")
    assert conts == [" A", " B"]
    assert format_question(q, "text") == ("Question: What is 2 + 2?\nAnswer:", [" 3", " 4"])
    with pytest.raises(ValueError, match=r"scoring must be one of \('letter', 'text'\), got 'mc'"):
        format_question(q, "mc")


# --------------------------------------------------------------------------
# Scoring on a model


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir, torch_one_thread):
    from logitparity.capture import load_model

    return load_model(tiny_model_dir)


@pytest.mark.parametrize("scoring", ["text", "letter"])
def test_logliks_match_a_float64_forward_pass(tiny_lm, scoring):
    """Every choice's log-likelihood against a float64 copy of the model run
    on context + continuation alone (no batching, no padding)."""
    import copy

    import torch

    from logitparity.tasks import _encode, run_tasks

    qs = load_questions(limit=6) + load_questions(subjects=["calendar"], limit=3)
    run = run_tasks(tiny_lm, qs, scoring=scoring, batch_size=5)
    m64 = copy.deepcopy(tiny_lm.model).double()
    for i, q in enumerate(qs):
        ctx, conts = format_question(q, scoring)
        for j, cont in enumerate(conts):
            a, b = _encode(tiny_lm.tokenizer, ctx, cont)
            ids = torch.tensor([a + b])
            with torch.no_grad():
                lp = torch.log_softmax(m64(input_ids=ids).logits[0].double(), dim=-1)
            want = sum(float(lp[len(a) - 1 + t, tok]) for t, tok in enumerate(b))
            assert run.logliks[i, j] == pytest.approx(want, abs=2e-4), (q.id, j)


def test_continuation_split_like_lm_eval(tiny_lm):
    from logitparity.tasks import _encode

    ctx, cont = _encode(tiny_lm.tokenizer, "Question: What is 2 + 2?\nAnswer:", " 4")
    whole = tiny_lm.tokenizer("Question: What is 2 + 2?\nAnswer: 4")["input_ids"]
    assert ctx + cont == list(whole) and cont


def test_cli_same_model_passes_and_writes_json(tiny_model_dir, tmp_path):
    from logitparity.cli import main

    out = tmp_path / "t.json"
    rc = main(["tasks", "--model", tiny_model_dir, "--candidate", tiny_model_dir, "--limit", "6",
               "--json", str(out), "--report", str(tmp_path / "t.md")])
    assert rc == 0
    d = json.loads(out.read_text())
    assert d["verdict"] == "PASS" and d["agreement"]["rate"] == 1.0 and d["questions"] == 6
    assert (tmp_path / "t.md").read_text().startswith("## Task accuracy")


def test_cli_nothing_to_compare(tiny_model_dir, capsys):
    from logitparity.cli import main

    assert main(["tasks", "--model", tiny_model_dir]) == 2
    assert "nothing to compare: the candidate is the reference" in capsys.readouterr().err


@pytest.mark.slow
def test_default_model_planted_bug_fails_and_bf16_passes(torch_one_thread):
    """SmolLM2-135M on the bundled multiplication and units questions (80):
    the reference answers 81% right; a post-attention norm weight left at
    ones in layer 10 drops it to 30% (McNemar p ~ 6e-11): FAIL; the same
    model in bf16 agrees on 95% of answers with no significant change: PASS."""
    from logitparity.capture import load_model
    from logitparity.capture.plants import planted
    from logitparity.tasks import run_tasks

    lm = load_model(None)
    qs = load_questions(subjects=["multiplication", "units"])
    ref = run_tasks(lm, qs)
    assert ref.accuracy.rate > 0.7
    with planted(lm, "norm_weight_missing", layer=10):
        bad = compare_tasks(ref, run_tasks(lm, qs))
    assert bad.verdict == "FAIL" and bad.delta < -0.3 and bad.p_value < 1e-6
    bf16 = compare_tasks(ref, run_tasks(load_model(None, dtype="bf16"), qs))
    assert bf16.verdict == "PASS" and bf16.agreement.rate >= 0.9
