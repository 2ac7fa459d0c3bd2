#!/usr/bin/env bash
# A real Apache Kafka 4.x cluster (KRaft, no ZooKeeper) on loopback for the integration
# tests: 1 or 3 nodes, each a combined broker+controller JVM, taken from Maven Central
# through scripts/kafka/pom.xml (no download script of its own, no jar in the repo).
#
#   kafka.sh fetch                      fill the classpath cache once (Maven, ~/.m2);
#                                       prints the directory of the jars
#   kafka.sh start --dir DIR [--nodes 1|3] [--sasl-ssl CERTDIR --scram USER:PASSWORD]
#                  [--no-auto-create]   a fresh cluster in DIR; prints bootstrap=HOST:PORT,...
#                                       (and bootstrap-sasl-ssl=... with --sasl-ssl)
#   kafka.sh stop --dir DIR             SIGTERM every node, SIGKILL after 20 s; idempotent
#   kafka.sh kill-node --dir DIR N      SIGKILL node N and wait until it is gone
#   kafka.sh start-node --dir DIR N     restart node N (same storage, same ports), wait
#   kafka.sh topic --dir DIR create NAME [--partitions P] [--replication R] [--config k=v]...
#   kafka.sh topic --dir DIR describe NAME | list | delete NAME
#   kafka.sh tool [--dir DIR] CLASS [ARGS...]   any Kafka tool class on the classpath, e.g.
#            org.apache.kafka.tools.ConsoleProducer, ...tools.consumer.ConsoleConsumer
#
# What start writes into DIR (node dirs of an earlier cluster there are removed first):
#   DIR/bootstrap              host:port,... of every node's PLAINTEXT listener
#   DIR/bootstrap-sasl-ssl     the same for the SASL_SSL listeners (with --sasl-ssl)
#   DIR/client-sasl-ssl.properties  client settings for those (SCRAM-SHA-512, PEM truststore)
#   DIR/sasl-ssl/ca.pem, keystore.pem   copies of CERTDIR's CA and of its key + chain
#   DIR/cluster.env            node count and ports, read by the other subcommands
#   DIR/node-N/server.properties, data/ (log.dirs and the KRaft metadata log), pid,
#              server.log (log4j, INFO), stdout (the JVM's stdout and stderr), format.log,
#              log-offset (where server.log ended when the node was last launched)
#   DIR/tools.log              the log of the tool JVMs that the subcommands ran
#
# start returns once every node logged "Kafka Server started" (KRaft: registered and
# unfenced) and accepts connections, and a topic with replication factor = node count was
# created and deleted; with 3 nodes __consumer_offsets exists too. start-node returns
# once the node logged it again; after a SIGKILL of a lone node that takes ~6 s more
# (broker.session.timeout.ms: the controller fences the killed incarnation first).
#
# Every listener is on 127.0.0.1, on ports that the kernel hands out as free. The nodes
# are detached (setsid, stdin from /dev/null, output to files): a caller that reads this
# script's stdout to its end is not held up by them. A start that fails kills what it
# started and prints the tails of the logs.
#
# Environment: CALLNOTIFY_KAFKA_CACHE (default ~/.cache/callnotify/kafka-VERSION),
# CALLNOTIFY_KAFKA_VERSION (default: the POM's kafka.version), KAFKA_START_TIMEOUT
# (seconds, default 90), KAFKA_HEAP_OPTS / KAFKA_JVM_OPTS (replace the node JVM's heap /
# other options below), KAFKA_OPTS (added to the node JVMs), JAVA_HOME.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
pom=$here/kafka/pom.xml
log4j_conf=$here/kafka/log4j2.properties
version=${CALLNOTIFY_KAFKA_VERSION:-$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$pom")}
cache=${CALLNOTIFY_KAFKA_CACHE:-$HOME/.cache/callnotify/kafka-$version}
libs=$cache/libs
java=${JAVA_HOME:+$JAVA_HOME/bin/}java
start_timeout=${KAFKA_START_TIMEOUT:-90}
host=127.0.0.1

usage() {
  cat >&2 <<'EOF'
usage: kafka.sh fetch
       kafka.sh start --dir DIR [--nodes 1|3] [--sasl-ssl CERTDIR --scram USER:PASSWORD] [--no-auto-create]
       kafka.sh stop --dir DIR
       kafka.sh kill-node --dir DIR N
       kafka.sh start-node --dir DIR N
       kafka.sh topic --dir DIR create NAME [--partitions P] [--replication R] [--config k=v]...
       kafka.sh topic --dir DIR describe NAME | list | delete NAME
       kafka.sh tool [--dir DIR] CLASS [ARGS...]
CERTDIR holds ca.pem, server.pem (certificate chain) and server.key (unencrypted PKCS#8).
EOF
  exit 2
}

say() { echo "kafka.sh: $*" >&2; }
die() { say "$*"; exit 1; }

# --- the classpath ----------------------------------------------------------------------

# Maven copies the broker, the tools and log4j into $cache/libs once; the marker file is
# written only after a complete copy, so an interrupted fetch is redone, not used. A lock
# keeps two fetches (parallel test binaries) from copying over each other.
fetch() {
  [ -e "$cache/complete" ] && return 0
  command -v mvn >/dev/null || die "Maven (mvn) is needed to fetch Kafka $version"
  mkdir -p "$cache"
  exec 9>"$cache/.lock"
  flock 9
  if [ ! -e "$cache/complete" ]; then
    say "fetching Kafka $version from Maven Central into $cache"
    rm -rf "$libs" "$cache/libs.partial"
    # Maven's output is shown only when it fails (Debian's Maven prints colour resets even
    # with -q -B).
    if ! (cd "$here/kafka" && mvn -q -B -f "$pom" -Dkafka.version="$version" \
      dependency:copy-dependencies -DoutputDirectory="$cache/libs.partial") >"$cache/fetch.log" 2>&1; then
      cat "$cache/fetch.log" >&2
      die "Maven could not fetch Kafka $version (see above)"
    fi
    [ -e "$cache/libs.partial/kafka_2.13-$version.jar" ] ||
      die "Maven's copy has no kafka_2.13-$version.jar"
    mv "$cache/libs.partial" "$libs"
    echo "$version" >"$cache/complete"
  fi
  flock -u 9
  exec 9>&-
}

# A short-lived tool JVM (StorageTool, TopicCommand, ...): C1 only and a small serial heap
# start fastest and cost least. Its log goes to $tool_log, warnings and errors also to
# stderr; the JVM's own warnings go to stderr too, so that stdout is the tool's.
#
# Class data sharing: the first successful TopicCommand writes the classes that it loaded
# (the admin client, most of kafka-clients, log4j) into an archive in the cache
# (-XX:ArchiveClassesAtExit, ~27 MB), and every later tool JVM maps it: TopicCommand
# starts in half the time (--list: 2.1 s -> 1.0 s here), the others load the rest of
# their classes as usual. One archive, not one per tool: each is as big. It is named after
# the java binary's mtime (a JDK update makes a new one); one that the JVM cannot use
# (another JDK, no base archive) is ignored, with CDS's logging off.
tool_log=${TMPDIR:-/tmp}/callnotify-kafka-tools.log
run_tool() {
  local key jsa tmp='' cds=() rc=0
  key=$(stat -Lc %Y "$(command -v "$java")" 2>/dev/null || echo 0)
  jsa=$cache/cds/tools-$key.jsa
  if [ -s "$jsa" ]; then
    cds=("-XX:SharedArchiveFile=$jsa")
  elif [ "$1" = org.apache.kafka.tools.TopicCommand ] && mkdir -p "$cache/cds" 2>/dev/null; then
    tmp=$jsa.$BASHPID.tmp
    cds=("-XX:ArchiveClassesAtExit=$tmp")
  fi
  "$java" -Xms32m -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -XX:CICompilerCount=1 \
    "${cds[@]}" -Xlog:disable -Xlog:all=warning:stderr '-Xlog:cds*=off:stderr' \
    -Djava.awt.headless=true -Dlog4j2.configurationFile="$log4j_conf" \
    -Dkafka.log.file="$tool_log" -Dkafka.console.level="${KAFKA_TOOL_CONSOLE_LEVEL:-WARN}" \
    -cp "$libs/*" "$@" || rc=$?
  if [ -n "$tmp" ]; then
    if [ "$rc" = 0 ] && [ -s "$tmp" ]; then mv -f "$tmp" "$jsa"; else rm -f "$tmp"; fi
  fi
  return "$rc"
}

# --- a cluster's directory ----------------------------------------------------------------

# --dir DIR as an absolute path; only start creates it.
dir=
set_dir() {
  [ -n "$1" ] || usage
  case $1 in *\\* | *$'\n'*) die "--dir must not hold a backslash or a newline" ;; esac
  if [ "$sub" = start ]; then mkdir -p "$1"; fi
  if [ -d "$1" ]; then
    dir=$(cd "$1" && pwd)
    tool_log=$dir/tools.log
  else
    dir=$1
  fi
}

load_cluster() {
  [ -n "$dir" ] || usage
  [ -e "$dir/cluster.env" ] || die "no cluster in $dir (run kafka.sh start first)"
  # shellcheck source=/dev/null
  . "$dir/cluster.env"
}

# Prints node N's pid if its JVM runs: the pid file's process must still be the java that
# was started with this node's server.properties (a pid can be reused after a crash).
node_pid() {
  local file=$dir/node-$1/pid pid args
  [ -s "$file" ] || return 1
  pid=$(cat "$file")
  # Empty for a process that is gone or a zombie.
  args=$(tr '\0' '\n' 2>/dev/null <"/proc/$pid/cmdline") || return 1
  grep -qxF "$dir/node-$1/server.properties" <<<"$args" || return 1
  echo "$pid"
}

# Node JVM settings, for a 2-core machine that also runs the engine under test:
# - heap 256 MiB growing to 512 MiB (768 MiB for a lone node, which holds every
#   partition): tests move little data, and the broker keeps its data in the page cache,
#   not the heap. log.cleaner.dedupe.buffer.size below keeps the compacting cleaner from
#   taking 128 MiB of it.
# - Serial GC: no GC worker threads to compete for the 2 cores, the least memory overhead
#   (G1's remembered sets), and young collections of a heap this size take milliseconds.
# - TieredStopAtLevel=1 (C1 only) with CICompilerCount=2: no C2 compilations. Measured
#   here on one node: it starts 0.5-1 s sooner, and took 12 s of CPU instead of 19 s for
#   the same 1.5 M records from ProducerPerformance at the same rate (80-110 k records/s
#   of 200 B, bound by the producer): C2's compiler threads cost more than the faster code
#   gains in runs of test length, on 2 cores shared with the engine. Caveat: C1 does not
#   use the AES intrinsics (AES-GCM in a loop: 20 MB/s under C1, 70-90 MB/s with C2 here),
#   so bulk traffic over the SASL_SSL listener costs more CPU: for TLS throughput
#   measurements set KAFKA_JVM_OPTS to these options without TieredStopAtLevel.
# - ExitOnOutOfMemoryError: a node that runs out of heap dies visibly instead of limping.
node_heap_opts() {
  if [ -n "${KAFKA_HEAP_OPTS:-}" ]; then
    echo "$KAFKA_HEAP_OPTS"
  elif [ "$NODES" = 1 ]; then
    echo "-Xms256m -Xmx768m"
  else
    echo "-Xms256m -Xmx512m"
  fi
}
node_jvm_opts="-XX:+UseSerialGC -XX:TieredStopAtLevel=1 -XX:CICompilerCount=2 -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true"

# Starts node N's JVM in the background, detached. Remembers where its log ended, so that
# waiting for it looks only at what this run logs.
launch_node() {
  local n=$1 node=$dir/node-$1 heap jvm extra
  read -r -a heap <<<"$(node_heap_opts)"
  read -r -a jvm <<<"${KAFKA_JVM_OPTS:-$node_jvm_opts}"
  read -r -a extra <<<"${KAFKA_OPTS:-}"
  if [ -e "$node/server.log" ]; then stat -c %s "$node/server.log" >"$node/log-offset"; else echo 0 >"$node/log-offset"; fi
  echo "--- $(date '+%F %T') start" >>"$node/stdout"
  (
    cd "$node"
    exec setsid "$java" "${heap[@]}" "${jvm[@]}" "${extra[@]}" \
      -Dlog4j2.configurationFile="$log4j_conf" -Dkafka.log.file="$node/server.log" \
      -Dkafka.console.level=ERROR -cp "$libs/*" kafka.Kafka "$node/server.properties" \
      </dev/null >>"$node/stdout" 2>&1
  ) &
  local pid=$!
  echo "$pid" >"$node/pid"
  disown "$pid" # no "Killed" job notice from bash when a start fails
  # Until the subshell has exec'd the JVM its command line is this script's, and
  # node_pid (which looks for server.properties there) would take the node for gone:
  # on a busy machine wait_serving then said "exited while starting" and the EXIT trap
  # killed the JVM that had just started. Wait for the exec, or for the process to die.
  for _ in $(seq 400); do
    node_pid "$n" >/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.025
  done
}

# Node N serves when this run of it logged "Kafka Server started" (KRaft logs it once the
# broker is registered and unfenced, and the controller is up) and its port accepts.
node_serves() {
  local n=$1 node=$dir/node-$1 offset size port_var
  [ -e "$node/server.log" ] || return 1
  offset=$(cat "$node/log-offset")
  size=$(stat -c %s "$node/server.log")
  [ "$size" -ge "$offset" ] || offset=0 # the log rolled over
  # grep -c reads to the end: with -q, tail could die of SIGPIPE and fail the pipeline.
  tail -c +$((offset + 1)) "$node/server.log" | grep -c "Kafka Server started" >/dev/null || return 1
  port_var=PORT_$n
  (exec 3<>"/dev/tcp/$host/${!port_var}") 2>/dev/null
}

show_logs() {
  local node
  for node in "$dir"/node-*; do
    [ -d "$node" ] || continue
    for f in stdout server.log; do
      [ -s "$node/$f" ] || continue
      echo "----- $node/$f (last 30 lines)" >&2
      tail -n 30 "$node/$f" >&2
    done
  done
}

# Waits until each given node serves, within the deadline (in $SECONDS); a node whose JVM
# exits fails the wait at once.
wait_serving() {
  local deadline=$1 n all
  shift
  while :; do
    all=1
    for n in "$@"; do
      if ! node_pid "$n" >/dev/null; then
        say "node $n exited while starting"
        show_logs
        return 1
      fi
      node_serves "$n" || all=0
    done
    [ "$all" = 0 ] || return 0
    if [ "$SECONDS" -ge "$deadline" ]; then
      say "nodes $* not serving after ${start_timeout}s"
      show_logs
      return 1
    fi
    sleep 0.25
  done
}

# SIGKILL the given nodes and wait until they are gone.
kill_nodes() {
  local n pid
  for n in "$@"; do
    pid=$(node_pid "$n") || { rm -f "$dir/node-$n/pid"; continue; }
    kill -KILL "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
      node_pid "$n" >/dev/null || break
      sleep 0.1
    done
    node_pid "$n" >/dev/null && die "node $n (pid $pid) survived SIGKILL"
    rm -f "$dir/node-$n/pid"
  done
}

# A topic created and deleted through the admin API: the brokers have their metadata, and
# with 3 nodes all three are registered and unfenced (replication factor 3).
round_trip() {
  local topic=kafka-sh-ready-$$ deadline=$1
  while ! run_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$BOOTSTRAP" --create \
    --topic "$topic" --partitions 1 --replication-factor "$NODES" --if-not-exists >>"$dir/tools.log" 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      say "creating a topic failed until the timeout; the tools' log:"
      tail -n 30 "$dir/tools.log" >&2
      show_logs
      return 1
    fi
    sleep 1
  done
  # With 3 nodes, also have the brokers create __consumer_offsets now, while all of them
  # run: its replication factor is 3, and created lazily at a group's first request while
  # a test has one node down it could not be (the group would wait for a coordinator).
  # Looking up a group's coordinator creates it; the group not existing is the answer.
  local warmup=''
  if [ "$NODES" -gt 1 ]; then
    run_tool org.apache.kafka.tools.consumer.group.ConsumerGroupCommand --bootstrap-server "$BOOTSTRAP" \
      --describe --group kafka-sh-ready >>"$dir/tools.log" 2>&1 &
    warmup=$!
  fi
  if ! run_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$BOOTSTRAP" --delete \
    --topic "$topic" >>"$dir/tools.log" 2>&1; then
    say "deleting the topic $topic failed; the tools' log:"
    tail -n 30 "$dir/tools.log" >&2
    [ -z "$warmup" ] || kill "$warmup" 2>/dev/null || true
    return 1
  fi
  [ -z "$warmup" ] || wait "$warmup" || true
}

free_ports() {
  python3 - "$1" "$host" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind((sys.argv[2], 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# --- start ----------------------------------------------------------------------------------

cmd_start() {
  local nodes=1 certdir='' scram='' auto_create=true
  while [ $# -gt 0 ]; do
    case $1 in
      --dir) [ $# -ge 2 ] || usage; set_dir "$2"; shift 2 ;;
      --nodes) [ $# -ge 2 ] || usage; nodes=$2; shift 2 ;;
      --sasl-ssl) [ $# -ge 2 ] || usage; certdir=$2; shift 2 ;;
      --scram) [ $# -ge 2 ] || usage; scram=$2; shift 2 ;;
      --no-auto-create) auto_create=false; shift ;;
      *) usage ;;
    esac
  done
  [ -n "$dir" ] || usage
  case $nodes in 1 | 3) ;; *) usage ;; esac
  if [ -n "$certdir$scram" ]; then
    [ -n "$certdir" ] && [ -n "$scram" ] || die "--sasl-ssl and --scram go together"
  fi
  local user='' password=''
  if [ -n "$scram" ]; then
    user=${scram%%:*}
    password=${scram#*:}
    [ "$user" != "$scram" ] && [ -n "$user" ] && [ -n "$password" ] || die "--scram takes USER:PASSWORD"
    # They go into the format tool's [name=...,password=...] and into a JAAS line.
    case $user$password in *[!A-Za-z0-9._~@%+:/-]*) die "--scram: USER and PASSWORD may hold only letters, digits and ._~@%+:/-" ;; esac
    certdir=$(cd "$certdir" && pwd) || die "no directory $certdir"
    local f
    for f in ca.pem server.pem server.key; do [ -s "$certdir/$f" ] || die "$certdir/$f is missing"; done
  fi

  local n
  for n in "$dir"/node-*/; do
    [ -d "$n" ] || continue
    n=${n%/}
    n=${n##*/node-}
    if node_pid "$n" >/dev/null; then die "node $n in $dir still runs: kafka.sh stop --dir $dir first"; fi
  done
  fetch
  rm -rf "$dir"/node-* "$dir/sasl-ssl" "$dir/bootstrap" "$dir/bootstrap-sasl-ssl" \
    "$dir/client-sasl-ssl.properties" "$dir/cluster.env"
  : >"$dir/tools.log"

  # Ports: PLAINTEXT, CONTROLLER and, with --sasl-ssl, SASL_SSL for each node.
  local per=2 ports i
  [ -z "$certdir" ] || per=3
  read -r -a ports <<<"$(free_ports $((nodes * per)))"
  NODES=$nodes
  local voters='' bootstrap='' bootstrap_sasl=''
  for ((i = 1; i <= nodes; i++)); do
    printf -v "PORT_$i" %s "${ports[(i - 1) * per]}"
    printf -v "CONTROLLER_PORT_$i" %s "${ports[(i - 1) * per + 1]}"
    voters+="${voters:+,}$i@$host:${ports[(i - 1) * per + 1]}"
    bootstrap+="${bootstrap:+,}$host:${ports[(i - 1) * per]}"
    if [ -n "$certdir" ]; then
      printf -v "SASL_PORT_$i" %s "${ports[(i - 1) * per + 2]}"
      bootstrap_sasl+="${bootstrap_sasl:+,}$host:${ports[(i - 1) * per + 2]}"
    fi
  done
  BOOTSTRAP=$bootstrap

  # Replication of the internal topics: every node, at most 3; min.insync.replicas 2 with
  # 3 nodes (one node may be down, as in the leader-kill tests).
  local rf=$nodes min_isr=1
  [ "$nodes" -lt 3 ] || min_isr=2

  if [ -n "$certdir" ]; then
    mkdir -p "$dir/sasl-ssl"
    cp "$certdir/ca.pem" "$dir/sasl-ssl/ca.pem"
    # A PEM keystore file holds the private key and the certificate chain together.
    (umask 077 && cat "$certdir/server.key" "$certdir/server.pem" >"$dir/sasl-ssl/keystore.pem")
  fi

  for ((i = 1; i <= nodes; i++)); do
    local node=$dir/node-$i listeners advertised plain_var=PORT_$i ctl_var=CONTROLLER_PORT_$i sasl_var=SASL_PORT_$i
    mkdir -p "$node/data"
    listeners="PLAINTEXT://$host:${!plain_var},CONTROLLER://$host:${!ctl_var}"
    advertised="PLAINTEXT://$host:${!plain_var}"
    if [ -n "$certdir" ]; then
      listeners+=",SASL_SSL://$host:${!sasl_var}"
      advertised+=",SASL_SSL://$host:${!sasl_var}"
    fi
    cat >"$node/server.properties" <<EOF
# Written by scripts/kafka.sh for tests: node $i of $nodes, combined broker and controller.
process.roles=broker,controller
node.id=$i
controller.quorum.voters=$voters
controller.listener.names=CONTROLLER
listeners=$listeners
advertised.listeners=$advertised
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL
inter.broker.listener.name=PLAINTEXT
log.dirs=$node/data

# Topics
num.partitions=1
default.replication.factor=$rf
min.insync.replicas=$min_isr
auto.create.topics.enable=$auto_create
log.segment.bytes=16777216
log.cleaner.dedupe.buffer.size=16777216

# Internal topics sized to the cluster
offsets.topic.num.partitions=4
offsets.topic.replication.factor=$rf
transaction.state.log.num.partitions=4
transaction.state.log.replication.factor=$rf
transaction.state.log.min.isr=$min_isr
share.coordinator.state.topic.num.partitions=4
share.coordinator.state.topic.replication.factor=$rf
share.coordinator.state.topic.min.isr=$min_isr

# Groups: no delay before the first rebalance; short timeouts allowed for the classic
# protocol and for KIP-848's consumer protocol (the broker sets its session and interval):
# 6 s, the session.timeout.ms the integration suite gives classic members
# (tests/integration/world.rs, SESSION_TIMEOUT).
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=1000
group.consumer.min.session.timeout.ms=6000
group.consumer.session.timeout.ms=6000
group.consumer.min.heartbeat.interval.ms=500
group.consumer.heartbeat.interval.ms=1000

# Failures noticed within seconds: a follower that stops fetching leaves the ISR after
# 5 s, a broker that stops heartbeating is fenced (its leaderships move) after 6 s.
replica.lag.time.max.ms=5000
broker.session.timeout.ms=6000
broker.heartbeat.interval.ms=500

# Fewer threads on a 2-core machine
num.network.threads=2
num.io.threads=4
background.threads=4
num.replica.fetchers=1
EOF
    if [ -n "$certdir" ]; then
      cat >>"$node/server.properties" <<EOF

# SASL_SSL for clients: SCRAM-SHA-512 over TLS with a PEM keystore (key and chain in one
# file). Brokers and controllers talk to each other over PLAINTEXT on loopback.
listener.name.sasl_ssl.sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.ssl.keystore.type=PEM
listener.name.sasl_ssl.ssl.keystore.location=$dir/sasl-ssl/keystore.pem
listener.name.sasl_ssl.ssl.client.auth=none
EOF
    fi
  done

  {
    echo "NODES=$nodes"
    for ((i = 1; i <= nodes; i++)); do
      local a=PORT_$i b=CONTROLLER_PORT_$i c=SASL_PORT_$i
      echo "PORT_$i=${!a}"
      echo "CONTROLLER_PORT_$i=${!b}"
      [ -z "$certdir" ] || echo "SASL_PORT_$i=${!c}"
    done
    echo "BOOTSTRAP=$bootstrap"
    echo "BOOTSTRAP_SASL_SSL=$bootstrap_sasl"
  } >"$dir/cluster.env"

  # Format every node's storage with one cluster id (a random UUID as Kafka prints it:
  # base64url without padding, not starting with '-'), in parallel.
  local cluster_id pids=() format_args=() ok=1
  cluster_id=$(python3 -c '
import base64, uuid
while True:
    s = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
    if not s.startswith("-"): print(s); break')
  [ -z "$scram" ] || format_args=(--add-scram "SCRAM-SHA-512=[name=$user,password=$password]")
  for ((i = 1; i <= nodes; i++)); do
    run_tool kafka.tools.StorageTool format --cluster-id "$cluster_id" \
      --config "$dir/node-$i/server.properties" "${format_args[@]}" >"$dir/node-$i/format.log" 2>&1 &
    pids+=($!)
  done
  for ((i = 1; i <= nodes; i++)); do
    if ! wait "${pids[i - 1]}"; then
      ok=0
      say "formatting node $i failed:"
      cat "$dir/node-$i/format.log" >&2
    fi
  done
  [ "$ok" = 1 ] || exit 1

  # From here on a failure (or a signal) kills every node that was started (a global:
  # the trap may run after this function's locals are gone).
  started=0
  trap 'if [ "$started" = 1 ]; then kill_nodes $(seq "$NODES") || true; fi' EXIT
  trap 'exit 130' INT TERM
  started=1
  local deadline=$((SECONDS + start_timeout))
  for ((i = 1; i <= nodes; i++)); do launch_node "$i"; done
  wait_serving "$deadline" $(seq "$nodes")
  round_trip "$deadline"

  echo "$bootstrap" >"$dir/bootstrap"
  if [ -n "$certdir" ]; then
    echo "$bootstrap_sasl" >"$dir/bootstrap-sasl-ssl"
    (umask 077 && cat >"$dir/client-sasl-ssl.properties" <<EOF
security.protocol=SASL_SSL
sasl.mechanism=SCRAM-SHA-512
ssl.truststore.type=PEM
ssl.truststore.location=$dir/sasl-ssl/ca.pem
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="$user" password="$password";
EOF
    )
  fi
  started=0
  trap - EXIT INT TERM
  say "$nodes node(s) serving after ${SECONDS}s in $dir"
  echo "bootstrap=$bootstrap"
  [ -z "$certdir" ] || echo "bootstrap-sasl-ssl=$bootstrap_sasl"
}

# --- the other subcommands ------------------------------------------------------------------

# SIGTERM to every node at once, then up to 20 s for them to exit cleanly, then SIGKILL.
cmd_stop() {
  [ -n "$dir" ] || usage
  local node n pid running=()
  for node in "$dir"/node-*/; do
    [ -d "$node" ] || continue
    node=${node%/}
    n=${node##*/node-}
    if pid=$(node_pid "$n"); then
      kill -TERM "$pid" 2>/dev/null || true
      running+=("$n")
    else
      rm -f "$node/pid"
    fi
  done
  [ ${#running[@]} -gt 0 ] || return 0
  local deadline=$((SECONDS + 20)) left
  while :; do
    left=()
    for n in "${running[@]}"; do node_pid "$n" >/dev/null && left+=("$n"); done
    [ ${#left[@]} -gt 0 ] || break
    if [ "$SECONDS" -ge "$deadline" ]; then
      say "nodes ${left[*]} still running 20 s after SIGTERM: SIGKILL"
      kill_nodes "${left[@]}"
      break
    fi
    sleep 0.2
  done
  for n in "${running[@]}"; do rm -f "$dir/node-$n/pid"; done
  say "stopped ${#running[@]} node(s) after ${SECONDS}s"
}

node_arg() {
  case $1 in '' | *[!0-9]*) usage ;; esac
  [ "$1" -ge 1 ] && [ "$1" -le "$NODES" ] || die "no node $1 (the cluster has $NODES)"
}

cmd_kill_node() {
  load_cluster
  node_arg "${1:-}"
  if ! node_pid "$1" >/dev/null; then
    say "node $1 is not running"
    return 0
  fi
  kill_nodes "$1"
  say "node $1 killed"
}

cmd_start_node() {
  load_cluster
  node_arg "${1:-}"
  fetch
  if node_pid "$1" >/dev/null; then
    say "node $1 already runs"
    return 0
  fi
  restarted=$1
  trap 'kill_nodes "$restarted" || true' EXIT
  trap 'exit 130' INT TERM
  launch_node "$1"
  wait_serving $((SECONDS + start_timeout)) "$1"
  trap - EXIT INT TERM
  say "node $1 serving after ${SECONDS}s"
}

cmd_topic() {
  load_cluster
  fetch
  local action=${1:-}
  [ $# -gt 0 ] && shift
  local topic_args=(--bootstrap-server "$BOOTSTRAP")
  case $action in
    create)
      [ $# -ge 1 ] || usage
      topic_args+=(--create --topic "$1")
      shift
      while [ $# -gt 0 ]; do
        case $1 in
          --partitions) [ $# -ge 2 ] || usage; topic_args+=(--partitions "$2"); shift 2 ;;
          --replication) [ $# -ge 2 ] || usage; topic_args+=(--replication-factor "$2"); shift 2 ;;
          --config) [ $# -ge 2 ] || usage; topic_args+=(--config "$2"); shift 2 ;;
          *) usage ;;
        esac
      done
      ;;
    describe | delete)
      [ $# -eq 1 ] || usage
      topic_args+=("--$action" --topic "$1")
      ;;
    list)
      [ $# -eq 0 ] || usage
      topic_args+=(--list)
      ;;
    *) usage ;;
  esac
  run_tool org.apache.kafka.tools.TopicCommand "${topic_args[@]}"
}

# --- main -------------------------------------------------------------------------------------

[ $# -ge 1 ] || usage
sub=$1
shift
case $sub in
  fetch)
    [ $# -eq 0 ] || usage
    fetch
    echo "$libs"
    ;;
  start) cmd_start "$@" ;;
  stop | kill-node | start-node | topic)
    # --dir DIR may come anywhere before the positional arguments.
    rest=()
    while [ $# -gt 0 ]; do
      case $1 in
        --dir) [ $# -ge 2 ] || usage; set_dir "$2"; shift 2 ;;
        *) rest+=("$1"); shift ;;
      esac
    done
    [ -n "$dir" ] || usage
    case $sub in
      stop) [ ${#rest[@]} -eq 0 ] || usage; cmd_stop ;;
      kill-node) [ ${#rest[@]} -eq 1 ] || usage; cmd_kill_node "${rest[@]}" ;;
      start-node) [ ${#rest[@]} -eq 1 ] || usage; cmd_start_node "${rest[@]}" ;;
      topic) cmd_topic "${rest[@]+"${rest[@]}"}" ;;
    esac
    ;;
  tool)
    if [ "${1:-}" = --dir ]; then
      [ $# -ge 2 ] || usage
      set_dir "$2"
      shift 2
    fi
    [ $# -ge 1 ] || usage
    fetch
    run_tool "$@"
    ;;
  -h | --help | help) usage ;;
  *) usage ;;
esac
