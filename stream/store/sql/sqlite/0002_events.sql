-- The events a session sent, by number, for a client that resumes after `last_event`
-- (acks and analysis events are not here: the latter live with their timeline entries).
CREATE TABLE events (
    session TEXT NOT NULL, n INTEGER NOT NULL, event TEXT NOT NULL, PRIMARY KEY (session, n)
);
ALTER TABLE timeline ADD COLUMN n INTEGER;
ALTER TABLE timeline ADD COLUMN event TEXT;
