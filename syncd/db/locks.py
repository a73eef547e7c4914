"""Every PostgreSQL advisory lock syncd takes, in one place.

Advisory locks share one key space per database, so each kind of lock has a namespace
of its own (the first int4 of the two-key form). Keys are fixed once released: a
running older syncd and a newer one must agree on them.

| lock               | key (int4, int4)                          | held                        |
| ------------------ | ----------------------------------------- | --------------------------- |
| run liveness       | (RUN_LOCK_NAMESPACE, run id mod 2^31 - 1) | session, on the run's own   |
|                    |                                           | connection, for its life    |
| migrations         | (MIGRATION_LOCK_NAMESPACE, MIGRATE)       | transaction (`migrate`)     |
| plan of a segment  | (hashtext('syncd.plan'), hashtext(key))   | session, around one plan    |
| ledger fold        | (LEDGER_LOCK_NAMESPACE, FOLD)             | transaction (one fold batch)|

The run liveness key is also spelt in SQL: `syncd.run_is_alive()` (sql/0001_init.sql)
and `hold_run_lock` (queries/runs.sql); a test holds them equal to the constant here.
"""

from __future__ import annotations

# 'sync' as an int4: one run's liveness lock, the second key being the run id.
RUN_LOCK_NAMESPACE = 0x73796E63
# 'synm' as an int4: schema migrations. (It used to be the run namespace with key 1, the
# key of run 1's liveness lock, so `syncd migrate` waited while run 1 was alive.)
MIGRATION_LOCK_NAMESPACE = 0x73796E6D
MIGRATE = 1
# 'synl' as an int4: folding the acknowledged chunks into the ledger, one fold at a time.
LEDGER_LOCK_NAMESPACE = 0x73796E6C
FOLD = 1
