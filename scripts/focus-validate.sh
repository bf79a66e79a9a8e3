#!/usr/bin/env bash
# Validate margin's FOCUS 1.2 export with the FinOps Foundation's focus-validator 2.2.1.
#
#   scripts/focus-validate.sh                 # synthetic ledger -> export CSV and Parquet -> validate both
#   scripts/focus-validate.sh spend.parquet   # validate files you exported
#
# focus-validator 2.2.1 needs Python >= 3.12, so it gets its own venv (FOCUS_VENV, default
# .margin/focus-venv) built from the first Python >= 3.12 found: $FOCUS_PYTHON, python3.13 or
# python3.12 on PATH, then pyenv's versions (this machine image ships 3.12.1 and 3.13.0 there).
# Everything comes from PyPI; the validator runs with --block-download (its rules for 1.2 are
# bundled). Exits non-zero if any rule fails other than the one justified in docs/analytics.md.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${FOCUS_VENV:-$ROOT/.margin/focus-venv}"
MARGIN_PY="${MARGIN_PY:-$ROOT/.venv/bin/python}"
# The validator's rules for features margin has (naming, sub-accounts, usage, unit and list prices,
# resource types, tags); those it lacks (regions, zones, commitments, capacity reservations,
# negotiated prices, several currencies) are not claimed.
CRITERIA="ACCOUNT_NAMING_SUPPORTED,SUB_ACCOUNT_SUPPORTED,USAGE_MEASUREMENT_SUPPORTED,UNIT_PRICING_SUPPORTED,PUBLIC_PRICE_LIST_SUPPORTED,RESOURCE_TYPE_ASSIGNMENT_SUPPORTED,TAGGING_SUPPORTED"
# InvoiceId-C-004-C and -C-005-C are the two branches of one OR rule (InvoiceId-C-003-C, which
# passes): null when not invoiced, not null when invoiced. The validator checks each branch on its
# own, so one of the two always fails; margin's rows are not invoiced (null), so -C-005-C does.
ALLOWED_FAILURES="InvoiceId-C-005-C"

find_python() {
  local c
  for c in "${FOCUS_PYTHON:-}" python3.13 python3.12 \
           "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3 /usr/bin/python3.1[2-9]; do
    [ -n "$c" ] || continue
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$c"
      return 0
    fi
  done
  return 1
}

PINS="focus-validator==2.2.1 numpy==1.26.4 pyarrow==20.0.0"  # 2.2.1 needs numpy<2; pyarrow>=21 needs numpy 2
if [ ! -x "$VENV/bin/focus-validator" ] || [ "$(cat "$VENV/.pins" 2>/dev/null)" != "$PINS" ]; then
  PY="$(find_python)" || { echo "focus-validate: no Python >= 3.12 found (set FOCUS_PYTHON)" >&2; exit 2; }
  echo "focus-validate: building $VENV with $PY ($("$PY" -V))"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install --quiet --disable-pip-version-check $PINS 2> >(grep -v "is neither a file nor a directory" >&2)
  echo "$PINS" > "$VENV/.pins"
fi
SITE="$("$VENV/bin/python" -c 'import focus_validator, os; print(os.path.dirname(os.path.dirname(focus_validator.__file__)))')"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
FILES=("$@")
if [ ${#FILES[@]} -eq 0 ]; then
  cat > "$WORK/margin.yaml" <<EOF
providers: [{name: p, kind: openai, base_url: "http://127.0.0.1:9/v1"}]
models: [{name: m, provider: p, price: {per_million: {input: "1", output: "2"}}}]
ledger: {url: "sqlite:///$WORK/ledger.db"}
EOF
  "$MARGIN_PY" -m margin.analytics.synthetic "sqlite:///$WORK/ledger.db" --events 20000 --start 2026-11-01 --days 30
  for ext in csv parquet; do
    "$MARGIN_PY" -m margin export focus --config "$WORK/margin.yaml" --warehouse :memory: \
      --period 2026-11 --out "$WORK/spend.$ext"
    FILES+=("$WORK/spend.$ext")
  done
fi

status=0
for f in "${FILES[@]}"; do
  abs="$(cd "$(dirname "$f")" && pwd)/$(basename "$f")"
  # Run from site-packages: 2.2.1 opens its bundled currency list by a path relative to the cwd.
  (cd "$SITE" && "$VENV/bin/focus-validator" --data-file "$abs" --validate-version 1.2 --block-download \
      --applicability-criteria "$CRITERIA") > "$WORK/report.txt" 2>&1 || true
  total="$(grep -E '^Total:' "$WORK/report.txt" | head -1 || true)"
  if [ -z "$total" ]; then
    echo "focus-validate: $f: the validator did not finish:" >&2
    tail -20 "$WORK/report.txt" >&2
    status=1
    continue
  fi
  failed="$(grep -oE '^❌ [A-Za-z]+-[A-Z]-[0-9]+-[A-Z]+: FAIL' "$WORK/report.txt" | awk '{print $2}' | tr -d ':' | sort -u)"
  unexpected="$(comm -23 <(echo "$failed" | sed '/^$/d') <(echo "$ALLOWED_FAILURES" | tr ',' '\n' | sort -u))"
  echo "focus-validate: $(basename "$f"): $total; failed: ${failed//$'\n'/ }"
  if [ -n "$unexpected" ]; then
    echo "focus-validate: $f: unexpected failures: ${unexpected//$'\n'/ }" >&2
    grep -A2 -E "^- ($(echo "$unexpected" | paste -sd'|')):" "$WORK/report.txt" >&2 || true
    status=1
  fi
done
exit $status
