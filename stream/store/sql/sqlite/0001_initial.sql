-- The tables of the first release (before versioned migrations: IF NOT EXISTS lets databases
-- made then take this step without harm).
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, started REAL NOT NULL, ended REAL, info TEXT NOT NULL,
    summary TEXT
);
CREATE TABLE IF NOT EXISTS timeline (
    session TEXT NOT NULL, seq INTEGER NOT NULL, start REAL NOT NULL, end REAL NOT NULL,
    fields TEXT NOT NULL, PRIMARY KEY (session, seq)
);
CREATE TABLE IF NOT EXISTS generations (
    session TEXT NOT NULL, id INTEGER NOT NULL, created REAL NOT NULL, record TEXT NOT NULL,
    audio TEXT, PRIMARY KEY (session, id)
);
CREATE TABLE IF NOT EXISTS errors (
    session TEXT NOT NULL, time REAL NOT NULL, code TEXT NOT NULL, event TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS errors_by_session ON errors (session, time);
