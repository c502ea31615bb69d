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
METHODS="$ALL_METHODS"; DATASETS="cifar10 cifar100"; BITS=""; DRY=0; REPORT_ONLY=0; EXTRA=""; LIST_ONLY=0; TASK=""
ARCHS="resnet18 resnet50 mobilenet_v2"; IMAGENET_DIR=./data/imagenet
SLURM=""; ORIG_ARGS=("$@")
RESULTS=results

usage() {
  cat <<EOF
usage: ./run_all.sh [options]
  --budget paper|short|smoke  paper: each paper's recipe (GPU hours); short: 3-45 CPU minutes per run; smoke: seconds (default short)
  --methods "NAME ..."        methods (scripts declaring a GRID) to run (default: $METHODS)
  --datasets "cifar10 ..."    datasets: cifar10, cifar100, imagenet (the zero-shot methods; one GPU per run) (default: $DATASETS)
  --archs "resnet18 ..."      ImageNet networks, torchvision's (default: $ARCHS)
  --imagenet-dir DIR          folder holding ImageNet's val/<wnid>/ folders (default $IMAGENET_DIR)
  --bits "3 4 5"              bit-widths W=A for every method (default: each method's own, from its GRID)
  --seeds "0 1 2"             seeds (default: $SEEDS)
  --jobs N                    runs at once; spread over the visible GPUs when there are any (default 1)
  --data-dir DIR              CIFAR folder passed to every run (default ./data)
  --teacher NAME              'pytorchcv' or 'chenyaofo' (CIFAR), 'torchvision' or 'pytorchcv' (ImageNet), downloaded
                              once, passed to every run (default: each script's)
  --teacher-dir DIR           folder with {dataset}_resnet20*.pth / imagenet_{arch}*.pth teachers (local files;
                              overrides --teacher)
  --out-dir DIR               where runs go, as DIR/BUDGET/NAME (default results/runs)
  --results-dir DIR           where RESULTS.md and accuracy_vs_bits.png go (default results)
  --extra "ARGS"              extra arguments for every run (e.g. "--device cpu")
  --dry-run                   print the commands still to run (finished runs skipped, stopped ones resumed)
  --report-only               only rebuild results/RESULTS.md from the summaries
  --list                      print the whole grid, one fresh-start command per line (for GNU parallel or any
                              scheduler), in task order
  --task I                    run only line I (from 0) of --list: skipped if finished, resumed if checkpointed
  --slurm "SBATCH OPTIONS"    (each as --key=value) write DIR/BUDGET/slurm_array.sh (one array task per run, --task \$SLURM_ARRAY_TASK_ID,
                              --jobs at once, requeued on preemption or SIGTERM) and submit it with sbatch if present
EOF
}

while [ $# -gt 0 ]; do
  case "$1" in
    --budget) BUDGET="$2"; shift 2;;
    --methods) METHODS="$2"; shift 2;;
    --datasets) DATASETS="$2"; shift 2;;
    --archs) ARCHS="$2"; shift 2;;
    --imagenet-dir) IMAGENET_DIR="$2"; shift 2;;
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
    --list) LIST_ONLY=1; shift;;
    --task) TASK="$2"; shift 2;;
    --slurm) SLURM="$2"; shift 2;;
    -h|--help) usage; exit 0;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2;;
  esac
done

case "$BUDGET" in paper|short|smoke) ;; *) echo "error: --budget must be paper, short or smoke" >&2; exit 2;; esac
[[ "$JOBS" =~ ^[1-9][0-9]*$ ]] || { echo "error: --jobs must be a positive integer" >&2; exit 2; }
[ -z "$TASK" ] || [[ "$TASK" =~ ^[0-9]+$ ]] || { echo "error: --task must be a line number from 0" >&2; exit 2; }

# Budgets, one per kind of method (a script's GRID names its kind): the zero-shot (generator) methods share one
# recipe, the label-free (real-data) methods another.
case "$BUDGET" in
  paper) ZERO_SHOT_ARGS=""; LABEL_FREE_ARGS="";;
  short) ZERO_SHOT_ARGS="--batch-size 64 --iters-per-epoch 50 --warmup-epochs 4 --epochs 16 --milestones-from train"
         LABEL_FREE_ARGS="--epochs 2 --train-subset 10000";;
  smoke) ZERO_SHOT_ARGS="--batch-size 8 --iters-per-epoch 2 --warmup-epochs 1 --epochs 2 --milestones-from train"
         LABEL_FREE_ARGS="--epochs 1 --train-subset 32 --batch-size 8";;
