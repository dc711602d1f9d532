#!/usr/bin/env bash
# Run ANY external engine on the reference dump's prompts, then compare its
# dump with the reference. This is how a Rust, C++ or other engine plugs in:
# it reads a prompts file and writes a dump (docs/dump-format.md).
#
# usage: quality_candidate_compare.sh REF_DUMP WORK_DIR ENGINE_COMMAND...
#
#   {prompts} and {out} in ENGINE_COMMAND are replaced by the prompts file and
#   the dump directory the engine must write (also exported as LP_PROMPTS and
#   LP_OUT). The prompts file is JSONL, one prompt per line: id, category,
#   text, chat_template and prompt_token_ids (the reference's exact input
#   tokens, so an engine needs no tokenizer to see the same input).
#   COMPARE_ARGS (e.g. "--policy quantized") is passed to quality_compare.py.
#
# example:
#   benchmarks/quality/quality_candidate_compare.sh ref-dump work \
#     python benchmarks/quality/example_engine.py --model HF_DIR --prompts {prompts} --out {out}
#
# Exit status: that of the comparison (0 pass, 1 fail, 2 error), or the
# engine's when it fails.
set -euo pipefail

if [ "$#" -lt 3 ]; then
  sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
ref=$1
work=$2
shift 2
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python}

if [ ! -f "$ref/records.jsonl" ]; then
  echo "quality_candidate_compare: $ref is not a dump directory (no records.jsonl)" >&2
  exit 2
fi
mkdir -p "$work"
export LP_PROMPTS="$work/prompts.jsonl"
export LP_OUT="$work/candidate"
if [ -e "$LP_OUT" ]; then
  echo "quality_candidate_compare: $LP_OUT already exists; remove it or choose another WORK_DIR" >&2
  exit 2
fi

# The prompts file, from the reference's records (json only).
"$py" - "$ref/records.jsonl" "$LP_PROMPTS" <<'PY'
import json, sys
with open(sys.argv[1], encoding="utf-8") as f, open(sys.argv[2], "w", encoding="utf-8") as out:
    for line in f:
        if line.strip():
            r = json.loads(line)
            keep = {"id": r["id"], "category": r["category"], "text": r["prompt"],
                    "chat_template": r["chat_template"], "prompt_token_ids": r["prompt_token_ids"]}
            out.write(json.dumps(keep, ensure_ascii=False) + "\n")
PY

cmd=()
for a in "$@"; do
  a=${a//\{prompts\}/$LP_PROMPTS}
  a=${a//\{out\}/$LP_OUT}
  cmd+=("$a")
done
echo "+ ${cmd[*]}" >&2
"${cmd[@]}"

set +e
# shellcheck disable=SC2086  # COMPARE_ARGS is a list of options
"$py" "$here/quality_compare.py" "$ref" "$LP_OUT" --report "$work/report.md" --json "$work/report.json" \
  --plots "$work/plots" ${COMPARE_ARGS:-}
exit $?
