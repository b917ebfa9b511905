"""Try several servers sharing one agent memory on this machine: Redis, two replicas of
semantic-server (the default model, caches shared through Redis) and nginx in front of
them, all on free loopback ports; Ctrl-C stops everything.

    .venv/bin/python -m deploy.replicas [--replicas 2] [--model smollm2-135m-instruct]

Then send requests with an ``X-Agent-ID`` to the printed nginx URL: each agent goes to one
replica; stop that replica and its agents' next turns go to another, which resumes them
warm from Redis.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading

from tests.servers import NginxProcess, RedisProcess, ServerProcess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()
    redis = RedisProcess().start()
    replicas: list[ServerProcess] = []
    nginx = None
    try:
        for _ in range(args.replicas):
            replicas.append(ServerProcess(args.model, cache_store=redis.url).start(600))
        nginx = NginxProcess([r.url for r in replicas]).start()
        print(f"redis    127.0.0.1:{redis.port} (password in the replicas' environment)")
        for i, replica in enumerate(replicas, 1):
            print(f"replica {i} {replica.url} (pid {replica.process.pid}, log "
                  f"{replica.log_path})")
        print(f"nginx    {nginx.url}  <- send requests here, with X-Agent-ID; Ctrl-C stops")
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    finally:
        if nginx is not None:
            nginx.stop()
        for replica in replicas:
            replica.stop()
        redis.stop()


if __name__ == "__main__":
    main()