esac

declare -A METHOD_BUDGET_ARGS  # flags a method's GRID adds for this budget (e.g. the size of a synthesis stage)
while IFS=$'\t' read -r name a; do METHOD_BUDGET_ARGS[$name]=$a; done < <(python tools/grid.py --budget-args "$BUDGET")

NGPU=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$NGPU" -gt 0 ]; then THREADS=0; else THREADS=$(( $(nproc) / JOBS )); [ "$THREADS" -lt 1 ] && THREADS=1; fi

DIR="$OUT/$BUDGET"
LIST=$(mktemp)
trap 'rm -f "$LIST"' EXIT
# The grid, in task order: one line per run, NAME|fresh command (the same on every machine: no device, no skip)
GRID=$(mktemp); trap 'rm -f "$LIST" "$GRID"' EXIT
[ "$REPORT_ONLY" = 1 ] && DATASETS=""  # no runs: only the report below
for ds in $DATASETS; do
  case "$ds" in
    cifar10|cifar100) cells="$ds";;
    imagenet) cells=""; for a in $ARCHS; do
                case "$a" in resnet18|resnet50|mobilenet_v2) cells="$cells imagenet-$a";;
                  *) echo "error: unknown --archs entry $a (resnet18, resnet50, mobilenet_v2)" >&2; exit 2;; esac
              done;;
    *) echo "error: unknown dataset $ds (cifar10, cifar100, imagenet)" >&2; exit 2;;
  esac
  for cell in $cells; do
  arch="${cell#imagenet-}"
  if [ "$ds" = imagenet ]; then
    data_arg="--data-dir $IMAGENET_DIR --arch $arch"; pattern="imagenet_${arch}*.pth"
  else
    data_arg="--data-dir $DATA_DIR"; pattern="${ds}_resnet20*.pth"
  fi
  teacher_arg=""
  [ -n "$TEACHER" ] && teacher_arg="--teacher $TEACHER"
  if [ -n "$TEACHER_DIR" ]; then
    t=$(ls "$TEACHER_DIR"/$pattern 2>/dev/null | head -n 1)
    [ -z "$t" ] && { echo "error: no $pattern in $TEACHER_DIR" >&2; exit 2; }
    teacher_arg="--teacher $t"
  fi
  for m in $METHODS; do
    [ -n "${KIND[$m]:-}" ] || { echo "error: unknown method $m (no $m.py declaring a GRID)" >&2; exit 2; }
    case "${KIND[$m]}" in
      zero-shot) budget_args="$ZERO_SHOT_ARGS";;
      label-free) budget_args="$LABEL_FREE_ARGS";;
      *) echo "error: $m.py declares kind '${KIND[$m]}'; run_all.sh knows zero-shot and label-free" >&2; exit 2;;
    esac
    if [ "$ds" = imagenet ]; then
      # ImageNet: the zero-shot methods only (the label-free ones train on real images), each script's own ImageNet
      # recipe (paper) or the smoke budget; the short budget is CIFAR's CPU budget
      if [ "${KIND[$m]}" != zero-shot ]; then
        [ "$LIST_ONLY" = 1 ] || echo "note: $m trains on real images: no ImageNet cell (zero-shot methods only)" >&2
        continue
      fi
      if [ "$BUDGET" = short ]; then
        [ "$LIST_ONLY" = 1 ] || echo "note: no short budget on ImageNet ($cell, $m skipped): --budget paper or smoke" >&2
        continue
      fi
    fi
    budget_args="$budget_args ${METHOD_BUDGET_ARGS[$m]:-}"
    for b in ${BITS:-${DEFAULT_BITS[$m]}}; do
      [[ "${SUPPORTED_BITS[$m]}" == *" $b "* ]] || { [ "$LIST_ONLY" = 1 ] || echo "note: $m does not support W${b}A${b}; skipped" >&2; continue; }
      for s in $SEEDS; do
        name="${cell}__${m}__w${b}a${b}__seed${s}"
        echo "$name|python $m.py --dataset $ds --wbits $b --seed $s $data_arg $teacher_arg $budget_args --out-dir $DIR --run-name $name $EXTRA" >> "$GRID"
      done
    done
  done
  done
