"""`python -m benchmarks.scaleout`: several front-ends on one PostgreSQL behind HAProxy, measured
on this machine in one run (a VM's speed varies by the hour: compare only within a run).

1. latency: the same live load (WebSocket, the bench's model and session settings) on
   (a) one front-end with the embedded SQLite store, direct; (b) one front-end with PostgreSQL,
   direct; (c) the same through HAProxy; (d) two front-ends with PostgreSQL through HAProxy.
   b - a is PostgreSQL's share of the latency per event, c - b the balancer's. The setups run in
   rounds, the order reversed every other round (a b c d, d c b a), so a drift of the machine's
   speed over the run falls on all of them alike.
2. writes: PostgreSQL's work per session while (b) and (d) run: transactions, rows and WAL bytes
   (`pg_stat_database`, `pg_current_wal_lsn()`) over a window in the middle of the load, when
   every session streams, divided by the session-seconds of audio in the window; and from those,
   a paper estimate for 10,000 concurrent sessions.
3. failover: one live session through the balancer to two front-ends (`--lease-seconds 2`,
   `--drain-seconds 1`); after a few seconds the front-end serving it is killed (SIGKILL: the
   other takes the session over once the lease expires) or stopped (SIGTERM: it drains, then
   hands the session over); from the signal to the client's `ready` on the other front-end and
   to the first analysis event it sends. The stopped front-end is started again between repeats.

Every front-end is a real `python -m stream serve` process, PostgreSQL a throwaway cluster
(grym/cluster/postgres.py), HAProxy the project's configuration (grym/cluster/haproxy.py).
Writes scaleout.json (every number) and scaleout.md (the tables) into --out.
One module a part (latency.py, writes.py, failover.py), the processes in frontends.py, the
tables in report.py, the command line in run.py.

    python -m benchmarks.scaleout            # the full run (about 5 minutes on 2 cores)
    python -m benchmarks.scaleout --quick    # tiny model, seconds of audio: proves the tool works
"""
