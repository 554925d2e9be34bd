"""Versioned schema changes, applied at start-up: numbered SQL files, one transaction each.

`sql/<dialect>/NNNN_name.sql` is version NNNN. A store applies every version its database has
not recorded in `schema_migrations`, in order, each with its record in one transaction, so a
start-up that dies half-way leaves the database at a whole version. Several PostgreSQL front-ends
starting at once take turns on an advisory lock. There are no down-migrations: a release only
adds versions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

FILE = re.compile(r"(\d{4})_(\w+)\.sql")
LOCK_ID = 0x6772796D  # "grym": the advisory lock PostgreSQL front-ends take to migrate
TABLE = "schema_migrations"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations(dialect: str) -> list[Migration]:
    """The versions shipped for `dialect` ("sqlite" or "postgresql"), oldest first."""
    folder = resources.files("stream.store") / "sql" / dialect
    found = []
    for item in folder.iterdir():
        match = FILE.fullmatch(item.name)
        if match:
            found.append(Migration(int(match[1]), match[2], item.read_text()))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"the {dialect} migrations are not numbered 1, 2, ...: {found}")
    return found


def pending(dialect: str, applied: set[int]) -> list[Migration]:
    return [m for m in migrations(dialect) if m.version not in applied]
