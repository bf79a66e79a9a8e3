"""Cluster harness: N margin replicas behind nginx with private PostgreSQL and Redis, mock
upstreams, an open-loop load generator and the fault scenarios of issue 10. See docs/deploy.md."""

from bench.cluster.cluster import ADMIN_KEY, Cluster, ClusterSpec, Replica
from bench.cluster.load import Req, Run, chat_request, run_load
from bench.cluster.services import PrivatePostgres, PrivateRedis, ServiceError

__all__ = ["ADMIN_KEY", "Cluster", "ClusterSpec", "PrivatePostgres", "PrivateRedis", "Replica", "Req", "Run",
           "ServiceError", "chat_request", "run_load"]
