# shellcheck shell=bash disable=SC2034  # sourced: the variables set here are the sourcing script's
# What slurm/train.sbatch and slurm/train_multinode.sbatch share, sourced from the repo root they run in:
# the job's settings (job_settings), the signal traps (trap_signals) and the end of the job, with the
# requeue after a USR1 (finish_job). Each script defines `forward_usr1` and `forward_usr2`: how its USR1 (checkpoint
# and stop) and USR2 (profile the next steps, then train on) reach the trainers.
# Which run an attempt trained, the trainer says: its main process writes the run directory to
# $CVAE_DIST_RUN_DIR_FILE once the run has started (whatever run_name / output_dir the recipe and overrides gave),
# and finish_job reads that run's status.json.
#
# A job is one run: its name is stable (the job's, or the array task's, id) and every attempt passes
# resume=allow, so a first attempt starts the run and any later one (a torchrun restart in the allocation, a
# requeue onto other nodes) continues it from its newest checkpoint.

# job_settings DEFAULT_JOB_NAME: the venv's tools and the job's names, port and trainer overrides.
job_settings() {
    if [[ ! -f pyproject.toml || ! -d cvae_dist ]]; then
        echo "error: $PWD is not the cvae-dist repo root; submit from the repo root" >&2
        exit 2
    fi
    # sbatch exports the submitting shell's environment: a W&B service running there (a notebook's, a test
    # runner's) is not the job's, and trainers that connected to it would write their runs through it
    unset WANDB_SERVICE
    ACCELERATE=accelerate
    PYTHON=python3
    [[ -x .venv/bin/accelerate ]] && ACCELERATE=$PWD/.venv/bin/accelerate && PYTHON=$PWD/.venv/bin/python
    local slurm_id=${SLURM_JOB_ID:?not running under Slurm (submit with sbatch)}
    # The job's identity, for the run name, `scontrol show job` and `scontrol requeue`: an array task's is
    # ARRAYJOB_TASK (the task's plain SLURM_JOB_ID may be the array's own id, and `scontrol requeue` of that
    # requeues every task of the array: Lightning-AI/pytorch-lightning#15022); other jobs', SLURM_JOB_ID.
    JOB_ID=$slurm_id TASK=
    if [[ -n ${SLURM_ARRAY_JOB_ID:-} && -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
        TASK=$SLURM_ARRAY_TASK_ID
        JOB_ID=${SLURM_ARRAY_JOB_ID}_$TASK
    fi
    JOB_NAME=${SLURM_JOB_NAME:-$1}
    RESTARTS=${SLURM_RESTART_COUNT:-0}
    MAX_REQUEUES=${MAX_REQUEUES:-3}
    # the same in every attempt of the job; a RUN_NAME given to an array gets each task's number (tasks that
    # shared one run directory would all write into it)
    RUN=${RUN_NAME:-$JOB_NAME-$JOB_ID}
    [[ -n ${RUN_NAME:-} && -n $TASK ]] && RUN=${RUN_NAME}_$TASK
    GROUP=${LOG_GROUP:-$RUN}
    # a number, unique among running jobs: SLURM_JOB_ID is a task's own in an array
    PORT=$((20000 + slurm_id % 20000))
    # resume=allow in every attempt: where the run does not exist yet (the first attempt) it starts, else it
    # continues from the newest valid checkpoint in the run directory (from step 0 where there is none yet)
    OVERRIDES=("run_name=$RUN" "log.group=$GROUP" "resume=allow")
    # This attempt's start, and where its trainer will say which run it started: on the submit directory, which
    # every node sees (under the c10d rendezvous the main process need not run on this node). No file at the end:
    # this attempt never started its run (refused, or died before). A copy left by an earlier attempt is removed.
    ATTEMPT_START=$(date +%s)
    RUN_DIR_FILE=$PWD/runs/.slurm/$JOB_ID.$RESTARTS.run_dir
    if ! mkdir -p "${RUN_DIR_FILE%/*}" || ! rm -f "$RUN_DIR_FILE" "$RUN_DIR_FILE.tmp"; then
        echo "error: cannot write ${RUN_DIR_FILE%/*} (the job script's state, under the submit directory)" >&2
        exit 2
    fi
    export CVAE_DIST_RUN_DIR_FILE=$RUN_DIR_FILE
}

# pick_launch_config: GPUS (the GPUs nvidia-smi lists on this node) and LAUNCH_CONFIG (unless set: launch/ddp_gpu.yaml
# where there are GPUs, launch/ddp_cpu.yaml where there are none), which must exist.
pick_launch_config() {
    GPUS=0
    command -v nvidia-smi >/dev/null && GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
    if ((GPUS > 0)); then
        LAUNCH_CONFIG=${LAUNCH_CONFIG:-launch/ddp_gpu.yaml}
    else
        LAUNCH_CONFIG=${LAUNCH_CONFIG:-launch/ddp_cpu.yaml}
    fi
    [[ -f $LAUNCH_CONFIG ]] || { echo "error: accelerate config $LAUNCH_CONFIG not found (set LAUNCH_CONFIG)" >&2; exit 2; }
}

# trap_signals: USR1 (the timed signal, or scancel --signal=USR1 --batch) reaches only the batch script, which
# passes it on (`forward_usr1`); the trainers checkpoint and exit 75. USR2 (scancel --signal=USR2 --batch) is passed
# on the same way (`forward_usr2`): every trainer profiles the next log.profile_len steps and trains on; it is no stop
# and never leads to a requeue (SIGNAL is left as it was). SIGTERM (scancel, the time limit, Slurm's preemption)
# reaches every process of the job from Slurm itself: it is only noted here.
SIGNAL=
on_signal() {
    SIGNAL=$1
    if [[ $1 == USR1 ]]; then
        echo "$(date -Is) got SIGUSR1: asking the training processes to checkpoint and stop"
        forward_usr1
    else
        echo "$(date -Is) got SIG$1 (Slurm signals every process of the job): waiting for the training processes"
    fi
}
on_usr2() {
    echo "$(date -Is) got SIGUSR2: asking the training processes to profile their next steps"
    forward_usr2
}
trap_signals() {
    trap 'on_signal USR1' USR1
    trap 'on_signal TERM' TERM
    trap on_usr2 USR2
}

# finish_job PID: wait for the training (PID), then requeue the job if the trainers stopped on a USR1, else exit
# with their status.
finish_job() {
    local pid=$1 rc run_dir='' trainer_state=''
    # `wait` returns early when a trapped signal arrives: wait again until the process has really exited
    while :; do
        wait "$pid"
        rc=$?
        kill -0 "$pid" 2>/dev/null || break
    done
    trap - USR1 TERM
    trap '' USR2  # nothing left to profile: a late USR2 must not end the script before it has finished

    # The trainer exits 75 after checkpointing on a signal ("requeue me"); accelerate's torchrun launcher
    # reports any worker failure as 1, so the trainer's own word counts: status.json says "preempted" once
    # every rank has checkpointed. Only a run this attempt started is requeued (its trainer wrote RUN_DIR_FILE),
    # and only its status.json written since this attempt started counts (an earlier attempt's "preempted" does
    # not). Only USR1 leads to a requeue from here: SIGTERM means scancel, the time limit or Slurm's own
    # preemption, where Slurm decides (it requeues preempted --requeue jobs itself) and a cancelled job must stay
    # cancelled.
    if [[ -s $RUN_DIR_FILE ]]; then
        run_dir=$(<"$RUN_DIR_FILE")
        trainer_state=$("$PYTHON" -c 'import json,sys; s=json.load(open(sys.argv[1])); print(s["state"] if s["time"] >= float(sys.argv[2]) else "stale")' \
            "$run_dir/status.json" "$ATTEMPT_START" 2>/dev/null)
        echo "$(date -Is) run $run_dir: status ${trainer_state:-unreadable}"
    else
        echo "$(date -Is) this attempt started no run (refused, or stopped before it began): no requeue"
    fi
    rm -f "$RUN_DIR_FILE"
    if [[ -n $run_dir && $SIGNAL != TERM && ($trainer_state == preempted || $rc == 75) ]]; then
        if ((RESTARTS >= MAX_REQUEUES)); then
            echo "$(date -Is) stopped for requeue (exit $rc), but restart $RESTARTS reached MAX_REQUEUES=$MAX_REQUEUES: failing"
            exit 75
        fi
        local state
        state=$(scontrol show job "$JOB_ID" -o 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2)
        if [[ $state != RUNNING ]]; then
            echo "$(date -Is) stopped for requeue (exit $rc), but the job is $state: not requeueing"
            exit 75
        fi
        echo "$(date -Is) stopped for requeue (exit $rc): scontrol requeue $JOB_ID (restart $((RESTARTS + 1)) of at most $MAX_REQUEUES)"
        scontrol requeue "$JOB_ID" && exit 0
        echo "$(date -Is) scontrol requeue $JOB_ID failed" >&2
        exit 75
    fi
    [[ -n $SIGNAL ]] && echo "$(date -Is) stopped by SIG$SIGNAL (exit $rc): not requeueing (cancelled, out of time or preempted by Slurm)"
    echo "$(date -Is) training exited with $rc"
    exit "$rc"
}
