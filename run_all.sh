#!/usr/bin/env bash
# Reproduce cleanqd's results: runs the grid methods x datasets x bit-widths x seeds, then writes
# results/RESULTS.md (and results/accuracy_vs_bits.png when matplotlib is installed).
#
#   ./run_all.sh --budget short --jobs 2 --data-dir ./data --teacher chenyaofo
#
# A run whose summary.json exists is skipped; one with a checkpoint but no summary is resumed; a failed run is
# reported at the end and does not stop the others. See docs/reproduce.md.
set -uo pipefail
cd "$(dirname "$0")"

# The methods are the scripts that declare a GRID (tools/grid.py): name, kind, default bits, supported bits
declare -A KIND DEFAULT_BITS SUPPORTED_BITS
ALL_METHODS=""
while read -r name kind bits supported; do
  KIND[$name]=$kind; DEFAULT_BITS[$name]=${bits//,/ }; SUPPORTED_BITS[$name]=" ${supported//,/ } "
  ALL_METHODS="$ALL_METHODS $name"
done < <(python tools/grid.py)
ALL_METHODS=${ALL_METHODS# }

BUDGET=short; JOBS=1; DATA_DIR=./data; TEACHER_DIR=""; TEACHER=""; OUT=results/runs; SEEDS="0 1 2"
METHODS="$ALL_METHODS"; DATASETS="cifar10 cifar100"; BITS=""; DRY=0; REPORT_ONLY=0; EXTRA=""
RESULTS=results

usage() {
  cat <<EOF
usage: ./run_all.sh [options]
  --budget paper|short|smoke  paper: each paper's recipe (GPU hours); short: 3-45 CPU minutes per run; smoke: seconds (default short)
  --methods "NAME ..."        methods (scripts declaring a GRID) to run (default: $METHODS)
  --datasets "cifar10 ..."    datasets (default: $DATASETS)
  --bits "3 4 5"              bit-widths W=A for every method (default: each method's own, from its GRID)
  --seeds "0 1 2"             seeds (default: $SEEDS)
  --jobs N                    runs at once; spread over the visible GPUs when there are any (default 1)
  --data-dir DIR              CIFAR folder passed to every run (default ./data)
  --teacher NAME              'pytorchcv' or 'chenyaofo' (downloaded once), passed to every run (default: each script's)
  --teacher-dir DIR           folder with {dataset}_resnet20*.pth teachers (local files; overrides --teacher)
  --out-dir DIR               where runs go, as DIR/BUDGET/NAME (default results/runs)
  --results-dir DIR           where RESULTS.md and accuracy_vs_bits.png go (default results)
  --extra "ARGS"              extra arguments for every run (e.g. "--device cpu")
  --dry-run                   print the commands only
  --report-only               only rebuild results/RESULTS.md from the summaries
EOF
}

while [ $# -gt 0 ]; do
  case "$1" in
    --budget) BUDGET="$2"; shift 2;;
    --methods) METHODS="$2"; shift 2;;
    --datasets) DATASETS="$2"; shift 2;;
    --bits) BITS="$2"; shift 2;;
    --seeds) SEEDS="$2"; shift 2;;
    --jobs) JOBS="$2"; shift 2;;
    --data-dir) DATA_DIR="$2"; shift 2;;
    --teacher-dir) TEACHER_DIR="$2"; shift 2;;
    --teacher) TEACHER="$2"; shift 2;;
    --out-dir) OUT="$2"; shift 2;;
    --results-dir) RESULTS="$2"; shift 2;;
    --extra) EXTRA="$2"; shift 2;;
    --dry-run) DRY=1; shift;;
    --report-only) REPORT_ONLY=1; shift;;
    -h|--help) usage; exit 0;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2;;
  esac
done

case "$BUDGET" in paper|short|smoke) ;; *) echo "error: --budget must be paper, short or smoke" >&2; exit 2;; esac
[[ "$JOBS" =~ ^[1-9][0-9]*$ ]] || { echo "error: --jobs must be a positive integer" >&2; exit 2; }

