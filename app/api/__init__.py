"""HTTP API: worklist, studies, health."""
