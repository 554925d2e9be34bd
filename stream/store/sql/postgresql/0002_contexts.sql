-- A session's rolling context when it moved to another front-end (or its server shut down):
-- its audio (16-bit PCM at the analysis rate) from sample `start`; the timeline has the rest.
CREATE TABLE contexts (
    session text PRIMARY KEY, start bigint NOT NULL, pcm bytea NOT NULL
);