# Budgets, one per kind of method (a script's GRID names its kind): the zero-shot (generator) methods share one
# recipe, the label-free (real-data) methods another.
case "$BUDGET" in
  paper) ZERO_SHOT_ARGS=""; LABEL_FREE_ARGS="";;
  short) ZERO_SHOT_ARGS="--batch-size 64 --iters-per-epoch 50 --warmup-epochs 4 --epochs 16 --milestones-from train"
         LABEL_FREE_ARGS="--epochs 2 --train-subset 10000";;
  smoke) ZERO_SHOT_ARGS="--batch-size 8 --iters-per-epoch 2 --warmup-epochs 1 --epochs 2 --milestones-from train"
         LABEL_FREE_ARGS="--epochs 1 --train-subset 32 --batch-size 8";;
esac

NGPU=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$NGPU" -gt 0 ]; then THREADS=0; else THREADS=$(( $(nproc) / JOBS )); [ "$THREADS" -lt 1 ] && THREADS=1; fi

DIR="$OUT/$BUDGET"
mkdir -p "$DIR"
LIST=$(mktemp)
trap 'rm -f "$LIST"' EXIT
i=0; skipped=0
if [ "$REPORT_ONLY" = 0 ]; then
  for ds in $DATASETS; do
    teacher_arg=""
    [ -n "$TEACHER" ] && teacher_arg="--teacher $TEACHER"
    if [ -n "$TEACHER_DIR" ]; then
      t=$(ls "$TEACHER_DIR"/${ds}_resnet20*.pth 2>/dev/null | head -n 1)
      [ -z "$t" ] && { echo "error: no ${ds}_resnet20*.pth in $TEACHER_DIR" >&2; exit 2; }
      teacher_arg="--teacher $t"
    fi
    for m in $METHODS; do
      [ -n "${KIND[$m]:-}" ] || { echo "error: unknown method $m (no $m.py declaring a GRID)" >&2; exit 2; }
      case "${KIND[$m]}" in
        zero-shot) budget_args="$ZERO_SHOT_ARGS";;
        label-free) budget_args="$LABEL_FREE_ARGS";;
        *) echo "error: $m.py declares kind '${KIND[$m]}'; run_all.sh knows zero-shot and label-free" >&2; exit 2;;
      esac
      for b in ${BITS:-${DEFAULT_BITS[$m]}}; do
        [[ "${SUPPORTED_BITS[$m]}" == *" $b "* ]] || { echo "note: $m does not support W${b}A${b}; skipped"; continue; }
        for s in $SEEDS; do
          name="${ds}__${m}__w${b}a${b}__seed${s}"
          if [ -f "$DIR/$name/summary.json" ]; then skipped=$((skipped + 1)); continue; fi
          dev=""; [ "$NGPU" -gt 0 ] && dev="--device cuda:$((i % NGPU))"
          if [ -f "$DIR/$name/checkpoint.pt" ]; then
            cmd="python $m.py --resume $DIR/$name --threads $THREADS $dev"
          else
            cmd="python $m.py --dataset $ds --wbits $b --seed $s --data-dir $DATA_DIR $teacher_arg $budget_args --out-dir $DIR --run-name $name --threads $THREADS $dev $EXTRA"
          fi
          echo "$name|$cmd" >> "$LIST"; i=$((i + 1))
        done
      done
    done
  done
  echo "run_all: budget $BUDGET, $i runs to do, $skipped already finished (skipped), $JOBS at once, $NGPU GPUs"
  if [ "$DRY" = 1 ]; then cut -d'|' -f2- "$LIST"; exit 0; fi
  # each job: run, log to DIR/NAME.log, and print a FAILED line if it exits non-zero
  tr '\n' '\0' < "$LIST" | xargs -0 -r -P "$JOBS" -I{} bash -c '
    line="$1"; name="${line%%|*}"; cmd="${line#*|}"; log="$2/$name.log"
    echo "start $name"
    if $cmd > "$log" 2>&1; then echo "done  $name"; else echo "FAILED $name (exit $?; see $log: $(tail -n 1 "$log"))"; fi
  ' _ {} "$DIR" | tee "$DIR/run_all.last.txt"
fi

python tools/report.py --runs "$OUT" --out "$RESULTS/RESULTS.md" --plot "$RESULTS/accuracy_vs_bits.png"
failed=$(grep -c '^FAILED' "$DIR/run_all.last.txt" 2>/dev/null || true)
if [ "$REPORT_ONLY" = 0 ] && [ "${failed:-0}" -gt 0 ]; then
  echo "run_all: $failed run(s) failed:"; grep '^FAILED' "$DIR/run_all.last.txt"; exit 1
fi
exit 0
