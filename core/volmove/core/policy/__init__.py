"""Pure policy logic: retention, cron schedules and leases.

Nothing here does IO or reads the clock; callers pass ``now`` in.  Adapters in
other packages load snapshots and lease objects, call these functions and act
on the answers.
"""
