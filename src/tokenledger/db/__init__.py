"""Infrastructure for PostgreSQL: engines, the unit of work, set-based helpers, SQL files,
the pipelined connection, failure classification, migrations and the embedded server."""
