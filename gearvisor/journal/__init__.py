"""The job journal: every job's outcome, failed jobs kept for retry and replay (record.py
is the wire format; store.py keeps the records in SQLite or PostgreSQL)."""
