-- A shared store for several front-ends. Times are seconds since the epoch (as in SQLite);
-- JSON is jsonb. `start`/`end` are reserved words here: t_start, t_end.
CREATE TABLE sessions (
    id text PRIMARY KEY, started double precision NOT NULL, ended double precision,
    info jsonb NOT NULL, summary jsonb
);
CREATE TABLE timeline (
    session text NOT NULL, seq integer NOT NULL, t_start double precision NOT NULL,
    t_end double precision NOT NULL, fields jsonb NOT NULL, n integer, event jsonb,
    PRIMARY KEY (session, seq)
);
CREATE TABLE events (
    session text NOT NULL, n integer NOT NULL, event jsonb NOT NULL, PRIMARY KEY (session, n)
);
-- A clip's audio (FLAC) lives in the database, so any front-end can serve it.
CREATE TABLE generations (
    session text NOT NULL, id integer NOT NULL, created double precision NOT NULL,
    record jsonb NOT NULL, audio text, PRIMARY KEY (session, id)
);
CREATE TABLE clips (
    session text NOT NULL, id integer NOT NULL, flac bytea NOT NULL, PRIMARY KEY (session, id)
);
CREATE TABLE errors (
    session text NOT NULL, time double precision NOT NULL, code text NOT NULL,
    event jsonb NOT NULL
);
CREATE INDEX errors_by_session ON errors (session, time);
-- Who serves a session: one front-end at a time, until `expires` (renewed while it serves).
-- `epoch` counts the owners a session has had.
CREATE TABLE leases (
    session text PRIMARY KEY, owner text, epoch integer NOT NULL DEFAULT 1,
    expires timestamptz NOT NULL
);
CREATE INDEX leases_by_owner ON leases (owner);
CREATE INDEX leases_by_expiry ON leases (expires);
