"""flows: Prefect flows that compose stages (speedrun, single-stage rerun, nightly leaderboard)."""
