#!/usr/bin/env bash
# PostgreSQL (ledger) and Redis (shared state) on loopback. On this project's machines both are
# preinstalled and running; on a bare Debian machine this installs and starts them.
set -euo pipefail
pg_up() { python3 - <<'PY'
import socket, sys
s = socket.socket(); s.settimeout(1)
sys.exit(0 if s.connect_ex(("127.0.0.1", 5432)) == 0 else 1)
PY
}
redis_up() { (command -v redis-cli >/dev/null && redis-cli -h 127.0.0.1 ping 2>/dev/null | grep -q PONG); }
apt_updated=0
need() { # need PACKAGE...: apt-get install when missing
  if [ $apt_updated = 0 ]; then apt-get update -qq; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
if ! pg_up; then
  [ -d /usr/lib/postgresql ] || need postgresql
  ver=$(ls /etc/postgresql 2>/dev/null | sort -n | tail -1)
  pg_ctlcluster --skip-systemctl-redirect "$ver" main start 2>/dev/null || pg_ctlcluster "$ver" main start
  # trust auth on loopback, as the project's machines have it
  hba=/etc/postgresql/$ver/main/pg_hba.conf
  if ! grep -q "^host all all 127.0.0.1/32 trust" "$hba"; then
    sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
    pg_ctlcluster --skip-systemctl-redirect "$ver" main reload 2>/dev/null || pg_ctlcluster "$ver" main reload
  fi
  for i in $(seq 1 30); do pg_up && break; sleep 1; done
fi
pg_up && echo "postgresql: up on 127.0.0.1:5432" || { echo "postgresql: NOT reachable"; exit 1; }
if ! redis_up; then
  command -v redis-server >/dev/null || need redis-server
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /tmp --logfile /tmp/margin-redis.log
  for i in $(seq 1 20); do redis_up && break; sleep 0.5; done
fi
redis_up && echo "redis: up on 127.0.0.1:6379" || { echo "redis: NOT reachable"; exit 1; }
# nginx: the load balancer of the cluster harness (bench/cluster) runs its own private nginx
# processes; only the binary is needed, never the system service.
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need nginx
echo "nginx: $( (command -v nginx || echo /usr/sbin/nginx) | head -1) present"
