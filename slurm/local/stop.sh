#!/usr/bin/env bash
# Stop the local SLURM started by start.sh: only the daemons whose PIDs it recorded (TERM, bounded
# wait, then KILL). Idempotent. `--purge` also deletes the state dir (job state, accounting DB, logs).
set -euo pipefail

STATE=${RELED_SLURM_DIR:-/var/lib/reled-slurm}
RUN=$STATE/run
PURGE=0
for a in "$@"; do
    case $a in
        --purge) PURGE=1 ;;
        -h | --help)
            echo "usage: $0 [--purge]   (state dir: \$RELED_SLURM_DIR, default /var/lib/reled-slurm)"
            exit 0
            ;;
        *)
            echo "stop.sh: unknown argument '$a'" >&2
            exit 2
            ;;
    esac
done

[[ -d $STATE ]] || {
    echo "stop.sh: no state dir $STATE; nothing to do"
    exit 0
}
# one start.sh/stop.sh at a time per state dir
exec 9>"${STATE%/}.lock"
flock -w 300 9 || {
    echo "stop.sh: another start.sh/stop.sh holds ${STATE%/}.lock for over 300 s" >&2
    exit 1
}

# the expected program of each recorded daemon (guards against a reused PID); a zombie counts as gone
declare -A COMM=([slurmd]=slurmd [slurmctld]=slurmctld [slurmdbd]=slurmdbd [mariadb]="mariadbd|mysqld" [munged]=munged)
is_ours() { # NAME PID
    local comm stat
    comm=$(cat "/proc/$2/comm" 2>/dev/null) || return 1
    stat=$(sed 's/.*) //' "/proc/$2/stat" 2>/dev/null) || return 1
    [[ $comm =~ ^(${COMM[$1]})$ && ${stat:0:1} != Z ]]
}

stopped=()
# stop_group NAME...: TERM them all, wait up to 20 s, then KILL what is left
stop_group() {
    local name pid pids=() names=()
    for name in "$@"; do
        [[ -f $RUN/$name.pid ]] || continue
        pid=$(<"$RUN/$name.pid")
        if [[ $pid =~ ^[0-9]+$ ]] && is_ours "$name" "$pid"; then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
            names+=("$name")
            stopped+=("$name($pid)")
        else
            rm -f "$RUN/$name.pid"
        fi
    done
    local i left
    for _ in $(seq 100); do
        left=0
        for i in "${!pids[@]}"; do is_ours "${names[i]}" "${pids[i]}" && left=1; done
        ((left)) || break
        sleep 0.1
    done
    for i in "${!pids[@]}"; do
        if is_ours "${names[i]}" "${pids[i]}"; then
            echo "stop.sh: ${names[i]} (${pids[i]}) ignored SIGTERM for 10 s; sending SIGKILL" >&2
            kill -KILL "${pids[i]}" 2>/dev/null || true
        fi
        rm -f "$RUN/${names[i]}.pid"
    done
}
# reverse start order; accounting stops after slurmctld, MariaDB after slurmdbd
stop_group slurmd slurmctld
stop_group slurmdbd
stop_group mariadb munged

if ((${#stopped[@]} > 0)); then
    echo "stop.sh: stopped ${stopped[*]}"
else
    echo "stop.sh: nothing of ours was running"
fi

if ((PURGE)); then
    case $STATE in
        "" | / | /var | /var/lib | /tmp | /root | /home) echo "stop.sh: refusing to purge '$STATE'" >&2 && exit 1 ;;
    esac
    if [[ -d $STATE ]]; then
        rm -rf -- "$STATE"
        echo "stop.sh: purged $STATE"
    fi
fi
