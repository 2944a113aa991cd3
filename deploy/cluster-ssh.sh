#!/usr/bin/env bash
# Start, stop or check the workers of a cluster config over ssh.
#
#   deploy/cluster-ssh.sh start|stop|status CONFIG
#
# Worker i runs `llmtp worker --config CONFIG --index i` on its host, detached, with its
# log and pid file beside the config there (worker-i.log, worker-i.pid). The hosts come
# from the config, read and checked by llmtp's own loader. Every host needs the same
# layout: the config, its shards/<host>/ folder and its keys in LLMTP_REMOTE_DIR.
#
# Environment:
#   LLMTP_REMOTE_DIR  folder holding CONFIG on every host (default: CONFIG's folder here)
#   LLMTP_REMOTE_BIN  the llmtp command on the hosts (default: llmtp)
#   LLMTP_PYTHON      a Python with llmtp installed, to read CONFIG here (default: python3)
#   SSH               the ssh command and its options (default: ssh -o BatchMode=yes);
#                     called as $SSH HOST COMMAND
set -euo pipefail

usage() { echo "usage: $0 start|stop|status CONFIG" >&2; exit 2; }
[ $# -eq 2 ] || usage
action=$1
config=$2
case $action in start|stop|status) ;; *) usage ;; esac
[ -f "$config" ] || { echo "cluster-ssh.sh: $config: no such file" >&2; exit 2; }

config_dir=$(cd "$(dirname "$config")" && pwd)
config_name=$(basename "$config")
remote_dir=${LLMTP_REMOTE_DIR:-$config_dir}
remote_bin=${LLMTP_REMOTE_BIN:-llmtp}
python=${LLMTP_PYTHON:-python3}
read -r -a ssh_command <<< "${SSH:-ssh -o BatchMode=yes}"

# one "index host" line per worker
workers=$("$python" -c '
import sys
from llmtp.common.cluster.config import load_cluster_config
from llmtp.common.errors import LlmtpError
try:
    config = load_cluster_config(sys.argv[1])
except LlmtpError as error:
    sys.exit(f"cluster-ssh.sh: {error}")
for index, worker in enumerate(config.workers):
    print(index, worker.host)
' "$config")

status=0
while read -r index host; do
  pid="worker-$index.pid"
  log="worker-$index.log"
  running="[ -f $pid ] && kill -0 \$(cat $pid) 2>/dev/null"
  case $action in
    start)
      remote="$running && echo already running, pid \$(cat $pid) && exit 0;
              nohup $remote_bin worker --config '$config_name' --index $index >$log 2>&1 </dev/null &
              echo \$! >$pid; sleep 1;
              if $running; then echo started, pid \$(cat $pid), log $remote_dir/$log;
              else echo failed to start:; tail -n 3 $log; exit 1; fi" ;;
    stop)
      remote="if $running; then kill \$(cat $pid) && echo stopped; else echo not running; fi; rm -f $pid" ;;
    status)
      remote="if $running; then echo running, pid \$(cat $pid); else echo not running; fi" ;;
  esac
  if ! output=$("${ssh_command[@]}" "$host" "cd '$remote_dir' && { $remote; }" </dev/null 2>&1); then
    status=1
  fi
  echo "worker $index on $host: $output"
done <<< "$workers"
exit $status