done
N=$(wc -l < "$GRID")

if [ "$LIST_ONLY" = 1 ]; then cut -d'|' -f2- "$GRID" | sed 's/  */ /g; s/ $//'; exit 0; fi
mkdir -p "$DIR"

# one run of the grid (what a job-array task does): skip if finished, resume if checkpointed; SIGTERM (a scheduler's
# warning before a time limit or preemption) reaches the run, which keeps its last checkpoint and exits; under Slurm
# the task is then requeued and resumes
if [ -n "$TASK" ]; then
  [ "$TASK" -lt "$N" ] || { echo "error: --task $TASK: the grid has $N runs (0 to $((N - 1)))" >&2; exit 2; }
  line=$(sed -n "$((TASK + 1))p" "$GRID"); name="${line%%|*}"; cmd="${line#*|}"
  if [ -f "$DIR/$name/summary.json" ]; then echo "task $TASK: $name already finished"; exit 0; fi
  dev=""; [ "$NGPU" -gt 0 ] && dev="--device cuda:0"
  if [ -f "$DIR/$name/checkpoint.pt" ]; then cmd="python $(echo "$cmd" | sed 's/^python \([^ ]*\).*/\1/') --resume $DIR/$name"; fi
  echo "task $TASK: $name"
  $cmd --threads "$THREADS" $dev >> "$DIR/$name.log" 2>&1 &
  pid=$!
  trap 'kill -TERM $pid 2>/dev/null' TERM
  wait $pid; rc=$?
  [ $rc -gt 128 ] && { wait $pid; rc=$?; }
  if [ $rc -eq 143 ] && [ -n "${SLURM_ARRAY_JOB_ID:-}" ] && command -v scontrol > /dev/null; then
    scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
  fi
  echo "task $TASK: $name exit $rc (log $DIR/$name.log)"
  exit $rc
fi

if [ -n "$SLURM" ]; then
  script="$DIR/slurm_array.sh"
  keep=(); skip_next=0
  for a in "${ORIG_ARGS[@]}"; do  # the same grid options, without --slurm
    if [ "$skip_next" = 1 ]; then skip_next=0; continue; fi
    if [ "$a" = "--slurm" ]; then skip_next=1; continue; fi
    keep+=("$(printf '%q' "$a")")
  done
  cat > "$script" <<EOS
#!/usr/bin/env bash
#SBATCH --job-name=cleanqd-$BUDGET
#SBATCH --array=0-$((N - 1))%$JOBS
#SBATCH --gres=gpu:1
#SBATCH --output=$(cd "$DIR" && pwd)/slurm-%A_%a.out
#SBATCH --requeue
#SBATCH --signal=B:TERM@120
$(for opt in $SLURM; do echo "#SBATCH $opt"; done)
# One task per run of the grid (run_all.sh --list shows them in task order). A finished run is skipped, a stopped one
# resumed; SIGTERM before the time limit (--signal) checkpoints-and-exits and the task is requeued.
cd $(printf '%q' "$(pwd)")
exec ./run_all.sh ${keep[*]} --task "\$SLURM_ARRAY_TASK_ID"
EOS
  chmod +x "$script"
  if command -v sbatch > /dev/null; then
    sbatch "$script"
  else
    echo "run_all: wrote $script ($N tasks); sbatch is not on PATH: submit it with  sbatch $script"
  fi
  echo "run_all: after the array, ./run_all.sh ${keep[*]} --report-only gathers the summaries"
  exit 0
fi

i=0; skipped=0
if [ "$REPORT_ONLY" = 0 ]; then
  while IFS='|' read -r name cmd; do
    if [ -f "$DIR/$name/summary.json" ]; then skipped=$((skipped + 1)); continue; fi
    dev=""; [ "$NGPU" -gt 0 ] && dev="--device cuda:$((i % NGPU))"
    if [ -f "$DIR/$name/checkpoint.pt" ]; then
      cmd="python $(echo "$cmd" | sed 's/^python \([^ ]*\).*/\1/') --resume $DIR/$name"
    fi
    echo "$name|$cmd --threads $THREADS $dev" >> "$LIST"; i=$((i + 1))
  done < "$GRID"
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
