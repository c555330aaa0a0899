"""The traceability database's tables (edge.line.store): one row per part, and the triggers accepted
but not yet inspected. Owns the SQL that creates them; must not hold queries or migrations' logic.
"""

PARTS_TABLE = """
CREATE TABLE IF NOT EXISTS parts (
    part_id        TEXT PRIMARY KEY,
    station        TEXT NOT NULL,
    captured_at    REAL NOT NULL,
    trigger        TEXT NOT NULL,
    verdict        TEXT NOT NULL,
    score          REAL,            -- NULL: the part could not be scored (verdict "error")
    threshold      REAL,            -- NULL: no state yet (verdict "learning", learn mode)
    regions        TEXT NOT NULL,
    findings       TEXT,
    latency_ms     REAL,
    model_id       TEXT,
    files_dir      TEXT,
    files_bytes    INTEGER NOT NULL DEFAULT 0,
    files_purged   INTEGER NOT NULL DEFAULT 0,
    explanation    TEXT,
    explanation_status TEXT,
    feedback       TEXT,
    feedback_by    TEXT,
    feedback_at    REAL,
    feedback_note  TEXT,
    messages       TEXT,            -- [[topic, payload], ...] to publish for this part
    published      INTEGER NOT NULL DEFAULT 0
)"""
PARTS_INDEXES = """
CREATE INDEX IF NOT EXISTS parts_time ON parts (captured_at);
CREATE INDEX IF NOT EXISTS parts_verdict_time ON parts (verdict, captured_at);
CREATE INDEX IF NOT EXISTS parts_unpublished ON parts (published) WHERE published = 0;
"""
# Triggers accepted (acknowledged to the PLC) but not yet recorded as a part: replayed at the next start.
TRIGGERS_TABLE = """
CREATE TABLE IF NOT EXISTS triggers (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    part_id     TEXT NOT NULL UNIQUE,
    request_id  TEXT,
    accepted_at REAL NOT NULL
);
"""
SCHEMA = PARTS_TABLE + ";\n" + PARTS_INDEXES + TRIGGERS_TABLE
